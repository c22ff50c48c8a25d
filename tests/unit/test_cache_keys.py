"""The cache-key parameters stay what earlier igdrec wrote, so a run directory made before a refactoring is
reported cached after it (a changed key silently recomputes every stage of every earlier run).

The fingerprints below were computed by the code before issue 20's refactoring; a deliberate change of a
key (a new option with an effect) updates them, and says so in its commit.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest

from igdrec import config as cfg
from igdrec import options
from igdrec.rundir import fingerprint_obj
from igdrec.seqrec import ModelSettings

CASES = {
    "preprocess": (cfg.PreprocessConfig(), "ce0a9dd66030d43c6ed52d657ad18b4e"),
    "preprocess-amazon": (cfg.PreprocessConfig(source="amazon2018", category="Toys"), "8f2261923c39fa790d5174b0dc886031"),
    "build-ig-index": (cfg.IGIndexConfig(), "5501d017d4123acd91b4612312ef43da"),
    "sft": (cfg.SFTConfig(), "15c580c53d1b102a37db91bd92a5f938"),
    "sft-cft": (cfg.SFTConfig(weighting="cft", cft_alpha=0.2, lr_schedule="linear"), "c922ad129d338ebaf04f798f2c3b1a76"),
    "sft-full": (cfg.SFTConfig(lora=False, weighting="plain"), "7ce4fadb98c449d8327a6f1f5aa6b325"),
    "decode": (cfg.DecodeConfig(sft="x"), "8b7d73f87c0c9924a071156711752cd4"),
    "decode-tfa": (cfg.DecodeConfig(sft="x", tfa="sasrec", tfa_guidance=0.3), "1ac718e5b0777e21fdc449826cda981b"),
    "rerank": (cfg.RerankConfig(decode="d"), "559f45ed310b61d7a5661c9332ac0841"),
    "baseline": (cfg.BaselineConfig(), "bc83e17227fc7914a4998daa02c79b39"),
    "baseline-gru": (cfg.BaselineConfig(model="gru4rec", dropout=0.2), "008c3d04a70bcee4f4e59a9f0ee1c8ac"),
    "metrics": (cfg.MetricsConfig(rerank="r"), "f7e950f6fedf0e7b19d1b3c5fa8cc279"),
}
# The baseline's key holds its resolved architecture as well (stages/baseline.cache_params); model.json too.
MODEL_SETTINGS = {
    "sasrec": "ba79e67aef1a9fa2f09512abd2ea0f20",
    "gru4rec": "8f264818ffb8d167837d159a14048946",
    "pop": "aa6b1175017c3a2dfe4c973d6a18cb9c",
}


@pytest.mark.parametrize("case", list(CASES))
def test_key_params_are_the_ones_earlier_runs_were_keyed_on(case):
    config, expected = CASES[case]
    params = options.key_params(config)
    assert fingerprint_obj(params) == expected, params


@pytest.mark.parametrize("model", list(MODEL_SETTINGS))
def test_resolved_baseline_architecture_is_the_one_earlier_runs_were_keyed_on(model):
    settings = asdict(ModelSettings.from_config(cfg.BaselineConfig(model=model, hidden_size=32)))
    assert fingerprint_obj(settings) == MODEL_SETTINGS[model], settings


def test_a_changed_key_changes_the_fingerprint():
    config, expected = CASES["sft"]
    assert fingerprint_obj(options.key_params(cfg.SFTConfig(beta=0.2))) != expected
    assert fingerprint_obj(options.key_params(cfg.SFTConfig(log_every=7))) == expected  # a run setting: not in the key


def test_head_share_enters_the_metrics_key_only_off_its_default():
    config, expected = CASES["metrics"]
    assert config.head_share == cfg.HEAD_SHARE and "head_share" not in options.key_params(config)
    changed = options.key_params(cfg.MetricsConfig(rerank="r", head_share=0.1))
    assert changed["head_share"] == 0.1 and fingerprint_obj(changed) != expected
