"""Names that cannot escape their artifact, a publish step that replaces only its own directory, checkpoints
that cannot run code, one writer per artifact, and a full disk: each refused with one line, the run's
other artifacts intact and nothing written outside the run directory."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest
import yaml
from cli_helpers import one_line_error
from decode_helpers import publish_ig, save_peaked_model
from fixtures import synthetic_run
from typer.testing import CliRunner

from igdrec import config as cfg
from igdrec import checkpoints, options, rundir, schema
from igdrec.experiments import grid_config
from igdrec.api import Recommender
from igdrec.cli import app
from igdrec.config import DecodeConfig, MetricsConfig, RerankConfig, SFTConfig
from igdrec.errors import IgdrecError
from igdrec.modeling import load_tokenizer
from igdrec.rundir import MANIFEST, RunDir, StageWriter
from igdrec.stages import decode, metrics, rerank, sft

SRC = str(Path(__file__).resolve().parents[2] / "src")
STAGE_ROOTS = ("sft", "decode", "rerank", "metrics", "baseline", "grounding")
RULE = "not a valid name; use 1-100 letters, digits, '_', '-' or '.', starting with a letter, digit or '_'"


def finished(run: RunDir) -> dict[str, str]:
    """stage path -> manifest digest of every artifact of the run whose manifest and outputs verify."""
    paths = ["data", "ig"] + [f"{root}/{name}" for root in STAGE_ROOTS for name in run.finished_names(root)]
    return {p: run.manifest(p)["digest"] for p in paths if run.manifest(p) is not None}


def outside(tmp_path: Path, run: RunDir) -> tuple[list[str], list[str]]:
    """Everything under tmp_path that is not inside the run directory, and the names beside tmp_path."""
    inside = run.root.resolve()
    below = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
             if p.resolve() != inside and inside not in p.resolve().parents]
    return sorted(below), sorted(p.name for p in tmp_path.parent.iterdir())


def publish_lists(run: RunDir, name: str, lists: dict[int, list[int]]) -> None:
    with StageWriter(run, f"decode/{name}", stage="decode", params={"split": "test", "limit": None, "num_beams": 10}) as out:
        out.path("beams.parquet").write_bytes(b"unused")
    rows = [(s, r, i, -float(r)) for s, items in lists.items() for r, i in enumerate(items)]
    topk = schema.conform(pl.DataFrame(rows, schema=["sample_id", "rank", "item_id", "score"], orient="row"), "topk")
    with StageWriter(run, f"rerank/{name}", stage="rerank", params={"decode": name, "top_k": 20}) as out:
        topk.write_parquet(out.path("topk.parquet"))


@pytest.fixture
def full_run(tmp_path, tiny_tokenizer):
    """A run with data, ig, a fine-tune, a decode, a rerank, metrics and a baseline (all small, by hand)."""
    run = synthetic_run(tmp_path / "box" / "run")
    publish_ig(run, tiny_tokenizer, "tiny")
    test = schema.read(run.artifact("data", "test.parquet"), "samples").sort("sample_id")
    publish_lists(run, "a", {s: [t] for s, t in zip(test["sample_id"], test["item_id"])})
    metrics.run(MetricsConfig(rerank="a", ks=[1]), run)
    with StageWriter(run, "sft/s", stage="sft", params={"fixture": 1}) as out:
        out.path("model/adapter.bin").write_bytes(b"weights")
    with StageWriter(run, "baseline/b", stage="baseline", params={"fixture": 1}) as out:
        out.path("topk.parquet").write_bytes(b"lists")
    before = finished(run)
    assert set(before) == {"data", "ig", "sft/s", "decode/a", "rerank/a", "metrics/a", "baseline/b"}
    return run, before


# --------------------------------------------------------------------------------------------------
# 1. One rule for artifact names


@pytest.mark.parametrize("name", ["a", "igd-b0.1", "igd-b0.1-test-b10-lp1-a0.1-n100", "_x", "V2", "x" * 100])
def test_the_rule_accepts_the_names_igdrec_makes(name):
    assert options.check_artifact_name(name, "--name") == name


@pytest.mark.parametrize("name", ["", ".", "..", "../data", "../../x", "a/b", "/abs", ".hidden", "-x", "a\nb",
                                  "a b", "a\\b", "x" * 101, "é", None, 5])
def test_the_rule_refuses_what_could_escape_hide_or_break_a_line(name):
    with pytest.raises(IgdrecError) as caught:
        options.check_artifact_name(name, "--name")
    message = str(caught.value)
    assert message.startswith(f"--name {name!r}: {RULE}") and "\n" not in message


def test_every_option_that_names_an_artifact_carries_the_rule():
    named = {(cls.__name__, o.name) for cls in cfg.STAGE_CONFIGS.values() for o in options.options(cls) if o.artifact}
    assert named == {
        ("SFTConfig", "name"), ("DecodeConfig", "sft"), ("DecodeConfig", "name"), ("DecodeConfig", "tfa"),
        ("RerankConfig", "decode"), ("RerankConfig", "name"), ("BaselineConfig", "name"), ("SearchErrorsConfig", "decode"),
        ("MetricsConfig", "rerank"), ("MetricsConfig", "baseline"), ("MetricsConfig", "name"),
    }


ABSOLUTE = "/tmp/igdrec-absolute-name"


@pytest.mark.parametrize(
    "args, shown",
    [
        (["rerank", "--decode", "a", "--name", "."], "--name '.'"),
        (["rerank", "--decode", "a", "--name", ".."], "--name '..'"),
        (["rerank", "--decode", "a", "--name", "../data"], "--name '../data'"),
        (["rerank", "--decode", "a", "--name", "../../x"], "--name '../../x'"),
        (["rerank", "--decode", "a", "--name", ABSOLUTE], f"--name '{ABSOLUTE}'"),
        (["rerank", "--decode", "a", "--name", "r\nx"], "--name 'r\\nx'"),
        (["metrics", "--rerank", "a", "--name", "../../x"], "--name '../../x'"),
        (["search-errors", "--decode", "../data"], "--decode '../data'"),
        (["metrics", "--rerank", "a", "--name", "."], "--name '.'"),
        (["sft", "--name", "."], "--name '.'"),
        (["sft", "--name", ".."], "--name '..'"),
        (["decode", "--sft", "s", "--name", "../rerank/a"], "--name '../rerank/a'"),
        (["decode", "--sft", "s", "--name", "d\ne"], "--name 'd\\ne'"),
        (["baseline", "--name", "."], "--name '.'"),
        (["decode", "--sft", "../sft/s"], "--sft '../sft/s'"),
        (["decode", "--sft", "s", "--tfa", "../baseline/b"], "--tfa '../baseline/b'"),
        (["rerank", "--decode", "../decode/a"], "--decode '../decode/a'"),
        (["metrics", "--rerank", ".."], "--rerank '..'"),
        (["metrics", "--baseline", "../baseline/b"], "--baseline '../baseline/b'"),
        (["metrics", "--compare", "a", "../metrics/a"], "--compare '../metrics/a'"),
        (["metrics", "--compare", "nosuch", ".."], "--compare '..'"),
    ],
)
def test_a_name_that_is_a_path_is_refused_and_the_run_stays_intact(args, shown, full_run, tmp_path):
    run, before = full_run
    seen = outside(tmp_path, run)
    metrics_json = (run.root / "metrics" / "a.json").read_text()
    one_line_error(CliRunner().invoke(app, [*args, "--force", "--run-dir", str(run.root)]), shown, RULE)
    assert finished(run) == before
    assert (run.root / "metrics" / "a.json").read_text() == metrics_json
    assert outside(tmp_path, run) == seen
    assert not Path(ABSOLUTE).exists()


def test_a_name_from_a_config_file_is_refused_with_the_file_and_key(full_run, tmp_path):
    run, before = full_run
    config = tmp_path / "c.yaml"
    config.write_text("rerank:\n  decode: a\n  name: ../../x\n")
    seen = outside(tmp_path, run)
    one_line_error(CliRunner().invoke(app, ["run", str(config), "--run-dir", str(run.root)]),
                   f"{config}:rerank.name '../../x': {RULE}")
    assert finished(run) == before and outside(tmp_path, run) == seen


def test_stage_functions_refuse_a_bad_name_before_touching_the_run(full_run, tmp_path):
    run, before = full_run
    seen = outside(tmp_path, run)
    for call in (lambda: rerank.run(RerankConfig(decode="a", name="."), run, force=True),
                 lambda: metrics.run(MetricsConfig(rerank="a", name="../../x"), run, force=True),
                 lambda: decode.run(DecodeConfig(sft="..", name="d"), run),
                 lambda: sft.run(SFTConfig(name="../x"), run)):
        with pytest.raises(IgdrecError, match="not a valid name"):
            call()
    assert finished(run) == before and outside(tmp_path, run) == seen


def test_the_python_api_refuses_a_path_as_the_fine_tune(full_run, tmp_path):
    run, before = full_run
    for bad in ("../sft/s", ".", "/etc"):
        with pytest.raises(IgdrecError, match=f"--sft {bad!r}: not a valid name"):
            Recommender.load(run.root, sft=bad)
    assert finished(run) == before


def test_the_writer_refuses_a_stage_path_that_is_not_made_of_valid_names(full_run, tmp_path):
    """The backstop behind the options: a default name built from odd parts, or a stage's own mistake."""
    run, before = full_run
    seen = outside(tmp_path, run)
    for path in ("rerank/.", "rerank/..", "rerank/../data", "rerank", "rerank/", "/abs", "rerank/a/../../x"):
        with pytest.raises(IgdrecError, match="rerank name|expected <stage folder>/NAME"):
            StageWriter(run, path, stage="rerank", params={}, force=True)
    assert finished(run) == before and outside(tmp_path, run) == seen


