"""CE of the zero-, low- and high-IG target tokens (docs/method.md §5) against a hand computation."""

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch
from ig_helpers import brute_force_sample_ig, publish_ig_stage

from fixtures import synthetic_dataset, synthetic_run
from igdrec import config
from igdrec import prompt, schema, training
from igdrec.config import SFTConfig
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


def test_stage_logs_three_groups_and_records_the_median_threshold(tiny_model_dir, tmp_path):
    run = synthetic_run(tmp_path / "run")
    publish_ig_stage(run, load_tokenizer(str(tiny_model_dir)), str(tiny_model_dir))
    cfg = SFTConfig(model=str(tiny_model_dir), weighting="plain", sample=24, valid_sample=8, batch_size=8,
                    micro_batch_size=4, warmup_steps=1, epochs=1, name="groups")
    manifest = sft.run(cfg, run)
    # the default threshold: median positive IG over the target tokens of the 24 training samples used
    table = schema.read(run.artifact("ig", "sample_ig_train.parquet"), "sample_ig").sort("sample_id")
    used = table[sft.select_rows(table.height, 24, cfg.seed)].explode("ig", "zero_ig").filter(~pl.col("zero_ig"))
    assert manifest["stats"]["ig_group_threshold"] == pytest.approx(float(np.median(used["ig"].to_numpy())))
    log = schema.read(run.artifact("sft/groups", "train_log.parquet"), "train_log")
    assert set(log["split"]) == {"train", "valid"}
    assert (log["tokens_zero_ig"] + log["tokens_low_ig"] + log["tokens_high_ig"] == log["tokens"]).all()
    assert (log["tokens_high_ig"] > 0).all() and (log["tokens_low_ig"] > 0).all()
    for key in ("train_ce_low_ig", "train_ce_high_ig", "valid_ce_low_ig", "valid_ce_high_ig"):
        assert manifest["stats"][key] is not None

    # an explicit threshold above every IG puts all positive tokens in the low group, and is part of the key
    high = sft.run(SFTConfig(**{**cfg.__dict__, "ig_group_threshold": 1e9, "name": "groups-high", "valid_sample": 0}), run)
    log = schema.read(run.artifact("sft/groups-high", "train_log.parquet"), "train_log")
    assert (log["tokens_high_ig"] == 0).all() and log["ce_high_ig"].null_count() == log.height
    assert high["stats"]["ig_group_threshold"] == 1e9
    assert config.key_params(dataclasses.replace(cfg, ig_group_threshold=1e9)) != config.key_params(cfg)
