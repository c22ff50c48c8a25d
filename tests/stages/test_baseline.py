"""The baseline stage: pop ranks by hand, the stage is deterministic, metrics score it, bad options fail."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import polars as pl
import pytest
import torch
from decode_helpers import publish_ig
from fixtures import TITLES, synthetic_run, write_data_stage

from igdrec import schema, seqrec
from igdrec.config import BaselineConfig, MetricsConfig
from igdrec.errors import IgdrecError
from igdrec.stages import baseline as baseline_stage
from igdrec.stages import metrics as metrics_stage


def hand_pop_lists(run, k: int) -> list[int]:
    """Most-popular list computed directly: train-target counts, ties by id, first id of each title."""
    train = pl.read_parquet(run.artifact("data", "train.parquet"))
    counts = Counter(train["item_id"].to_list())
    seen, ranked = set(), []
    for item in sorted(range(len(TITLES)), key=lambda i: (-counts[i], i)):
        if TITLES[item].strip() not in seen:
            seen.add(TITLES[item].strip())
            ranked.append(item)
    return ranked[:k]


def test_metrics_stage_scores_a_baseline_like_a_rerank(tmp_path, tiny_tokenizer):
    run = synthetic_run(tmp_path / "run", n_users=60)
    publish_ig(run, tiny_tokenizer, "tiny")
    manifest = baseline_stage.run(BaselineConfig(model="pop", top_k=5), run)
    assert manifest["stats"]["split"] == "test" and manifest["rows"]["topk"] > 0
    topk = schema.read(run.artifact("baseline/pop", "topk.parquet"), "topk")
    expected = hand_pop_lists(run, 5)
    test = pl.read_parquet(run.artifact("data", "test.parquet")).sort("sample_id")
    assert topk.height == 5 * test.height
    for _, rows in topk.sort(["sample_id", "rank"]).group_by("sample_id", maintain_order=True):
        assert rows["item_id"].to_list() == expected and rows["rank"].to_list() == list(range(5))

    summary = metrics_stage.run(MetricsConfig(baseline="pop", ks=[1, 5]), run)["stats"]
    ranks = []
    for target in test["item_id"]:
        titles = [TITLES[i] for i in expected]
        ranks.append(titles.index(TITLES[target]) if TITLES[target] in titles else None)
    hr5 = sum(r is not None for r in ranks) / len(ranks)
    ndcg5 = sum(1 / math.log2(r + 2) for r in ranks if r is not None) / len(ranks)
    assert summary["HR@5"] == pytest.approx(hr5) and summary["NDCG@5"] == pytest.approx(ndcg5)
    assert summary["HR@1"] == pytest.approx(sum(r == 0 for r in ranks) / len(ranks))
    written = json.loads((run.root / "metrics" / "pop.json").read_text())
    assert written["baseline"] == "pop" and written["n_samples"] == test.height and written["limited"] is False
    with pytest.raises(IgdrecError, match="one of them at a time"):
        metrics_stage.run(MetricsConfig(baseline="pop", rerank="x"), run)


def saved_probs(run, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(sample ids, dense probabilities over all item ids) of a split, from the baseline's saved model."""
    from igdrec.seqrec.evaluation import full_sort_scores

    model, max_len = seqrec.load_recommender(run.stage_dir(f"baseline/{name}"))
    data = seqrec.SequenceData.from_samples(schema.read(run.artifact("data", f"{split}.parquet"), "samples"), model.n_items, max_len)
    chunks = [model.item_probabilities(scores) for _, scores in full_sort_scores(model, data, 64, torch.device("cpu"))]
    return data.sample_ids, torch.cat(chunks).numpy()


def test_stage_is_deterministic_and_writes_every_artifact(tmp_path):
    run = synthetic_run(tmp_path / "run", n_users=60)
    config = BaselineConfig(model="sasrec", epochs=3, batch_size=64, top_k=4, seed=7)
    first = baseline_stage.run(config, run)
    topk_first = schema.read(run.artifact("baseline/sasrec", "topk.parquet"), "topk")
    ids, probs_first = saved_probs(run, "sasrec", "test")
    again = baseline_stage.run(config, run)
    assert again["key"] == first["key"] and again["created_at"] == first["created_at"]  # cached
    assert set(first["outputs"]) == {"topk.parquet", "model.safetensors", "model.json", "training.json"}  # no per-sample probs
    assert first["params"]["assistant_from"] == "model"  # keyed: a baseline that wrote probabilities instead reruns
    baseline_stage.run(config, run, force=True)
    assert schema.read(run.artifact("baseline/sasrec", "topk.parquet"), "topk").equals(topk_first)
    np.testing.assert_array_equal(saved_probs(run, "sasrec", "test")[1], probs_first)

    stats = first["stats"]
    assert stats["epochs_run"] == 3 and 1 <= stats["best_epoch"] <= 3 and stats["parameters"] > 0
    assert 0.0 <= stats["valid_NDCG@10"] <= 1.0
    history = json.loads(run.artifact("baseline/sasrec", "training.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert stats["valid_NDCG@10"] == max(h["valid"] for h in history)
    for split in ("valid", "test"):
        split_ids, matrix = saved_probs(run, "sasrec", split)
        samples = pl.read_parquet(run.artifact("data", f"{split}.parquet"))
        assert sorted(split_ids.tolist()) == sorted(samples["sample_id"].to_list())
        assert matrix.shape == (samples.height, len(TITLES))
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-5)
    # the saved model is the one whose test lists were written: they are its probabilities' order
    for row in (0, len(ids) - 1):
        listed = topk_first.filter(pl.col("sample_id") == int(ids[row])).sort("rank")["item_id"].to_list()
        best_per_title = {}
        for item in np.argsort(-probs_first[row], kind="stable"):  # best first, ties by smaller id
            best_per_title.setdefault(TITLES[item].strip(), int(item))
        assert listed == list(best_per_title.values())[:len(listed)] and len(listed) == 4

    other = baseline_stage.run(BaselineConfig(model="sasrec", epochs=3, batch_size=64, top_k=4, seed=8, name="seed8"), run)
    assert other["key"] != first["key"]


def test_gru4rec_stage_runs_and_bad_options_fail(tmp_path):
    run = synthetic_run(tmp_path / "run")
    manifest = baseline_stage.run(BaselineConfig(model="gru4rec", epochs=2, batch_size=32, top_k=3), run)
    assert manifest["params"]["n_layers"] == 1 and manifest["params"]["dropout"] == 0.3  # GRU4Rec's defaults
    assert schema.read(run.artifact("baseline/gru4rec", "topk.parquet"), "topk")["rank"].max() == 2
    with pytest.raises(IgdrecError, match="did you mean 'sasrec'"):
        baseline_stage.run(BaselineConfig(model="SASRec"), run)
    with pytest.raises(IgdrecError, match="--patience"):
        baseline_stage.run(BaselineConfig(patience=-1), run)
    items, splits = pl.DataFrame({"item_id": [0, 2], "title": ["a", "b"]}), {}
    for split in ("train", "valid", "test"):
        splits[split] = pl.DataFrame({"sample_id": [0], "user_id": ["u"], "history_item_ids": [[0]], "item_id": [2], "timestamp": [0]})
    gappy = write_data_stage(tmp_path / "gappy", items, splits)
    with pytest.raises(IgdrecError, match="items.parquet: item ids must be dense"):
        baseline_stage.run(BaselineConfig(model="pop"), gappy)
    assert not (gappy.root / "baseline" / "pop").exists()
