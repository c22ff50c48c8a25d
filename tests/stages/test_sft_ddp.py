"""`torchrun --nproc_per_node=2 igdrec sft` (gloo, CPU) equals single-process training with the same effective batch."""

import os
import subprocess
import sys

import polars as pl
import pytest
import torch
from ig_helpers import publish_ig_stage
from safetensors.torch import load_file

from fixtures import synthetic_run
from igdrec import schema
from igdrec.config import SFTConfig
from igdrec.modeling import load_tokenizer
from igdrec.stages import sft

COMMON = dict(weighting="igd", beta=0.1, sample=16, valid_sample=6, batch_size=4, epochs=1, warmup_steps=1, lr=1e-2, lora=False, name="ddp")


def test_two_process_run_matches_single_process(tiny_model_dir, tmp_path):
    runs = {}
    for key in ("single", "ddp"):
        runs[key] = synthetic_run(tmp_path / key)
        publish_ig_stage(runs[key], load_tokenizer(str(tiny_model_dir)), str(tiny_model_dir))
    sft.run(SFTConfig(model=str(tiny_model_dir), micro_batch_size=2, **COMMON), runs["single"])

    args = ["--model", str(tiny_model_dir), "--run-dir", str(runs["ddp"].root), "--micro-batch-size", "1", "--full",
            "--weighting", "igd", "--beta", "0.1", "--sample", "16", "--valid-sample", "6", "--batch-size", "4",
            "--epochs", "1", "--warmup-steps", "1", "--lr", "1e-2", "--name", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IGDREC_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "igdrec.cli", "sft", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    manifests = {k: r.manifest("sft/ddp") for k, r in runs.items()}
    assert manifests["ddp"]["stats"]["world_size"] == 2 and manifests["ddp"]["stats"]["steps"] == 4
    weights = {k: load_file(r.stage_dir("sft/ddp") / "model" / "model.safetensors") for k, r in runs.items()}
    for name, value in weights["single"].items():
        torch.testing.assert_close(weights["ddp"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    logs = {k: schema.read(r.artifact("sft/ddp", "train_log.parquet"), "train_log") for k, r in runs.items()}
    for column in ("loss", "ce_zero_ig", "ce_positive_ig"):
        assert logs["ddp"][column].to_list() == pytest.approx(logs["single"][column].to_list(), rel=1e-4)
    assert logs["ddp"]["tokens"].to_list() == logs["single"]["tokens"].to_list()
    assert logs["ddp"].filter(pl.col("split") == "valid").height == 1
