"""`igdrec ls`: a run built by the real stages (tiny inputs, the tiny Llama) is listed artifact by artifact,
with the runner's own cache test as the reference for done and stale; partial and broken artifacts, a grid's
run root, --json and the command's imports."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import one_line_error
from preprocess_inputs import write_d3_inputs
from typer.testing import CliRunner

from igdrec import listing, runner
from igdrec.cli import app
from igdrec.config import (BaselineConfig, DecodeConfig, IGIndexConfig, MetricsConfig, PreprocessConfig, RerankConfig,
                           SFTConfig)
from igdrec.listing import BROKEN, DONE, PARTIAL_STATUS, STALE
from igdrec.rundir import MANIFEST, RunDir, StageWriter, manifest_digest, manifest_fingerprint

SRC = str(Path(__file__).resolve().parents[2] / "src")


def pipeline(inputs: Path, model: str) -> dict[str, tuple[str, object]]:
    """stage path -> (stage, config) of every artifact the fixture run holds, in the order they are made."""
    inputs.mkdir()
    files = write_d3_inputs(inputs)
    return {
        "data": ("preprocess", PreprocessConfig(source="d3-csv", **files)),
        "ig": ("build-ig-index", IGIndexConfig(model=model, smoothing=0.5)),
        "baseline/pop": ("baseline", BaselineConfig(model="pop", top_k=3)),
        "sft/s": ("sft", SFTConfig(model=model, name="s", max_steps=1, batch_size=2, micro_batch_size=2, valid_sample=0,
                                   warmup_steps=0, epochs=1)),
        "decode/d": ("decode", DecodeConfig(sft="s", name="d", num_beams=3)),
        "rerank/d": ("rerank", RerankConfig(decode="d", name="d", top_k=3)),
        "metrics/d": ("metrics", MetricsConfig(rerank="d", ks=[1, 3])),
        "metrics/pop": ("metrics", MetricsConfig(baseline="pop")),
    }


def build(run: RunDir, steps: dict) -> None:
    for stage, config in steps.values():
        runner.run_stage(stage, config, run)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    """A finished run of every stage (made once), and the configs that made it."""
    root = tmp_path_factory.mktemp("ls")
    steps = pipeline(root / "inputs", str(tiny_model_dir))
    run = RunDir(root / "run")
    build(run, steps)
    return run, steps


@pytest.fixture
def run(built, tmp_path):
    """A copy of the finished run that a test may change."""
    source, steps = built
    copy = RunDir(tmp_path / "run")
    shutil.copytree(source.root, copy.root, symlinks=True)
    return copy, steps


def cached(run: RunDir, steps: dict) -> dict[str, bool]:
    """The runner's own answer per artifact: would running its config find it cached?"""
    return {path: runner.is_cached(runner.plan_stage(stage, config, run)) for path, (stage, config) in steps.items()}


def remade(run: RunDir, steps: dict) -> dict[str, bool]:
    """The reference for stale: which artifacts running the pipeline again makes anew (their key changes)."""
    before = {path: run.manifest(path)["key"] for path in steps}
    build(run, steps)
    return {path: run.manifest(path)["key"] != key for path, key in before.items()}


def by_path(rows) -> dict[str, listing.Artifact]:
    return {row.path: row for row in rows}


def ls(*args):
    return CliRunner().invoke(app, ["ls", *map(str, args)])


# --------------------------------------------------------------------------------------------------
# A finished run, and the same run after its data changed


def test_a_finished_run_lists_every_artifact_done_with_its_parameters_time_and_metrics(run):
    run, steps = run
    rows = by_path(listing.list_runs(run.root))
    assert list(rows) == list(steps)  # pipeline order: baseline before sft, as config.STAGE_ORDER
    assert cached(run, steps) == dict.fromkeys(steps, True)
    for path, (stage, _) in steps.items():
        manifest = run.manifest(path)
        row = rows[path]
        assert (row.stage, row.status, row.note, row.wall_time_s) == (stage, DONE, "", manifest["wall_time_s"])
        assert row.name == ("" if path in ("data", "ig") else path.split("/")[1])
    # Only what the configs above set away from the defaults (and category_word, which preprocess resolves
    # per dataset); never a parameter the stage resolved itself (decode's `source`, the tokenizer's identity).
    assert rows["data"].params == {"source": "d3-csv", "category_word": "items"}
    assert rows["ig"].params == {"model": steps["ig"][1].model, "smoothing": 0.5}
    assert rows["baseline/pop"].params == {"model": "pop", "top_k": 3}
    assert rows["sft/s"].params == {"model": steps["sft/s"][1].model, "max_steps": 1, "batch_size": 2,
                                    "micro_batch_size": 2, "valid_sample": 0, "warmup_steps": 0, "epochs": 1}
    assert rows["decode/d"].params == {"sft": "s", "num_beams": 3}
    assert rows["rerank/d"].params == {"decode": "d", "top_k": 3}
    assert rows["metrics/d"].params == {"rerank": "d", "ks": [1, 3]}
    assert rows["metrics/pop"].params == {"baseline": "pop", "ks": [1, 3]}  # K beyond the 3-item lists dropped
    # Headline metrics: at diversity_k (10) where the result has it, else at its largest K (3-item lists).
    for path, k in (("metrics/d", 3), ("metrics/pop", 3)):
        stats = run.manifest(path)["stats"]
        assert rows[path].metrics == {f"NDCG@{k}": stats[f"NDCG@{k}"], f"HR@{k}": stats[f"HR@{k}"]}
    assert all(not row.metrics for path, row in rows.items() if not path.startswith("metrics/"))


