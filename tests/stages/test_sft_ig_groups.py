"""The sft stage logs CE by IG group (docs/method.md §5) and records the threshold it split them at."""

import dataclasses

import numpy as np
import polars as pl
import pytest
from ig_helpers import publish_ig_stage

from fixtures import synthetic_run
from igdrec import options
from igdrec import schema
from igdrec.config import SFTConfig
from igdrec.modeling import load_tokenizer
from igdrec.stages import sft


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
    assert options.key_params(dataclasses.replace(cfg, ig_group_threshold=1e9)) != options.key_params(cfg)