@pytest.mark.parametrize("model, label", [("/models/.hidden_model", "hidden_model"), ("..", "model"),
                                          ("org/-odd name", "odd_name"), ("HuggingFaceTB/SmolLM2-135M", "SmolLM2-135M")])
def test_default_names_made_from_a_model_path_are_valid(model, label):
    made = options.artifact_label(Path(model.rstrip("/")).name)
    assert made == label and options.check_artifact_name(made, "label") == label


def grid_with_dataset(tmp_path: Path, dataset: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"scale": "test", "run_root": str(tmp_path / "box" / "grid"),
                                    "datasets": {dataset: {}}, "selection": {"alphas": [0.0]}}))
    return path


@pytest.mark.parametrize("dataset", ["../../escaped_ds", "..", ".", "/abs/ds", "a/b"])
def test_a_grid_dataset_name_cannot_place_its_run_outside_the_run_root(dataset, tmp_path):
    path = grid_with_dataset(tmp_path, dataset)
    seen = sorted(str(p) for p in tmp_path.rglob("*")), sorted(p.name for p in tmp_path.parent.iterdir())
    one_line_error(CliRunner().invoke(app, ["grid", str(path)]), f"{path}:datasets {dataset!r}: {RULE}")
    one_line_error(CliRunner().invoke(app, ["grid", str(path), "--dry-run"]), f"{path}:datasets {dataset!r}")
    assert (sorted(str(p) for p in tmp_path.rglob("*")), sorted(p.name for p in tmp_path.parent.iterdir())) == seen
    assert grid_config.load_grid(grid_with_dataset(tmp_path, "toy-1.2")).datasets[0].run_dir == tmp_path / "box" / "grid" / "toy-1.2"


