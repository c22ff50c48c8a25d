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


def popularity_run(tmp_path, tokenizer):
    """Five titles (ids 1 and 4 share "Heat"); 8 training targets: Toy Story 4, Heat 1 + 2 (pooled: 3), Fargo 1,
    GoldenEye and Copycat never. The head (20% of 5 titles) is Toy Story alone."""
    from fixtures import write_data_stage

    items = pl.DataFrame({"item_id": [0, 1, 2, 3, 4, 5], "title": ["Toy Story", "Heat", "Fargo", "GoldenEye", "Heat ", "Copycat"]})
    train_targets = [0, 0, 0, 0, 1, 4, 4, 2]

    def samples(targets):
        return pl.DataFrame({"sample_id": list(range(len(targets))), "user_id": [str(i) for i in range(len(targets))],
                             "history_item_ids": [[5]] * len(targets), "item_id": targets, "timestamp": list(range(len(targets)))})

    run = write_data_stage(tmp_path / "run", items, {"train": samples(train_targets), "valid": samples([2]), "test": samples([3, 2])})
    publish_ig(run, tokenizer, "tiny")
    return run


def test_popularity_by_hand_on_a_hand_built_training_table(tmp_path, tiny_tokenizer):
    run = popularity_run(tmp_path, tiny_tokenizer)
    publish_rerank(run, "popular", {0: [0], 1: [0]}, limit=None)  # every recommended item is the most popular one
    metrics_stage.run(MetricsConfig(rerank="popular", ks=[1]), run)
    pop = json.loads((run.root / "metrics" / "popular.json").read_text())["popularity"]
    assert (pop["average_popularity"], pop["long_tail_share"], pop["unseen_share"]) == (4.0, 0.0, 0.0)
    assert pop["novelty"] == pytest.approx(-math.log2(4 / 8)) and (pop["head_items"], pop["items"]) == (1, 5)

    publish_rerank(run, "mixed", {0: [4, 3], 1: [2]}, limit=None)  # Heat by its second id, GoldenEye never trained
    metrics_stage.run(MetricsConfig(rerank="mixed", ks=[1]), run)
    pop = json.loads((run.root / "metrics" / "mixed.json").read_text())["popularity"]
    assert pop["average_popularity"] == pytest.approx(((3 + 0) / 2 + 1) / 2)
    assert pop["long_tail_share"] == 1.0 and pop["unseen_share"] == pytest.approx(0.25)
    novelty = [(-math.log2(3 / 8) - math.log2(1 / 8)) / 2, -math.log2(1 / 8)]  # unseen GoldenEye counts as seen once
    assert pop["novelty"] == pytest.approx(sum(novelty) / 2)
    per_sample = pl.read_parquet(run.artifact("metrics/mixed", "per_sample.parquet")).sort("sample_id")
    assert per_sample["novelty"].to_list() == pytest.approx(novelty)

    all_head = metrics_stage.run(MetricsConfig(rerank="mixed", name="mixed-all", ks=[1], head_share=1.0), run)
    assert all_head["params"]["head_share"] == 1.0  # a key option off its default
    pop = json.loads((run.root / "metrics" / "mixed-all.json").read_text())["popularity"]
    assert pop["long_tail_share"] == pytest.approx((0.5 + 0) / 2) and pop["head_items"] == 3  # the three seen titles

    publish_rerank(run, "stray", {0: [9]}, limit=None)
    with pytest.raises(IgdrecError, match=r"topk.parquet: item 9 is not in the catalog \(data/items.parquet\)$"):
        metrics_stage.run(MetricsConfig(rerank="stray", ks=[1]), run)


def test_a_baseline_and_a_rerank_with_the_same_lists_get_the_same_popularity(tmp_path, tiny_tokenizer):
    run = popularity_run(tmp_path, tiny_tokenizer)
    lists = {0: [4, 3], 1: [2, 0]}
    publish_rerank(run, "llm", lists, limit=None)
    rows = [(s, r, i, -float(r)) for s, items in lists.items() for r, i in enumerate(items)]
    with StageWriter(run, "baseline/same", stage="baseline", params={"model": "pop", "top_k": 2}) as out:
        schema.conform(pl.DataFrame(rows, schema=["sample_id", "rank", "item_id", "score"], orient="row"), "topk").write_parquet(out.path("topk.parquet"))
        out.stats = {"split": "test"}
    metrics_stage.run(MetricsConfig(rerank="llm", ks=[1]), run)
    metrics_stage.run(MetricsConfig(baseline="same", ks=[1]), run)
    llm, baseline = (json.loads((run.root / "metrics" / f"{n}.json").read_text())["popularity"] for n in ("llm", "same"))
    assert llm == baseline and llm["average_popularity"] == pytest.approx((1.5 + 2.5) / 2)
    columns = ["average_popularity", "long_tail_share", "novelty", "unseen_share"]
    frames = [pl.read_parquet(run.artifact(f"metrics/{n}", "per_sample.parquet")).sort("sample_id").select(columns) for n in ("llm", "same")]
    assert frames[0].equals(frames[1])
    result = metrics_stage.compare(["llm", "same"], run, bootstrap=20)
    assert result["novelty"]["diff"] == 0.0 and result["long_tail_share"]["A"] == pytest.approx(0.75)

    publish_rerank(run, "one-list", {0: [0]}, limit=None)  # sample 1 has no list: its popularity pairs with nothing
    metrics_stage.run(MetricsConfig(rerank="one-list", ks=[1]), run)
    result = metrics_stage.compare(["llm", "one-list"], run, bootstrap=20)
    assert result["novelty"]["samples"] == 1 and result["HR@1"]["samples"] == 2
    assert result["novelty"]["A"] == pytest.approx((-math.log2(3 / 8) - math.log2(1 / 8)) / 2) and result["novelty"]["B"] == pytest.approx(1.0)


def test_cli_prints_popularity_and_says_when_a_cached_result_predates_it(tmp_path, tiny_tokenizer):
    from typer.testing import CliRunner

    from igdrec.cli import app
    from igdrec.rundir import fingerprint_file, manifest_digest

    run = popularity_run(tmp_path, tiny_tokenizer)
    publish_rerank(run, "mixed", {0: [4, 3], 1: [2]}, limit=None)
    args = ["metrics", "--rerank", "mixed", "--ks", "1", "--run-dir", str(run.root)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    line = " ".join(result.output.split())  # rich wraps the long line
    assert "popularity of the top-10 lists: mean training frequency 1.25, long-tail share 1.0000 (head: the 1 most frequent of 5 items)" in line

    summary_path = run.artifact("metrics/mixed", "metrics.json")  # what a result computed before igdrec measured popularity holds
    summary_path.write_text(json.dumps({k: v for k, v in json.loads(summary_path.read_text()).items() if k != "popularity"}))
    manifest_path = summary_path.parent / "stage.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["outputs"]["metrics.json"] |= {"bytes": summary_path.stat().st_size, "fingerprint": fingerprint_file(summary_path)}
    manifest["digest"] = manifest_digest(manifest)
    manifest_path.write_text(json.dumps(manifest))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    line = " ".join(result.output.split())
    assert "cached" in line and "popularity: not in this result (computed before igdrec measured it; rerun with --force)" in line
