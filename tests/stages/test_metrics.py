"""The metrics stage and --compare on hand-made reranks."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest
from decode_helpers import publish_ig
from fixtures import synthetic_run

from igdrec import schema
from igdrec.config import MetricsConfig
from igdrec.errors import IgdrecError
from igdrec.rundir import StageWriter
from igdrec.stages import metrics as metrics_stage


def publish_rerank(run, name: str, lists: dict[int, list[int]], limit: int | None):
    with StageWriter(run, f"decode/{name}", stage="decode", params={"split": "test", "limit": limit}) as out:
        out.path("beams.parquet").write_bytes(b"unused")
    rows = [(s, r, i, -float(r)) for s, items in lists.items() for r, i in enumerate(items)]
    topk = schema.conform(pl.DataFrame(rows, schema=["sample_id", "rank", "item_id", "score"], orient="row"), "topk")
    with StageWriter(run, f"rerank/{name}", stage="rerank", params={"decode": name}) as out:
        topk.write_parquet(out.path("topk.parquet"))


def test_metrics_stage_counts_every_decoded_sample_and_compares(tmp_path, tiny_tokenizer):
    run = synthetic_run(tmp_path / "run")
    publish_ig(run, tiny_tokenizer, "tiny")
    test = schema.read(run.artifact("data", "test.parquet"), "samples").sort("sample_id").head(4)
    targets = test["item_id"].to_list()
    other = lambda t: 2 if t != 2 else 3  # noqa: E731 - an item that is not the target (distinct title)
    fargo = {12: 15, 15: 12}  # the two ids of "Fargo (1996)": predicting either one is a hit
    lists = {
        test["sample_id"][0]: [other(targets[0]), fargo.get(targets[0], targets[0])],  # rank 1
        test["sample_id"][1]: [targets[1]],  # rank 0
        test["sample_id"][2]: [other(targets[2])],  # miss; sample 3 has no list at all
    }
    publish_rerank(run, "a", lists, limit=4)
    manifest = metrics_stage.run(MetricsConfig(rerank="a", ks=[1, 5]), run)
    summary = json.loads((run.root / "metrics" / "a.json").read_text())
    assert summary["n_samples"] == 4 and summary["limited"] is True
    assert summary["HR@1"] == pytest.approx(1 / 4)
    assert summary["HR@5"] == pytest.approx(2 / 4)
    assert summary["NDCG@5"] == pytest.approx((1 / math.log2(3) + 1) / 4)
    assert manifest["stats"]["NDCG@5"] == summary["NDCG@5"]
    assert len(summary["entropy_per_step"]["predicted"]) == len(summary["entropy_per_step"]["step"])

    publish_rerank(run, "b", {s: [targets[i]] for i, s in enumerate(test["sample_id"])}, limit=4)
    metrics_stage.run(MetricsConfig(rerank="b", ks=[1, 5]), run)
    result = metrics_stage.compare(["a", "b"], run, bootstrap=200)
    assert result["HR@1"]["A"] == pytest.approx(0.25) and result["HR@1"]["B"] == pytest.approx(1.0)
    assert result["HR@1"]["diff"] == pytest.approx(0.75)
    assert result["HR@1"]["ci_low"] <= 0.75 <= result["HR@1"]["ci_high"]

    publish_rerank(run, "c", {test["sample_id"][0]: [targets[0]]}, limit=2)
    metrics_stage.run(MetricsConfig(rerank="c"), run)
    with pytest.raises(IgdrecError, match="other samples"):
        metrics_stage.compare(["a", "c"], run, bootstrap=10)
    with pytest.raises(IgdrecError, match="exactly two"):
        metrics_stage.compare(["a"], run)


def test_cli_compare_takes_two_names_after_the_flag(tmp_path, tiny_tokenizer):
    from typer.testing import CliRunner

    from igdrec.cli import app

    run = synthetic_run(tmp_path / "run")
    publish_ig(run, tiny_tokenizer, "tiny")
    test = schema.read(run.artifact("data", "test.parquet"), "samples").sort("sample_id").head(3)
    publish_rerank(run, "a", {s: [t] for s, t in zip(test["sample_id"], test["item_id"])}, limit=3)
    publish_rerank(run, "b", {s: [] for s in test["sample_id"]}, limit=3)
    for name in ("a", "b"):
        metrics_stage.run(MetricsConfig(rerank=name, ks=[1]), run)
    runner = CliRunner()
    ok = runner.invoke(app, ["metrics", "--compare", "a", "b", "--bootstrap", "50", "--run-dir", str(run.root)])
    assert ok.exit_code == 0, ok.output
    assert "HR@1" in ok.output
    stray = runner.invoke(app, ["metrics", "a", "b", "--run-dir", str(run.root)])
    assert stray.exit_code != 0 and "--compare" in stray.output
