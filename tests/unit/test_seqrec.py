"""Traditional baselines: the models learn, pop ranks by hand, the stage is deterministic, metrics score it."""

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
from igdrec.config import BASELINE_MODELS, BaselineConfig, MetricsConfig
from igdrec.errors import IgdrecError
from igdrec.stages import baseline as baseline_stage
from igdrec.stages import metrics as metrics_stage


def successor_windows(n_items: int, n_samples: int, seed: int, max_len: int = 5) -> pl.DataFrame:
    """Windows whose next item is always (last history item + 1) mod n_items: a trivially learnable rule."""
    rng = np.random.default_rng(seed)
    histories, targets = [], []
    for _ in range(n_samples):
        length = int(rng.integers(1, max_len + 1))
        start = int(rng.integers(n_items))
        # a history of random items ending in `start`: only the last item decides the target
        histories.append([int(i) for i in rng.integers(n_items, size=length - 1)] + [start])
        targets.append((start + 1) % n_items)
    return pl.DataFrame({"sample_id": list(range(n_samples)), "user_id": ["u"] * n_samples, "history_item_ids": histories,
                         "item_id": targets, "timestamp": [0] * n_samples})


@pytest.mark.parametrize("model_name", ["sasrec", "gru4rec"])
def test_model_learns_the_successor_rule(model_name):
    n_items = 30
    train = seqrec.SequenceData.from_samples(successor_windows(n_items, 400, seed=1), n_items, max_len=5)
    valid = seqrec.SequenceData.from_samples(successor_windows(n_items, 200, seed=2), n_items, max_len=5)
    titles = [f"Item {i}" for i in range(n_items)]
    torch.manual_seed(0)
    small = seqrec.ModelSettings.from_config(
        BaselineConfig(model=model_name, hidden_size=32, inner_size=64, gru_hidden_size=32, dropout=0.1, attn_dropout=0.1))
    model = seqrec.build_model(model_name, n_items, 5, small, train.target.numpy())
    evaluator = seqrec.RankingEvaluator(valid, titles, ks=[1, 10], batch_size=512)
    before = evaluator.evaluate(model)
    settings = BaselineConfig(epochs=12, lr=1e-2, batch_size=64, patience=12, seed=0)
    result = seqrec.Trainer(settings).fit(model, train, lambda m: evaluator.evaluate(m)["NDCG@10"])
    after = evaluator.evaluate(model)
    assert before["HR@10"] < 0.5
    assert after["HR@10"] >= 0.95 and after["HR@1"] >= 0.8, after
    assert result.history[-1].loss < 0.5 * result.history[0].loss
    assert result.best_valid == pytest.approx(after["NDCG@10"])  # the best epoch's state was restored


def test_full_sort_predict_shape_and_probabilities():
    n_items = 7
    samples = successor_windows(n_items, 5, seed=3)
    data = seqrec.SequenceData.from_samples(samples, n_items, max_len=4)
    assert data.item_seq.shape == (5, 4) and int(data.item_seq_len.max()) <= 4
    assert (data.item_seq[torch.arange(4)[None, :] >= data.item_seq_len[:, None]] == n_items).all()  # right padding
    batch = next(data.batches(5))
    for name in BASELINE_MODELS:
        torch.manual_seed(0)
        model = seqrec.build_model(name, n_items, 4, seqrec.ModelSettings.from_config(BaselineConfig(model=name)), data.target.numpy()).eval()
        scores = model.full_sort_predict(batch)
        assert scores.shape == (5, n_items)
        probs = model.item_probabilities(scores)
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(5))


def test_history_padding_does_not_change_the_scores():
    """A history's scores are the same alone or in a batch padded for a longer history."""
    n_items = 9
    samples = pl.DataFrame({"sample_id": [0, 1], "user_id": ["a", "b"], "history_item_ids": [[3, 4], [0, 1, 2, 5, 6]],
                            "item_id": [5, 7], "timestamp": [0, 0]})
    for name in ("sasrec", "gru4rec"):
        torch.manual_seed(0)
        model = seqrec.build_model(name, n_items, 5, seqrec.ModelSettings.from_config(BaselineConfig(model=name)), np.zeros(1)).eval()
        both = model.full_sort_predict(next(seqrec.SequenceData.from_samples(samples, n_items, 5).batches(2)))
        alone = model.full_sort_predict(next(seqrec.SequenceData.from_samples(samples.head(1), n_items, 5).batches(1)))
        torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-5)


