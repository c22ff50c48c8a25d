"""A run killed after a checkpoint and resumed ends with the weights of an uninterrupted run."""

import polars as pl
import pytest
import torch
from ig_helpers import publish_ig_stage
from safetensors.torch import load_file

from fixtures import synthetic_run
from igdrec import checkpoints, schema
from igdrec.config import SFTConfig
from igdrec.errors import IgdrecError
from igdrec.modeling import load_tokenizer
from igdrec.stages import sft

# 3 steps per epoch, validation (and best-model selection) after step 3 and 6, checkpoints every 2 steps;
# LoRA dropout on, so the random state has to be restored too.
CFG = dict(weighting="igd", beta=0.1, sample=24, valid_sample=8, batch_size=8, micro_batch_size=4, epochs=3,
           warmup_steps=2, lr=2e-3, save_every=2, lora_dropout=0.1, name="resume")


class Killed(Exception):
    pass


def make_run(path, model_dir):
    run = synthetic_run(path)
    publish_ig_stage(run, load_tokenizer(str(model_dir)), str(model_dir))
    return run


def adapter(run):
    return load_file(run.stage_dir("sft/resume") / "model" / "adapter_model.safetensors")


def test_resume_after_a_kill_matches_the_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    cfg = SFTConfig(model=str(tiny_model_dir), **CFG)
    reference = make_run(tmp_path / "a", tiny_model_dir)
    sft.run(cfg, reference)

    run = make_run(tmp_path / "b", tiny_model_dir)
    real_save = checkpoints.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if state["step"] == 4:
            raise Killed  # as if the process died right after the step-4 checkpoint

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        sft.run(cfg, run)
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    assert not run.stage_dir("sft/resume").exists()
    with pytest.raises(IgdrecError, match="--resume"):
        sft.run(cfg, run)

    manifest = sft.run(SFTConfig(model=str(tiny_model_dir), resume=True, **CFG), run)
    assert manifest["stats"]["steps"] == 9
    expected, got = adapter(reference), adapter(run)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    log_a = schema.read(reference.artifact("sft/resume", "train_log.parquet"), "train_log")
    log_b = schema.read(run.artifact("sft/resume", "train_log.parquet"), "train_log")
    assert log_a.select("step", "split").equals(log_b.select("step", "split"))
    assert log_b["loss"].to_list() == pytest.approx(log_a["loss"].to_list(), rel=1e-5)
    assert log_b.filter(pl.col("split") == "valid").height == 3