# --------------------------------------------------------------------------------------------------
# 2. A publish step that replaces only its own directory


def elsewhere_with_manifest(tmp_path: Path) -> Path:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / MANIFEST).write_text('{"precious": true}')
    (target / "data.bin").write_text("keep me")
    return target


def assert_untouched(target: Path) -> None:
    assert (target / MANIFEST).read_text() == '{"precious": true}' and (target / "data.bin").read_text() == "keep me"


def test_a_symlinked_stage_directory_is_refused_with_force_and_its_target_kept(full_run, tmp_path):
    run, before = full_run
    target = elsewhere_with_manifest(tmp_path)
    link = run.stage_dir("rerank/r1")
    link.symlink_to(target, target_is_directory=True)
    seen = outside(tmp_path, run)
    result = CliRunner().invoke(app, ["rerank", "--decode", "a", "--name", "r1", "--force", "--run-dir", str(run.root)])
    one_line_error(result, f"{link} is a symbolic link (to {target})", "remove the link")
    assert_untouched(target)
    assert link.is_symlink() and not [p for p in link.parent.iterdir() if ".old-" in p.name]
    assert finished(run) == before and outside(tmp_path, run) == seen
    assert not [p for p in (run.root / ".partial").iterdir()]  # no partial directory, no lock left


