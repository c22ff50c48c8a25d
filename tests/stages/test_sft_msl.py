"""`igdrec sft --weighting msl` and `msl-igd` end to end on the synthetic run (docs/method.md §5.1)."""

import json

import polars as pl
import pytest
import torch
from cli_helpers import one_line_error
from ig_helpers import publish_ig_stage
from safetensors.torch import load_file
from typer.testing import CliRunner

from fixtures import synthetic_run
from igdrec import checkpoints, schema, weighting
from igdrec.cli import app
from igdrec.config import IGIndexConfig, SFTConfig
from igdrec.errors import IgdrecError
from igdrec.modeling import load_tokenizer
from igdrec.stages import build_ig_index, sft

SMALL = ["--sample", "24", "--valid-sample", "8", "--batch-size", "8", "--micro-batch-size", "4", "--warmup-steps", "1",
         "--epochs", "2", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def run_with_index(tiny_model_dir, tmp_path_factory):
    run = synthetic_run(tmp_path_factory.mktemp("sft-msl"))
    build_ig_index.run(IGIndexConfig(model=str(tiny_model_dir)), run)
    return run


@pytest.mark.parametrize(("args", "name"), [(["--weighting", "msl"], "msl-s24"), (["--weighting", "msl-igd", "--beta", "0.2"], "msl-igd-b0.2-s24")])
def test_cli_msl_run_trains_and_logs(run_with_index, tiny_model_dir, args, name):
    result = CliRunner().invoke(app, ["sft", *args, "--model", str(tiny_model_dir), *SMALL, "--run-dir", str(run_with_index.root)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((run_with_index.stage_dir(f"sft/{name}") / "stage.json").read_text())
    assert manifest["params"]["weighting"] == args[1] and ("beta" in manifest["params"]) == (args[1] == "msl-igd")
    stats = manifest["stats"]
    # a random tiny model's logits barely differ, so ATS's estimate sits at the clip's floor
    assert stats["steps"] == 6 and 1.5 <= stats["msl_temperature"] <= 5.0
    log = schema.read(run_with_index.stage_dir(f"sft/{name}") / "train_log.parquet", "train_log")
    train = log.filter(pl.col("split") == "train")
    assert train["loss"].is_finite().all() and train["loss"][-1] < train["loss"][0]
    # a zero-IG token with a single trie child has no MSL term at all
    assert log["ce_zero_ig"].max() < 1e-6 if args[1] == "msl" else True


def test_msl_needs_the_index_and_its_trie(tiny_model_dir, tmp_path):
    run = synthetic_run(tmp_path / "run")
    config = SFTConfig(model=str(tiny_model_dir), weighting="msl", sample=8, valid_sample=0, batch_size=4, max_steps=1)
    with pytest.raises(IgdrecError, match="build-ig-index"):
        sft.run(config, run)
    publish_ig_stage(run, load_tokenizer(str(tiny_model_dir)), str(tiny_model_dir))  # sample IG tables, no trie
    result = CliRunner().invoke(app, ["sft", "--weighting", "msl", "--model", str(tiny_model_dir), "--sample", "8",
                                      "--valid-sample", "0", "--batch-size", "4", "--max-steps", "1", "--run-dir", str(run.root)])
    one_line_error(result, "ig/trie_nodes.parquet: missing from the IG index; rebuild it with `igdrec build-ig-index --force`")
    assert not run.stage_dir("sft").exists()


class Killed(Exception):
    pass


def test_resume_restores_the_adaptive_temperature(run_with_index, tiny_model_dir, tmp_path, monkeypatch):
    """Killed after the step-2 checkpoint and resumed: the same τ and weights as an uninterrupted run. A floor
    below the authors' 1.5 lets τ move on the random tiny model, so a resume that lost τ would differ."""
    monkeypatch.setattr(weighting.AdaptiveTemperature, "LOW", 0.01)
    cfg = dict(model=str(tiny_model_dir), weighting="msl", sample=24, valid_sample=0, batch_size=8, micro_batch_size=4,
               epochs=2, warmup_steps=1, lr=2e-3, save_every=2, lora_dropout=0.0)
    reference = sft.run(SFTConfig(name="msl-reference", **cfg), run_with_index)["stats"]["msl_temperature"]
    assert reference != 1.5
    real_save = checkpoints.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        raise Killed

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        sft.run(SFTConfig(name="msl-resumed", **cfg), run_with_index)
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    resumed = sft.run(SFTConfig(name="msl-resumed", resume=True, **cfg), run_with_index)["stats"]["msl_temperature"]
    assert resumed == pytest.approx(reference, rel=1e-6)
    expected = load_file(run_with_index.stage_dir("sft/msl-reference") / "model" / "adapter_model.safetensors")
    got = load_file(run_with_index.stage_dir("sft/msl-resumed") / "model" / "adapter_model.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