def test_most_popular_ranks_by_frequency_then_id_one_item_per_title():
    titles = ["A", "B", "C", "B ", "D"]  # ids 1 and 3 share the title "B"
    targets = np.array([2, 4, 4, 3, 0, 2, 3, 1])  # counts: 0:1, 1:1, 2:2, 3:2, 4:2
    model = seqrec.MostPopular(5, targets)
    scores = model.full_sort_predict(seqrec.SequenceBatch(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, dtype=torch.long), torch.zeros(2)))
    items, values = seqrec.rank_items(scores, 4, seqrec.title_groups(titles))
    # 2, 3, 4 (count 2, by id), then 0 (count 1, smaller id than 1); 1 is dropped: title "B" is taken by 3
    assert items.tolist() == [[2, 3, 4, 0]] * 2
    assert values[0].tolist() == [2.0, 2.0, 2.0, 1.0]
    probs = model.item_probabilities(scores)[0]
    torch.testing.assert_close(probs, torch.tensor([1, 1, 2, 2, 2], dtype=torch.float32) / 8)
    short, short_values = seqrec.rank_items(scores, 5, seqrec.title_groups(titles))  # 4 titles for 5 slots
    assert short[0].tolist() == [2, 3, 4, 0, -1] and math.isnan(short_values[0, 4])


def test_empty_history_and_unknown_item_are_one_line_errors():
    bad = pl.DataFrame({"sample_id": [0, 1], "user_id": ["a", "b"], "history_item_ids": [[1], []], "item_id": [2, 3], "timestamp": [0, 0]})
    with pytest.raises(IgdrecError, match="x.parquet: sample 1 has an empty history"):
        seqrec.SequenceData.from_samples(bad, 5, 3, source="x.parquet")
    bad = bad.with_columns(pl.Series("history_item_ids", [[1], [9]]))
    with pytest.raises(IgdrecError, match="history item id 9 is outside"):
        seqrec.SequenceData.from_samples(bad, 5, 3, source="x.parquet")


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


@pytest.mark.parametrize("model_name", ["sasrec", "gru4rec", "pop"])
def test_saved_model_scores_exactly_as_the_trained_one(tmp_path, model_name):
    n_items = 9
    data = seqrec.SequenceData.from_samples(successor_windows(n_items, 12, seed=4), n_items, max_len=5)
    settings = seqrec.ModelSettings.from_config(BaselineConfig(model=model_name, hidden_size=8, inner_size=16, gru_hidden_size=8))
    torch.manual_seed(0)
    model = seqrec.build_model(model_name, n_items, 5, settings, data.target.numpy())
    batch = next(data.batches(12))
    model.eval()
    expected = model.full_sort_predict(batch)
    seqrec.save_recommender(model, tmp_path, model_name, 5, settings)
    loaded, max_len = seqrec.load_recommender(tmp_path)
    assert max_len == 5 and type(loaded) is type(model) and not loaded.training
    assert torch.equal(loaded.full_sort_predict(batch), expected)
    assert json.loads((tmp_path / "model.json").read_text())["settings"]["n_layers"] == {"sasrec": 2, "gru4rec": 1, "pop": None}[model_name]


def test_saved_model_refuses_files_that_do_not_rebuild_it(tmp_path):
    settings = seqrec.ModelSettings.from_config(BaselineConfig(hidden_size=8, inner_size=16))
    seqrec.save_recommender(seqrec.build_model("sasrec", 9, 5, settings, np.zeros(0)), tmp_path, "sasrec", 5, settings)
    good = json.loads((tmp_path / "model.json").read_text())

    def fails_with(shape, message: str) -> None:
        (tmp_path / "model.json").write_text(shape if isinstance(shape, str) else json.dumps(shape))
        with pytest.raises(IgdrecError, match=message):
            seqrec.load_recommender(tmp_path)

    fails_with("{", r"model.json: cannot read the model's settings")
    fails_with(good | {"extra": 1}, r"model.json: expected an object with exactly the keys model, n_items, max_len, settings")
    fails_with(good | {"model": "bert"}, r"model.json: model 'bert' is not one of sasrec, gru4rec, pop")
    fails_with(good | {"n_items": "9"}, r"model.json: n_items '9' is not a positive integer")
    fails_with(good | {"settings": good["settings"] | {"hidden_size": 8.0}}, r"model.json: settings.hidden_size 8.0 is not an integer")
    fails_with(good | {"settings": good["settings"] | {"n_heads": 3}},
               r"model.json: cannot build a sasrec of these settings \(hidden size 8 is not a multiple of 3 heads\)")
    fails_with(good | {"n_items": 10}, r"model.safetensors: the weights do not fit a sasrec of the shape in model.json \(.*size mismatch")
    (tmp_path / "model.json").write_text(json.dumps(good))
    assert seqrec.load_recommender(tmp_path)[0].n_items == 9  # each refusal above was the edit's doing
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    fails_with(good, r"model.safetensors: cannot read the model's weights")
