"""Metrics against hand-computed values; the metrics stage and --compare on hand-made reranks."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
from decode_helpers import publish_ig
from fixtures import synthetic_run

from igdrec import metrics as M
from igdrec import schema
from igdrec.config import MetricsConfig
from igdrec.errors import IgdrecError
from igdrec.ig import build_catalog_trie
from igdrec.rundir import StageWriter
from igdrec.stages import metrics as metrics_stage


def test_ranks_match_stripped_titles_and_any_id_of_a_title():
    predicted = [["A", "B ", "C"], ["X", "Y"], [" Fargo", "Z"], []]
    targets = ["B", "Q", "Fargo ", "A"]
    ranks = M.match_ranks(predicted, targets)
    assert ranks.tolist() == [1, -1, 0, -1]
    values = M.ranking_metrics(ranks, [1, 3])
    assert values["HR@1"].tolist() == [0, 0, 1, 0]
    assert values["HR@3"].tolist() == [1, 0, 1, 0]
    np.testing.assert_allclose(values["NDCG@3"], [1 / math.log2(3), 0, 1, 0])
    np.testing.assert_allclose(values["NDCG@1"], [0, 0, 1, 0])
    assert values["NDCG@3"].mean() == pytest.approx((1 / math.log2(3) + 1) / 4)


def test_diversity_by_hand():
    lists = [[0, 1], [1, 2], [3]]
    first_token = {0: 5, 1: 5, 2: 6, 3: 7}
    got = M.diversity(lists, first_token, catalog_size=8)
    p = np.array([1, 2, 1, 1]) / 5
    assert got["item_coverage"] == pytest.approx(4 / 8)
    assert got["same_first_token_share"] == pytest.approx(2 / 3)  # [0, 1] and [3]
    assert got["recommended_item_entropy"] == pytest.approx(float(-(p * np.log(p)).sum()))


def test_entropy_per_step_by_hand():
    # eos = 0; item 0: [5, 6, 0], item 1: [5, 7, 0], item 2: [8, 0]; p_r = 1/2, 1/4, 1/4
    trie = build_catalog_trie([0, 1, 2], [[5, 6, 0], [5, 7, 0], [8, 0]], [2, 1, 1])
    h = lambda *ps: -sum(p * math.log(p) for p in ps)  # noqa: E731
    got = M.entropy_per_step(trie, predicted=[[0, 2], [1]], targets=[2, 0])
    assert got["step"] == [1, 2, 3]
    np.testing.assert_allclose(got["predicted"][:2], [(h(.5, .25) * 2 + h(.25)) / 3, (h(.5) + h(.25) + h(.25)) / 3])
    assert got["predicted"][2] == pytest.approx((h(.5) + h(.25)) / 2)
    assert got["predicted_count"] == [3, 3, 2]
    np.testing.assert_allclose(got["ground_truth"], [(h(.25) + h(.5, .25)) / 2, (h(.25) + h(.5)) / 2, h(.5)])


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    a = rng.random(200)
    diff, lo, hi = M.paired_bootstrap(a, a + 0.1, resamples=300, seed=0)
    assert (diff, lo, hi) == pytest.approx((0.1, 0.1, 0.1))
    b = a + rng.normal(0.05, 0.2, size=200)
    diff, lo, hi = M.paired_bootstrap(a, b, resamples=500, seed=0)
    assert lo < diff < hi and diff == pytest.approx(float((b - a).mean()))
    se = float((b - a).std() / np.sqrt(200))
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.25)
    assert M.paired_bootstrap(a, b, 500, seed=0) == M.paired_bootstrap(a, b, 500, seed=0)


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
