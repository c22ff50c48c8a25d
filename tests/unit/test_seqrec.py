"""`seqrec`, the traditional baselines: the models learn, pop ranks by hand, a saved model rebuilds exactly."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from igdrec import seqrec
from igdrec.config import BASELINE_MODELS, BaselineConfig
from igdrec.errors import IgdrecError


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
