"""Caching and atomic publishing of stage artifacts (rundir.StageWriter), through the preprocess stage."""

import json
import re
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from igdrec.config import PreprocessConfig
from igdrec.errors import IgdrecError
from igdrec.rundir import RunDir, StageWriter
from igdrec.stages import preprocess

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Input fingerprints are memoised in the cache: keep the tests' out of the user's."""
    monkeypatch.setenv("IGDREC_CACHE", str(tmp_path / "cache"))


def write_inputs(directory: Path, extra: str = "") -> PreprocessConfig:
    # six windows: the fewest whose 80/10/10 split leaves no split empty
    (directory / "inter.csv").write_text("user_id,item_id,timestamp\nu,a,1\nu,b,2\nu,a,3\nu,b,4\nv,b,5\nv,a,6\nv,b,7\nv,a,8\n" + extra)
    (directory / "items.csv").write_text("item_id,title\na,Alpha\nb,Beta\n")
    return PreprocessConfig(source="interactions", interactions=str(directory / "inter.csv"), items=str(directory / "items.csv"))


def test_second_run_is_cached_and_changes_rerun(tmp_path):
    config = write_inputs(tmp_path)
    run = RunDir(tmp_path / "run")
    first = preprocess.run(config, run)
    again = preprocess.run(config, run)
    assert again["created_at"] == first["created_at"] and again["key"] == first["key"]

    shorter = preprocess.run(PreprocessConfig(**{**config.__dict__, "history_len": 1}), run)
    assert shorter["key"] != first["key"]

    write_inputs(tmp_path, extra="v,b,9\n")  # new input content
    grown = preprocess.run(config, run)
    assert grown["key"] != shorter["key"] and grown["stats"]["interactions"] == 9

    forced = preprocess.run(config, run, force=True)
    assert forced["key"] == grown["key"] and forced["created_at"] >= grown["created_at"]
    assert run.require("data", hint="igdrec preprocess")["key"] == grown["key"]


def test_corrupted_artifact_is_detected_and_rebuilt(tmp_path):
    config = write_inputs(tmp_path)
    run = RunDir(tmp_path / "run")
    preprocess.run(config, run)
    train = run.artifact("data", "train.parquet")
    good = train.read_bytes()
    train.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # same size, one bit flipped
    assert run.manifest("data") is None
    with pytest.raises(IgdrecError, match="run `igdrec preprocess` first"):
        run.require("data", hint="igdrec preprocess")
    preprocess.run(config, run)
    assert train.read_bytes() == good and run.manifest("data") is not None


CRASH = textwrap.dedent(
    """
    import os, sys
    import polars as pl
    sys.path.insert(0, {src!r})
    from igdrec.config import PreprocessConfig
    from igdrec.rundir import RunDir
    from igdrec.stages import preprocess

    real_write = pl.DataFrame.write_parquet
    def write_then_die(self, path, *args, **kwargs):
        real_write(self, path, *args, **kwargs)
        if str(path).endswith("valid.parquet"):
            os._exit(9)  # killed mid-stage: items and train are written, test is not
    pl.DataFrame.write_parquet = write_then_die
    preprocess.run(PreprocessConfig(**{config!r}), RunDir({run!r}), force=True)
    """
)


def crash(config: PreprocessConfig, run_dir: Path) -> None:
    script = CRASH.format(src=SRC, config=config.__dict__, run=str(run_dir))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "IGDREC_NO_PROGRESS": "1"})
    assert proc.returncode == 9, proc.stderr


def test_crash_mid_stage_publishes_nothing(tmp_path):
    config = write_inputs(tmp_path)
    run = RunDir(tmp_path / "run")
    crash(config, run.root)
    assert not run.stage_dir("data").exists() and run.manifest("data") is None
    # the killed process's lock file stays behind, released (the kernel drops a dead process's locks)
    leftovers = [p for p in (run.root / ".partial").iterdir() if p.suffix != ".lock"]
    assert len(leftovers) == 1 and (leftovers[0] / "train.parquet").exists()
    manifest = preprocess.run(config, run)  # the next run starts over cleanly
    assert set(manifest["outputs"]) == {"items.parquet", "train.parquet", "valid.parquet", "test.parquet"}
    assert not list((run.root / ".partial").iterdir())


def test_crash_during_rerun_keeps_the_previous_good_artifact(tmp_path):
    config = write_inputs(tmp_path)
    run = RunDir(tmp_path / "run")
    good = preprocess.run(config, run)
    crash(config, run.root)
    assert run.manifest("data")["created_at"] == good["created_at"]
    assert json.loads((run.stage_dir("data") / "stage.json").read_text())["key"] == good["key"]


def test_exception_inside_writer_removes_partial_and_resumable_keeps_it(tmp_path):
    run = RunDir(tmp_path / "run")
    for resumable in (False, True):
        with pytest.raises(RuntimeError):
            with StageWriter(run, "decode/x", stage="decode", params={"r": resumable}, resumable=resumable) as out:
                out.path("shard-0.parquet").write_bytes(b"half")
                raise RuntimeError("boom")
        assert run.manifest("decode/x") is None
        assert out.partial_dir.exists() == resumable
    with StageWriter(run, "decode/x", stage="decode", params={"r": True}, resumable=True) as out:
        assert out.path("shard-0.parquet").read_bytes() == b"half"  # resumed, not wiped
    assert run.manifest("decode/x")["outputs"]["shard-0.parquet"]["bytes"] == 4


def test_cached_cli_run_imports_no_torch(tmp_path):
    config = write_inputs(tmp_path)
    run_dir = tmp_path / "run"
    preprocess.run(config, RunDir(run_dir))
    script = (
        f"import sys; sys.path.insert(0, {SRC!r}); sys.argv = ['igdrec', 'preprocess', '--run-dir', {str(run_dir)!r}, "
        f"'--source', 'interactions', '--interactions', {config.interactions!r}, '--items', {config.items!r}]\n"
        "from igdrec.cli import app\n"
        "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "cached" in proc.stdout


def test_edited_manifest_is_detected_and_rebuilt(tmp_path):
    """A hand-edited stage.json (here the category word the prompts use) is not trusted downstream, and
    the stage rebuilds it; the fingerprint downstream stages key on covers the manifest's statistics."""
    config = write_inputs(tmp_path)
    run = RunDir(tmp_path / "run")
    good = preprocess.run(config, run)
    path = run.stage_dir("data") / "stage.json"
    original = path.read_text()
    edited = json.loads(original)
    edited["stats"]["category_word"] = "books"
    path.write_text(json.dumps(edited, indent=2, sort_keys=True) + "\n")
    assert run.manifest("data") is None
    with pytest.raises(IgdrecError, match=r"data/stage\.json was changed after its stage wrote it .*run `igdrec preprocess` first"):
        run.require("data", hint="igdrec preprocess")
    rebuilt = preprocess.run(config, run)
    assert rebuilt["created_at"] >= good["created_at"] and rebuilt["stats"]["category_word"] == good["stats"]["category_word"]
    assert rebuilt["fingerprint"] == good["fingerprint"]  # same content, same key downstream

    # Had the edit come with a matching digest, it would still change what downstream stages key on.
    from igdrec.rundir import manifest_digest, manifest_fingerprint

    edited = json.loads(path.read_text())
    assert manifest_fingerprint(edited) == edited["fingerprint"]
    edited["stats"]["category_word"] = "books"
    assert manifest_fingerprint(edited) != good["fingerprint"]
    edited["digest"] = manifest_digest(edited)
    path.write_text(json.dumps(edited))
    assert run.manifest("data")["stats"]["category_word"] == "books"  # a deliberate, consistent re-sign is accepted


def test_manifest_without_digest_is_not_trusted(tmp_path):
    config = write_inputs(tmp_path)
    run = RunDir(tmp_path / "run")
    preprocess.run(config, run)
    path = run.stage_dir("data") / "stage.json"
    manifest = json.loads(path.read_text())
    del manifest["digest"]
    path.write_text(json.dumps(manifest))
    assert run.manifest("data") is None


def test_run_dir_that_is_a_file_is_named_as_such(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for root, says in ((blocker, f"run directory {blocker} is a file"), (blocker / "run", f"cannot be created: {blocker} is a file")):
        with pytest.raises(IgdrecError, match=re.escape(says)):
            RunDir(root).ensure_writable()