def test_a_link_that_appears_while_the_stage_runs_is_refused_at_publish(full_run, tmp_path):
    run, before = full_run
    target = elsewhere_with_manifest(tmp_path)
    with pytest.raises(IgdrecError, match="is a symbolic link"):
        with StageWriter(run, "rerank/a", stage="rerank", params={"new": 1}, force=True) as out:
            out.path("topk.parquet").write_bytes(b"new")
            os.rename(run.stage_dir("rerank/a"), tmp_path / "moved")  # the real one swapped for a link
            run.stage_dir("rerank/a").symlink_to(target, target_is_directory=True)
    assert_untouched(target)
    assert not [p for p in run.stage_dir("rerank").iterdir() if ".old-" in p.name]
    assert not list((run.root / ".partial").iterdir())


def test_a_symlinked_stage_folder_or_partial_folder_is_refused(full_run, tmp_path):
    run, before = full_run
    target = elsewhere_with_manifest(tmp_path)
    folder = run.stage_dir("baseline")
    os.rename(folder, tmp_path / "real-baseline")
    folder.symlink_to(target, target_is_directory=True)
    with pytest.raises(IgdrecError, match=f"{folder} is a symbolic link"):
        with StageWriter(run, "baseline/b", stage="baseline", params={"new": 1}, force=True):
            pass
    folder.unlink()
    os.rename(tmp_path / "real-baseline", folder)
    (run.root / ".partial").rmdir()
    (run.root / ".partial").symlink_to(target, target_is_directory=True)
    with pytest.raises(IgdrecError, match=r"\.partial is a symbolic link"):
        with StageWriter(run, "baseline/b", stage="baseline", params={"new": 1}, force=True):
            pass
    assert_untouched(target)
    assert finished(run) == before


def test_a_forced_rerun_of_a_real_directory_still_replaces_it_and_leaves_no_trash(full_run):
    run, before = full_run
    with StageWriter(run, "rerank/a", stage="rerank", params={"new": 1}, force=True) as out:
        out.path("topk.parquet").write_bytes(b"new")
    assert run.manifest("rerank/a")["params"] == {"new": 1}
    assert sorted(p.name for p in run.stage_dir("rerank").iterdir()) == ["a"]
    assert {k: v for k, v in finished(run).items() if k != "rerank/a"} == {k: v for k, v in before.items() if k != "rerank/a"}


def test_a_run_directory_reached_through_a_link_still_publishes(tmp_path):
    """Links above the run directory (runs/ on another disk) are the user's choice; only links inside it are refused."""
    (tmp_path / "disk").mkdir()
    (tmp_path / "runs").symlink_to(tmp_path / "disk", target_is_directory=True)
    run = RunDir(tmp_path / "runs" / "r")
    for params in ({"v": 1}, {"v": 2}):
        with StageWriter(run, "decode/x", stage="decode", params=params, force=True) as out:
            out.path("beams.parquet").write_bytes(b"b")
    assert run.manifest("decode/x")["params"] == {"v": 2}
    assert sorted(p.name for p in (tmp_path / "disk" / "r" / "decode").iterdir()) == ["x"]