def test_new_data_marks_every_artifact_made_from_the_old_data_stale(run, tmp_path):
    run, steps = run
    test = tmp_path / "test.csv"
    test.write_text(Path(steps["data"][1].test).read_text().replace(",400", ",401"))  # one timestamp: new data
    steps = steps | {"data": ("preprocess", dataclasses.replace(steps["data"][1], test=str(test)))}
    runner.run_stage("preprocess", steps["data"][1], run)
    rows = by_path(listing.list_runs(run.root))
    assert {path: rows[path].status for path in steps} == {path: STALE if new else DONE for path, new in remade(run, steps).items()}
    assert rows["data"].status == DONE and all(rows[path].status == STALE for path in steps if path != "data")
    assert rows["ig"].note == "its data input changed since it was made"
    assert rows["rerank/d"].note == "its decode input (decode/d) is stale"  # its own input is the same decode


def test_a_new_ig_index_leaves_what_does_not_read_it_done(run):
    run, steps = run
    steps = steps | {"ig": ("build-ig-index", IGIndexConfig(model=steps["ig"][1].model))}  # smoothing back to 0
    runner.run_stage(*steps["ig"], run)
    rows = by_path(listing.list_runs(run.root))
    assert {path: rows[path].status for path in steps} == {path: STALE if new else DONE for path, new in remade(run, steps).items()}
    assert [path for path, row in rows.items() if row.status == DONE] == ["data", "ig", "baseline/pop"]
    assert rows["metrics/pop"].note == "its ig input changed since it was made"  # metrics reads the catalog
    assert rows["ig"].params == {"model": steps["ig"][1].model}


# --------------------------------------------------------------------------------------------------
# Partial and broken artifacts


def test_an_interrupted_stage_is_partial(run):
    run, steps = run
    with pytest.raises(RuntimeError):
        with StageWriter(run, "decode/half", stage="decode", params={"x": 1}, resumable=True):
            raise RuntimeError("killed")  # a resumable stage keeps its work directory for the next run
    with pytest.raises(RuntimeError):
        with StageWriter(run, "sft/s", stage="sft", params={"x": 2}, resumable=True):
            raise RuntimeError("killed")
    lock = run.root / ".partial" / "rerank__running.lock"
    lock.write_text(f"igdrec pid {os.getpid()}")  # a live writer's lock (this process)
    (run.root / ".partial" / "rerank__killed.lock").write_text("igdrec pid 99999999999999999999")
    (run.root / ".partial" / "rerank__blank.lock").write_text("")
    (run.root / ".partial" / "notes.txt").write_text("not igdrec's")
    (run.root / ".partial" / "..__up-0123456789abcdef").mkdir()  # names no stage path
    rows = by_path(listing.list_runs(run.root))
    assert rows["decode/half"].status == PARTIAL_STATUS and rows["decode/half"].stage == "decode"
    assert rows["decode/half"].note.startswith("interrupted (work directory .partial/decode__half-")
    assert rows["rerank/running"].note == f"being written now by igdrec pid {os.getpid()}"
    assert rows["rerank/killed"].note == "interrupted (lock of igdrec pid 99999999999999999999, not running)"
    assert rows["rerank/blank"].note == "interrupted (lock of an unnamed process, not running)"
    assert set(rows) == set(steps) | {"decode/half", "rerank/running", "rerank/killed", "rerank/blank"}
    assert rows["sft/s"].status == DONE and rows["sft/s"].note.startswith("an unfinished rerun: interrupted")
    result = ls(run.root)
    assert result.exit_code == 0 and "partial" in result.output and "half" in result.output


