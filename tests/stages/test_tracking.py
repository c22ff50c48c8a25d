"""--report-to: the curves and results of sft, baseline and metrics, read back from TensorBoard's event files
and a W&B offline run; a missing backend is a one-line error; the option is in no cache key."""

from __future__ import annotations

import json
import sys

import numpy as np
import polars as pl
import pytest
from cli_helpers import one_line_error
from decode_helpers import publish_ig
from fixtures import synthetic_run
from ig_helpers import publish_ig_stage
from typer.testing import CliRunner

from igdrec import options, schema, tracking
from igdrec.cli import app
from igdrec.config import BaselineConfig, MetricsConfig, SFTConfig
from igdrec.errors import IgdrecError
from igdrec.modeling import load_tokenizer
from igdrec.runner import plan_stage
from igdrec.stages import baseline as baseline_stage
from igdrec.stages import metrics as metrics_stage


def read_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the event files of `directory`, by TensorBoard's own reader: tag -> [(step, value)]."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.SCALARS: 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def f32(value: float) -> float:
    """A value as TensorBoard stores it (float32)."""
    return float(np.float32(value))


def test_sft_tensorboard_curves_are_the_train_log(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    run = synthetic_run(tmp_path / "run")
    publish_ig_stage(run, load_tokenizer(str(tiny_model_dir)), str(tiny_model_dir))
    args = ["sft", "--model", str(tiny_model_dir), "--sample", "24", "--valid-sample", "8", "--batch-size", "8",
            "--micro-batch-size", "4", "--warmup-steps", "1", "--epochs", "2", "--lr", "1e-3", "--log-every", "2",
            "--name", "tb", "--report-to", "tensorboard", "--run-dir", str(run.root)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    stage = run.stage_dir("sft/tb")
    log = schema.read(stage / "train_log.parquet", "train_log")
    train, valid = log.filter(pl.col("split") == "train"), log.filter(pl.col("split") == "valid")
    assert train["step"].to_list() == [2, 3, 4, 6] and valid.height == 2  # every 2nd step and each epoch end (3 steps)
    scalars = read_scalars(run.root / "tracking" / "sft-tb")
    for split, rows in (("train", train), ("valid", valid)):
        for column in ("loss", "ce_zero_ig", "ce_low_ig", "ce_high_ig", "ce_positive_ig"):
            expected = [(s, f32(v)) for s, v in zip(rows["step"], rows[column]) if v is not None]
            assert scalars[f"{split}/{column}"] == expected, (split, column)
    assert scalars["train/lr"] == [(s, f32(v)) for s, v in zip(train["step"], train["lr"])]
    assert scalars["train/target_tokens_per_second"] == [
        (s, f32(t / sec)) for s, t, sec in zip(train["step"], train["tokens"], train["seconds"])]
    # the computed tokens of the logged intervals add up to the run's (stats)
    computed = sum(v * sec for (_, v), sec in zip(scalars["train/computed_tokens_per_second"], train["seconds"]))
    stats = json.loads((stage / "stage.json").read_text())["stats"]
    assert computed == pytest.approx(stats["computed_tokens"], rel=1e-5)
    on_cuda = stats["device"].startswith("cuda")  # MFU needs the device's measured peak rate
    assert ("train/mfu" in scalars) == on_cuda and ("summary/mfu" in scalars) == on_cuda and "valid/lr" not in scalars
    assert scalars["summary/best_valid_loss"] == [(0, f32(stats["best_valid_loss"]))]
    assert scalars["summary/steps"] == [(0, 6.0)]

    again = CliRunner().invoke(app, args[:-4] + ["--report-to", "none", "--run-dir", str(run.root)])
    assert again.exit_code == 0 and "cached" in again.output


def test_baseline_and_metrics_tensorboard_results(tmp_path, tiny_tokenizer):
    pytest.importorskip("tensorboard")
    run = synthetic_run(tmp_path / "run", n_users=60)
    publish_ig(run, tiny_tokenizer, "tiny")
    baseline_stage.run(BaselineConfig(model="sasrec", epochs=3, batch_size=64, top_k=5, report_to=["tensorboard"]), run)
    history = json.loads(run.artifact("baseline/sasrec", "training.json").read_text())["history"]
    scalars = read_scalars(run.root / "tracking" / "baseline-sasrec")
    assert scalars["train/loss"] == [(r["epoch"], f32(r["loss"])) for r in history]
    assert scalars["valid/NDCG@10"] == [(r["epoch"], f32(r["valid"])) for r in history]
    manifest = run.manifest("baseline/sasrec")
    assert scalars["summary/valid_NDCG@10"] == [(0, f32(manifest["stats"]["valid_NDCG@10"]))]

    metrics_stage.run(MetricsConfig(baseline="sasrec", ks=[1, 5], report_to=["tensorboard"]), run)
    summary = json.loads((run.root / "metrics" / "sasrec.json").read_text())
    scalars = read_scalars(run.root / "tracking" / "metrics-sasrec")
    for name in ("NDCG@1", "NDCG@5", "HR@1", "HR@5", "n_samples"):
        assert scalars[f"summary/{name}"] == [(0, f32(summary[name]))]
    for name, value in summary["diversity"].items():
        assert scalars[f"summary/diversity/{name}"] == [(0, f32(value))]


@pytest.fixture
def fresh_wandb():
    """wandb settles its settings (WANDB_MODE...) once per process: each test starts it anew."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()
    yield
    wandb.teardown()


def test_wandb_offline_writes_its_run_directory(tmp_path, tiny_tokenizer, monkeypatch, fresh_wandb):
    for variable in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written outside tmp_path
        monkeypatch.setenv(variable, str(tmp_path / variable.lower()))
    run = synthetic_run(tmp_path / "run", n_users=60)
    publish_ig(run, tiny_tokenizer, "tiny")
    baseline_stage.run(BaselineConfig(model="pop", top_k=5), run)
    metrics_stage.run(MetricsConfig(baseline="pop", ks=[1, 5], report_to=["tensorboard", "wandb"]), run)

    directory = run.root / "tracking" / "metrics-pop"
    offline = sorted((directory / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    records = list(offline[0].glob("run-*.wandb"))
    assert len(records) == 1
    data = records[0].read_bytes()  # protobuf records: strings are stored as they are
    for needle in (b"metrics-pop", b"NDCG@5", b"HR@1", b"diversity/item_coverage"):
        assert needle in data, needle
    assert "summary/NDCG@5" in read_scalars(directory)  # both backends at once


def test_wandb_without_an_account_is_a_one_line_error(tmp_path, tiny_tokenizer, monkeypatch, fresh_wandb):
    for variable in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a key
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / variable.lower()))
    run = synthetic_run(tmp_path / "run", n_users=60)
    publish_ig(run, tiny_tokenizer, "tiny")
    baseline_stage.run(BaselineConfig(model="pop", top_k=5), run)
    result = CliRunner().invoke(app, ["metrics", "--baseline", "pop", "--ks", "1,5", "--report-to", "tensorboard,wandb",
                                      "--run-dir", str(run.root)])
    one_line_error(result, "error: --report-to wandb: ", "API key", "(or set WANDB_MODE=offline to log locally)")
    assert not (run.root / "metrics").exists()


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_a_missing_backend_is_a_one_line_error_naming_the_extra(tmp_path, tiny_tokenizer, monkeypatch, backend):
    run = synthetic_run(tmp_path / "run", n_users=60)
    publish_ig(run, tiny_tokenizer, "tiny")
    baseline_stage.run(BaselineConfig(model="pop", top_k=5), run)
    monkeypatch.setitem(sys.modules, backend, None)  # `import backend` now raises ImportError
    result = CliRunner().invoke(app, ["metrics", "--baseline", "pop", "--ks", "1,5", "--report-to", backend, "--run-dir", str(run.root)])
    one_line_error(result, f"error: --report-to {backend} needs the {backend} package: pip install 'igdrec[{backend}]'")
    assert not (run.root / "metrics").exists() and not list((run.root / ".partial").glob("metrics*"))
    assert not (run.root / "tracking").exists()


def test_report_to_is_in_no_cache_key(tmp_path, tiny_tokenizer):
    run = synthetic_run(tmp_path / "run", n_users=60)
    publish_ig(run, tiny_tokenizer, "tiny")
    baseline_stage.run(BaselineConfig(model="pop", top_k=5), run)
    for cls in (SFTConfig, BaselineConfig, MetricsConfig):
        assert options.key_params(cls()) == options.key_params(cls(report_to=["tensorboard", "wandb"]))
    plans = [plan_stage("metrics", MetricsConfig(baseline="pop", report_to=r), run) for r in (["none"], ["tensorboard"], ["wandb"])]
    assert len({p.key for p in plans}) == 1
    baseline_plans = [plan_stage("baseline", BaselineConfig(model="pop", top_k=5, report_to=r), run) for r in (["none"], ["wandb"])]
    assert len({p.key for p in baseline_plans}) == 1

    first = CliRunner().invoke(app, ["metrics", "--baseline", "pop", "--run-dir", str(run.root)])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, ["metrics", "--baseline", "pop", "--report-to", "tensorboard", "--run-dir", str(run.root)])
    assert again.exit_code == 0 and "cached" in again.output
    assert not (run.root / "tracking").exists()  # a cached stage computed nothing, so it logs nothing


def test_report_to_values_repeated_or_comma_separated(tmp_path):
    given = options.apply_cli(MetricsConfig(), {"report_to": "wandb,tensorboard,wandb"}, "metrics")
    assert given.report_to == ["tensorboard", "wandb"]
    with pytest.raises(IgdrecError, match=r"--report-to none,tensorboard: none means no tracking; give it alone or drop it"):
        options.apply_cli(MetricsConfig(), {"report_to": "none,tensorboard"}, "metrics")
    with pytest.raises(IgdrecError, match=r"--report-to 'tensorbord': expected one of none, tensorboard, wandb \(did you mean 'tensorboard'\?\)"):
        options.apply_cli(SFTConfig(), {"report_to": "tensorbord"}, "sft")
    # repeated flags arrive together (here refused together, before any run directory is read)
    result = CliRunner().invoke(app, ["metrics", "--baseline", "pop", "--report-to", "tensorboard", "--report-to", "none",
                                      "--run-dir", str(tmp_path / "run")])
    one_line_error(result, "--report-to none,tensorboard: none means no tracking")
    result = CliRunner().invoke(app, ["baseline", "--report-to", "mlflow", "--run-dir", str(tmp_path / "run")])
    one_line_error(result, "--report-to 'mlflow': expected one of none, tensorboard, wandb")


def test_step_scalars_rate_each_logged_interval_by_hand():
    """Throughput per logged interval, from the running counts of `StepDone`: a 4×4 linear layer whose
    weights train costs 3 × (2 · 16 FLOPs per token + attention); two ranks, a peak of 1 TFLOP/s."""
    torch = pytest.importorskip("torch")
    from igdrec.training import StepDone, TrackedScalars

    tracked = TrackedScalars(torch.nn.Linear(4, 4), world_size=2, peak=1e12)
    row = dict(ce_zero_ig=None, ce_low_ig=0.5, ce_high_ig=1.5, ce_positive_ig=1.0)
    first = tracked(StepDone(2, 6, [dict(row, step=2, split="train", loss=2.0, lr=1e-3, tokens=8, seconds=2.0)], 10, 100.0))
    assert first == {"train/loss": 2.0, "train/ce_low_ig": 0.5, "train/ce_high_ig": 1.5, "train/ce_positive_ig": 1.0,
                     "train/lr": 1e-3, "train/target_tokens_per_second": 4.0, "train/computed_tokens_per_second": 10.0,
                     "train/model_tflops_per_second": 3 * (2 * 16 * 10 + 100) / 2 / 1e12, "train/mfu": 630 / 1e12}
    second = tracked(StepDone(4, 6, [dict(row, step=4, split="train", loss=1.0, lr=5e-4, tokens=6, seconds=3.0),
                                     dict(row, step=4, split="valid", loss=1.2, lr=5e-4, tokens=9, seconds=0.5)], 25, 250.0))
    assert second["train/computed_tokens_per_second"] == 15 * 2 / 3  # the 15 tokens since the first row
    assert second["train/mfu"] == pytest.approx(3 * (2 * 16 * 15 + 150) / 3 / 1e12)
    assert second["valid/loss"] == 1.2 and "valid/lr" not in second and "valid/computed_tokens_per_second" not in second
    assert tracked(StepDone(5, 6, [], 30, 300.0)) == {}  # a step that logged nothing


def test_scalars_keep_finite_numbers_and_flatten_dicts():
    values = {"loss": 1.5, "n": 3, "flag": True, "missing": None, "nan": float("nan"), "name": "x",
              "diversity": {"coverage": 0.25, "deep": {"x": 2}}, "steps": [1, 2]}
    assert tracking.scalars(values, "train") == {"train/loss": 1.5, "train/n": 3.0, "train/diversity/coverage": 0.25,
                                                 "train/diversity/deep/x": 2.0}