# --------------------------------------------------------------------------------------------------
# 3. Checkpoints that cannot run code


class Payload:
    """Unpickling this writes a marker file: what an attacker's checkpoint would do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_planted_pickle_checkpoint_is_never_run(tiny_model_dir, tmp_path, monkeypatch):
    import torch

    from ig_helpers import publish_ig_stage

    run = synthetic_run(tmp_path / "run")
    publish_ig_stage(run, load_tokenizer(str(tiny_model_dir)), str(tiny_model_dir))
    config = dict(model=str(tiny_model_dir), weighting="plain", sample=16, valid_sample=0, batch_size=8,
                  micro_batch_size=4, epochs=1, max_steps=2, save_every=1, name="p")

    class Killed(Exception):
        pass

    real_save = checkpoints.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        raise Killed

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        sft.run(SFTConfig(**config), run)
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    (checkpoint,) = (run.root / ".partial").glob("sft__p-*/checkpoint/checkpoint.pt")

    marker = tmp_path / "marker"
    torch.save({"step": 1, "trainable": {}, "evil": Payload(marker)}, checkpoint)
    torch.load(checkpoint, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.read_text() == "pwned"
    marker.unlink()

    for extra in ([], ["--resume"]):
        result = CliRunner().invoke(app, ["sft", *_flags(config), *extra, "--run-dir", str(run.root)])
        one_line_error(result, f"{checkpoint}: refused, not a checkpoint igdrec wrote", "nothing in it was run", "--force")
        assert not marker.exists()
    assert run.manifest("sft/p") is None
    # a pickle that is no zip archive at all (torch's legacy format) is refused the same way
    checkpoint.write_bytes(pickle.dumps(Payload(marker)))
    one_line_error(CliRunner().invoke(app, ["sft", *_flags(config), "--resume", "--run-dir", str(run.root)]),
                   "refused, not a checkpoint igdrec wrote")
    assert not marker.exists()


def _flags(config: dict) -> list[str]:
    return [part for key, value in config.items() for part in ("--" + key.replace("_", "-"), str(value))]


# --------------------------------------------------------------------------------------------------
# 4. One writer per artifact


def test_a_second_writer_of_one_artifact_is_refused_naming_the_holder(full_run):
    run, before = full_run
    first = StageWriter(run, "decode/x", stage="decode", params={}, resumable=True)
    with first as out:
        out.path("shard-0.parquet").write_bytes(b"one")
        with pytest.raises(IgdrecError) as caught:
            with StageWriter(run, "decode/x", stage="decode", params={"other": 1}, resumable=True):
                pass
        assert str(caught.value) == (f"decode/x: igdrec pid {os.getpid()} is writing it now (lock {first.lock_path}); "
                                     "wait for it to finish, or stop it, and rerun")
        assert out.path("shard-0.parquet").read_bytes() == b"one"  # the refused writer touched nothing
        with StageWriter(run, "decode/y", stage="decode", params={}):  # another artifact is not blocked
            pass
    assert run.manifest("decode/x")["outputs"]["shard-0.parquet"]["bytes"] == 3
    assert not list((run.root / ".partial").iterdir())  # lock released and removed
    with StageWriter(run, "decode/x", stage="decode", params={"again": 1}):  # and free again
        pass


HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {src!r})
    from igdrec.config import DecodeConfig
    from igdrec.rundir import RunDir
    from igdrec.stages import decode

    real = decode._decode
    def held(*args, **kwargs):
        Path({ready!r}).write_text("in")
        while not Path({go!r}).exists():
            time.sleep(0.05)
        return real(*args, **kwargs)
    decode._decode = held
    decode.run(DecodeConfig(model={model!r}, name="same", limit=3, num_beams=2, device="cpu"), RunDir({run!r}))
    """
)


