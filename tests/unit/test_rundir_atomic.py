"""rundir.atomic_write: the one write-then-rename helper (manifests, metrics JSON, training checkpoints)."""

from __future__ import annotations

import json

import pytest

from igdrec.rundir import atomic_write, write_json_atomic, write_text_atomic


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    write_text_atomic(target, "old")
    assert atomic_write(target, lambda tmp: tmp.write_bytes(b"new")) == target
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"a": 1})

    def half_then_crash(tmp):
        tmp.write_text('{"a": ')
        raise KeyboardInterrupt  # a kill between the write and the rename

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_the_writer_sees_a_hidden_sibling_of_the_target(tmp_path):
    seen = []
    atomic_write(tmp_path / "model.pt", lambda tmp: (seen.append(tmp), tmp.write_bytes(b"x")))
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".model.pt.tmp-")


def test_training_checkpoints_go_through_it(tmp_path):
    from igdrec.checkpoints import load_checkpoint, save_checkpoint

    path = tmp_path / "checkpoint" / "state.pt"
    save_checkpoint(path, {"step": 3})
    save_checkpoint(path, {"step": 4})
    assert load_checkpoint(path)["step"] == 4
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]
