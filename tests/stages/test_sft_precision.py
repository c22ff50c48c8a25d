"""The sft stage trains in fp32, bf16-mixed (fp32 weights under bf16 autocast) and pure bf16 (weights and AdamW state)."""

import polars as pl
import pytest
import torch
from ig_helpers import publish_ig_stage
from safetensors.torch import load_file

from fixtures import synthetic_run
from igdrec import schema, training
from igdrec.config import SFTConfig
from igdrec.modeling import load_tokenizer
from igdrec.stages import sft

SMALL = dict(weighting="igd", beta=0.1, sample=16, valid_sample=0, batch_size=8, micro_batch_size=4, max_steps=2,
             warmup_steps=1, lr=1e-3, lora=False)


def test_three_precisions_train_on_cpu(tiny_model_dir, tmp_path, monkeypatch):
    run = synthetic_run(tmp_path / "run")
    publish_ig_stage(run, load_tokenizer(str(tiny_model_dir)), str(tiny_model_dir))
    optimizers = []
    real = training.make_optimizer
    monkeypatch.setattr(training, "make_optimizer", lambda *a, **k: optimizers.append(real(*a, **k)) or optimizers[-1])
    losses = {}
    for precision in ("fp32", "bf16-mixed", "bf16"):
        manifest = sft.run(SFTConfig(model=str(tiny_model_dir), precision=precision, name=precision, **SMALL), run)
        assert manifest["stats"]["precision"] == precision
        losses[precision] = schema.read(run.artifact(f"sft/{precision}", "train_log.parquet"), "train_log").filter(pl.col("split") == "train")["loss"].to_list()
    weights = {p: load_file(run.stage_dir(f"sft/{p}") / "model" / "model.safetensors") for p in losses}
    assert all(w.dtype == torch.float32 for w in weights["fp32"].values())
    assert all(w.dtype == torch.bfloat16 for w in weights["bf16"].values())  # pure bf16 weights
    state = optimizers[-1].state
    assert state and all(s["exp_avg"].dtype == torch.bfloat16 and s["exp_avg_sq"].dtype == torch.bfloat16 for s in state.values())
    # the first step sees the same weights: bf16 rounding moves the loss a little, never far
    for precision in ("bf16-mixed", "bf16"):
        assert losses[precision][0] != losses["fp32"][0]
        assert losses[precision][0] == pytest.approx(losses["fp32"][0], rel=3e-2)