def test_two_decodes_of_one_name_started_together(tmp_path):
    """The second refuses at once with one line naming the first's pid; the first finishes and publishes."""
    model_dir = save_peaked_model(tmp_path / "model")
    run = synthetic_run(tmp_path / "run")
    publish_ig(run, load_tokenizer(str(model_dir)), str(model_dir))
    ready, go = tmp_path / "ready", tmp_path / "go"
    script = HOLD.format(src=SRC, ready=str(ready), go=str(go), model=str(model_dir), run=str(run.root))
    first = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "IGDREC_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first decode never started"
            time.sleep(0.05)
        result = CliRunner().invoke(app, ["decode", "--model", str(model_dir), "--name", "same", "--limit", "3",
                                          "--num-beams", "2", "--device", "cpu", "--run-dir", str(run.root)])
        one_line_error(result, f"decode/same: igdrec pid {first.pid} is writing it now", "wait for it to finish")
    finally:
        go.write_text("go")
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    manifest = run.manifest("decode/same")
    assert manifest is not None and manifest["stats"]["n_samples"] == 3
    assert not list((run.root / ".partial").iterdir())


# --------------------------------------------------------------------------------------------------
# 5. A full disk


def no_space(*args, **kwargs):
    raise pl.exceptions.ComputeError("parquet: File out of specification: underlying IO error: No space left on device (os error 28)")


def test_a_full_disk_while_writing_is_one_line_and_publishes_nothing(full_run, monkeypatch):
    run, before = full_run
    monkeypatch.setattr(pl.DataFrame, "write_parquet", no_space)
    result = CliRunner().invoke(app, ["metrics", "--rerank", "a", "--name", "m2", "--ks", "1", "--run-dir", str(run.root)])
    one_line_error(result, f"metrics/m2: no space left on the device of {run.root} while writing it; nothing was published")
    assert not run.stage_dir("metrics/m2").exists() and not (run.root / "metrics" / "m2.json").exists()
    assert not list((run.root / ".partial").iterdir())
    assert finished(run) == before


def test_a_full_disk_at_publish_keeps_the_previous_artifact(full_run, monkeypatch):
    run, before = full_run

    def manifest_fails(path, obj):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(rundir, "write_json_atomic", manifest_fails)
    with pytest.raises(IgdrecError, match=r"^rerank/a: no space left on the device of .* nothing was published"):
        with StageWriter(run, "rerank/a", stage="rerank", params={"new": 1}, force=True) as out:
            out.path("topk.parquet").write_bytes(b"new")
    assert finished(run) == before  # the old rerank/a still verifies
    assert not list((run.root / ".partial").iterdir())


def test_a_full_disk_in_a_resumable_stage_keeps_its_finished_part(full_run):
    run, _ = full_run
    with pytest.raises(IgdrecError, match="its finished part stays in .* for a rerun"):
        with StageWriter(run, "decode/big", stage="decode", params={}, resumable=True) as out:
            out.path("shard-0.parquet").write_bytes(b"done")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    (partial,) = [p for p in (run.root / ".partial").iterdir()]
    assert (partial / "shard-0.parquet").read_bytes() == b"done" and run.manifest("decode/big") is None


def test_a_full_disk_in_a_loose_write_names_the_file(tmp_path):
    def fails(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(IgdrecError, match=r"out.json: no space left on the device; the file was left as it was"):
        rundir.atomic_write(tmp_path / "out.json", fails)
    assert not list(tmp_path.iterdir())


def test_other_failures_are_not_mistaken_for_a_full_disk(full_run):
    run, _ = full_run
    with pytest.raises(ValueError, match="os error 2"):
        with StageWriter(run, "rerank/z", stage="rerank", params={}):
            raise ValueError("No such file or directory (os error 2)")
    assert not rundir.disk_full(OSError(errno.EACCES, "denied"))
    assert rundir.disk_full(OSError(errno.EDQUOT, "quota"))