def rewrite(path: Path, change) -> None:
    """Change a manifest and sign it again, as a hand-made one that passes the digest check would be."""
    manifest = json.loads(path.read_text())
    change(manifest)
    manifest["fingerprint"] = manifest_fingerprint(manifest)
    manifest["digest"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


def test_broken_artifacts_are_rows_with_one_line_reasons_never_a_crash(run, tmp_path, monkeypatch):
    run, steps = run
    root = run.root
    (root / "metrics" / "d" / MANIFEST).write_text("{not json")
    edited = json.loads((root / "metrics/pop" / MANIFEST).read_text()) | {"wall_time_s": 0}
    (root / "metrics/pop" / MANIFEST).write_text(json.dumps(edited))
    (root / "rerank/d/topk.parquet").write_bytes(b"changed")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("x")
    rewrite(root / "baseline/pop" / MANIFEST, lambda m: m["outputs"].update({"../../../outside/secret": {"bytes": 1, "fingerprint": "0"}}))
    shutil.copytree(root / "sft/s", root / "sft/odd")
    rewrite(root / "sft/odd" / MANIFEST, lambda m: m.update(params=["not", "a", "dict"]))
    shutil.copytree(root / "sft/s", root / "sft/nul")
    rewrite(root / "sft/nul" / MANIFEST, lambda m: m.update(outputs={"a\x00b": {"bytes": 1, "fingerprint": "0"}}))
    (root / "sft/link").symlink_to(outside, target_is_directory=True)
    (root / "decode/empty").mkdir()
    (root / "decode" / "evil\x1b[2J").mkdir()  # a name that would clear the screen
    (root / "decode/fifo").mkdir()
    os.mkfifo(root / "decode/fifo" / MANIFEST)  # reading it would wait for a writer forever
    (root / "decode/linked").mkdir()
    (root / "decode/linked" / MANIFEST).symlink_to(root / "decode/d" / MANIFEST)
    shutil.copytree(root / "sft/s", root / "sft/copy")  # the same bytes, one of them through a link out of the run
    shutil.move(root / "sft/copy/train_log.parquet", outside / "train_log.parquet")
    (root / "sft/copy/train_log.parquet").symlink_to(outside / "train_log.parquet")
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda file, *a, **k: opened.append(str(file)) or real_open(file, *a, **k))

    rows = by_path(listing.list_runs(root))
    assert not [p for p in opened if "outside" in p]  # no name in a manifest reaches out of its artifact
    expected = {
        "metrics/d": "metrics/d/stage.json is unreadable or not JSON",
        "metrics/pop": "metrics/pop/stage.json was changed after its stage wrote it (its content digest does not match)",
        "rerank/d": "rerank/d has no finished, intact artifacts (an output changed after the stage wrote it)",
        "baseline/pop": "baseline/pop has no finished, intact artifacts (an output changed after the stage wrote it)",
        "sft/odd": "stage.json: params is missing or not a dict",
        "sft/nul": "sft/nul has no finished, intact artifacts (an output changed after the stage wrote it)",
        "sft/link": f"sft/link is a symbolic link (to {outside}); not followed",
        "decode/empty": "no stage.json: not a finished artifact",
        "decode/evil\x1b[2J": "no stage.json: not a finished artifact",
        "decode/fifo": "stage.json is not a regular file",
        "decode/linked": "stage.json is a symbolic link; not followed",
        "sft/copy": "sft/copy has no finished, intact artifacts (an output changed after the stage wrote it)",
    }
    assert {path: (rows[path].status, rows[path].note) for path in expected} == {p: (BROKEN, n) for p, n in expected.items()}
    assert rows["metrics/d"].stage == "metrics" and rows["sft/link"].stage == "sft"
    assert rows["decode/d"].status == DONE  # its inputs are intact
    result = CliRunner().invoke(app, ["ls", str(root)], env={"COLUMNS": "300"})
    assert result.exit_code == 0 and result.output.count("│ broken ") == len(expected)
    assert "\x1b" not in result.output and "evil\\x1b[2J" in result.output  # shown escaped


# --------------------------------------------------------------------------------------------------
# --json, a grid's run root, bad arguments, imports


def test_json_round_trips(run):
    run, _ = run
    (run.root / ".partial").mkdir(exist_ok=True)
    (run.root / ".partial" / "decode__x-0123456789abcdef").mkdir()
    result = ls(run.root, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["run_dir"] == str(run.root)
    assert listing.from_json(result.output) == listing.list_runs(run.root)
    assert {row.status for row in listing.from_json(result.output)} == {DONE, PARTIAL_STATUS}


def test_a_grid_run_root_lists_each_datasets_run(built, tmp_path):
    source, _ = built
    root = tmp_path / "grid"
    shutil.copytree(source.root, root / "ds-a")
    shutil.copytree(source.root / "data", root / "ds-b" / "data")
    (root / "grid.json").write_text("{}")
    (root / "figures").mkdir()  # a report folder is no run
    rows = listing.list_runs(root)
    assert [(row.dataset, row.path) for row in rows] == [("ds-a", r.path) for r in listing.list_runs(root / "ds-a")] + [("ds-b", "data")]
    assert [row.status for row in rows if row.dataset == "ds-b"] == [DONE]
    result = CliRunner().invoke(app, ["ls", str(root)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "dataset" in result.output and "ds-b" in result.output


def test_bad_run_directories_are_one_line_errors(tmp_path):
    one_line_error(ls(tmp_path / "nowhere"), "nowhere: no such run directory")
    (tmp_path / "file").write_text("")
    one_line_error(ls(tmp_path / "file"), "file: not a directory")
    result = ls(tmp_path)  # nothing in it
    assert result.exit_code == 0 and "no artifacts" in result.output


def test_ls_imports_neither_torch_nor_polars(built):
    source, _ = built
    code = ("import sys; from igdrec.cli import app\n"
            f"try: app(['ls', {str(source.root)!r}, '--json'])\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'polars', 'transformers', 'numpy') if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC})
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "[]"
    assert len(json.loads(done.stdout)["artifacts"]) == 8
