"""`training.evaluate`: CE of the zero-, low- and high-IG target tokens (docs/method.md §5) against a hand computation."""

import numpy as np
import pytest
import torch
from ig_helpers import brute_force_sample_ig

from fixtures import synthetic_dataset
from igdrec import prompt, training
from igdrec.distributed import World
from igdrec.modeling import load_model, load_tokenizer
from igdrec.sft_data import SFTExamples
from igdrec.sft_loss import WeightedLoss
from igdrec.stages import sft

ROWS = [0, 1, 2, 3, 4, 5, 6, 7]


def hand_ce(model, tokenizer, titles, train, row):
    """Per-token CE of one sample from its own unpadded forward."""
    history = [titles[i] for i in train["history_item_ids"][row]]
    target = prompt.item_token_sequence(tokenizer, titles[train["item_id"][row]])
    encoded = prompt.encode_sample(tokenizer, history, "movies", target, 512)
    with torch.no_grad():
        logits = model(torch.tensor([encoded.input_ids])).logits[0, encoded.prompt_len - 1:-1]
    return -torch.log_softmax(logits, -1)[torch.arange(len(target)), torch.tensor(target)]


def test_group_means_equal_hand_computation_on_a_tiny_batch(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    items, splits = synthetic_dataset()
    titles, train = items["title"].to_list(), splits["train"]
    table = brute_force_sample_ig(tokenizer, titles, train, train)
    zero_ig = [np.asarray(z) for z in table["zero_ig"].to_list()]
    ig = [np.asarray(v) for v in table["ig"].to_list()]
    positive = np.concatenate([v[~z] for z, v in zip(zero_ig, ig)])
    threshold = sft.median_positive_ig(zero_ig, ig)
    assert threshold == float(np.median(positive))
    data = SFTExamples(
        tokenizer, train["history_item_ids"].to_list(), train["item_id"].to_list(), titles,
        prompt.item_token_sequences(tokenizer, titles), "movies", "igd", 0.1, cutoff_len=512,
        zero_ig=zero_ig, ig=ig, ig_group_threshold=threshold,
    )
    sums = {"zero": [], "low": [], "high": []}
    for row in ROWS:
        ce = hand_ce(model, tokenizer, titles, train, row).tolist()
        for c, z, v in zip(ce, zero_ig[row], ig[row]):
            sums["zero" if z else ("high" if v > threshold else "low")].append(c)
    assert all(len(v) > 0 for v in sums.values()), {k: len(v) for k, v in sums.items()}  # every group is exercised

    subset = SFTExamples(
        tokenizer, [train["history_item_ids"][r] for r in ROWS], [train["item_id"][r] for r in ROWS], titles,
        data.item_sequences, "movies", "igd", 0.1, cutoff_len=512,
        zero_ig=[zero_ig[r] for r in ROWS], ig=[ig[r] for r in ROWS], ig_group_threshold=threshold,
    )
    row = training.evaluate(WeightedLoss(model, "igd", 0.0, share_prefix=True), subset, 3, True, torch.device("cpu"), World())
    for group, values in sums.items():
        assert row[f"ce_{group}_ig"] == pytest.approx(sum(values) / len(values), rel=1e-5), group
        assert row[f"tokens_{group}_ig"] == len(values)
    positive_ce = sums["low"] + sums["high"]
    assert row["ce_positive_ig"] == pytest.approx(sum(positive_ce) / len(positive_ce), rel=1e-5)
    assert row["tokens"] == sum(len(v) for v in sums.values())
