"""The KV-cache self-check in fresh processes: it once aborted valid decodes of a LoRA fine-tune on a
loaded machine. Each process decodes with a LoRA fine-tune of the tiny model (adapters with non-zero B,
merged on load as `decode` does); the check must pass in every one, also with fewer threads than cores
and under a competing CPU load, and the lists must be those of a process that warmed up first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from decode_helpers import publish_ig, publish_sft, save_peaked_model
from fixtures import synthetic_run

from igdrec.modeling import load_tokenizer

SFT = "lora-sft"

DECODE = """
import json, sys, torch
from igdrec.config import DecodeConfig
from igdrec.decoding import Decoder
from igdrec import schema
from igdrec.rundir import RunDir

run_dir, threads, warm_up = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "warm"
torch.set_num_threads(threads)
decoder = Decoder.from_run(run_dir, DecodeConfig(sft="lora-sft", num_beams=5, alpha=0.2, length_penalty=1.0))
samples = schema.read(RunDir(run_dir).artifact("data", "test.parquet"), "samples").sort("sample_id").head(4)
if warm_up:  # every forward pass the decode makes, once, before it
    decoder.decode_samples(samples)
    decoder.engine.cache_check_gap = None
beams = decoder.decode_samples(samples)
print(json.dumps({"gap": decoder.engine.cache_check_gap, "items": beams["item_id"].to_list(), "scores": beams["score"].to_list()}))
"""


def save_lora_fine_tune(directory: Path) -> Path:
    """A peft LoRA adapter on the peaked tiny model, its B matrices drawn away from zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = save_peaked_model(directory / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(directory / "adapter")
    load_tokenizer(str(base)).save_pretrained(directory / "adapter")
    return directory / "adapter"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    adapter = save_lora_fine_tune(tmp_path_factory.mktemp("lora"))
    run = synthetic_run(tmp_path_factory.mktemp("run") / "run")
    publish_ig(run, load_tokenizer(str(adapter)), str(adapter))
    publish_sft(run, adapter, SFT)
    return run


def test_fresh_processes_pass_the_check_and_decode_like_a_warmed_up_one(run):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.pop("OMP_NUM_THREADS", None)  # the processes choose their thread counts themselves

    def start(threads: int, warm_up: bool) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", DECODE, str(run.root), str(threads), "warm" if warm_up else "cold"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    cores = os.cpu_count() or 1
    reference = start(cores, warm_up=True)
    load = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # a competing CPU load for all of them
    try:
        fresh = [start(cores, False), start(cores, False), start(max(cores - 1, 1), False)]
        outputs = [process.communicate(timeout=240) for process in [reference, *fresh]]
    finally:
        load.kill()
        load.wait()
    results = []
    for process, (stdout, stderr) in zip([reference, *fresh], outputs):
        assert process.returncode == 0, stderr[-2000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    expected = results[0]
    for result in results:
        assert result["gap"] is not None  # the check ran (and passed: a failed check exits non-zero)
        assert result["items"] == expected["items"]
        np.testing.assert_allclose(result["scores"], expected["scores"], rtol=1e-6)
