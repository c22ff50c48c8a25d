import json

import polars as pl
import pytest
import torch
from ig_helpers import publish_ig_stage
from tiny_model import build_tokenizer
from typer.testing import CliRunner

from fixtures import synthetic_run
from igdrec import schema
from igdrec.cli import app
from igdrec.config import SFTConfig
from igdrec.errors import IgdrecError
from igdrec.modeling import load_model, load_tokenizer
from igdrec.stages import sft

SMALL = dict(sample=24, valid_sample=8, batch_size=8, micro_batch_size=4, warmup_steps=1, epochs=1)


@pytest.fixture(scope="module")
def run_with_ig(tiny_model_dir, tmp_path_factory):
    run = synthetic_run(tmp_path_factory.mktemp("sft-run"))
    publish_ig_stage(run, load_tokenizer(str(tiny_model_dir)), str(tiny_model_dir))
    return run


def config(model_dir, **changes):
    return SFTConfig(model=str(model_dir), **{**SMALL, **changes})


def test_default_names():
    assert sft.default_name(SFTConfig(beta=0.1)) == "igd-b0.1"
    assert sft.default_name(SFTConfig(weighting="plain", sample=256)) == "plain-s256"
    assert sft.default_name(SFTConfig(weighting="pos", beta=0.5)) == "pos-b0.5"
    assert sft.default_name(SFTConfig(weighting="cft", beta=0.5, cft_alpha=0.1)) == "cft-b0.5-a0.1"


def test_cli_igd_lora_run_publishes_a_loadable_adapter_and_a_log(run_with_ig, tiny_model_dir):
    args = ["sft", "--beta", "0.1", "--model", str(tiny_model_dir), "--sample", "24", "--valid-sample", "8",
            "--batch-size", "8", "--micro-batch-size", "4", "--warmup-steps", "1", "--epochs", "2",
            "--lr", "1e-3", "--lora", "--run-dir", str(run_with_ig.root)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    stage = run_with_ig.stage_dir("sft/igd-b0.1-s24")
    manifest = json.loads((stage / "stage.json").read_text())
    assert manifest["params"]["weighting"] == "igd" and manifest["params"]["beta"] == 0.1
    assert manifest["params"]["warmup_steps"] == 1 and manifest["stats"]["steps"] == 6
    assert not any(p.name == "checkpoint" for p in stage.rglob("*"))

    log = schema.read(stage / "train_log.parquet", "train_log")
    assert log.filter(pl.col("split") == "train").height == 6 and log.filter(pl.col("split") == "valid").height == 2
    assert log["ce_zero_ig"].null_count() == 0 and log["ce_positive_ig"].null_count() == 0
    assert log["lr"][0] < log["lr"].max()  # warm-up

    adapter = json.loads((stage / "model" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model_dir)
    loaded = load_model(str(stage / "model"))
    base = load_model(str(tiny_model_dir))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(loaded(ids).logits, base(ids).logits)  # the adapter was trained and is applied
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(stage / "model")).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, loaded(ids).logits)
    assert load_tokenizer(str(stage / "model")).get_vocab() == load_tokenizer(str(tiny_model_dir)).get_vocab()

    again = CliRunner().invoke(app, args)  # cached: no retraining, same manifest
    assert again.exit_code == 0 and "cached" in again.output
    assert json.loads((stage / "stage.json").read_text())["key"] == manifest["key"]


def test_full_fine_tuning_lowers_the_loss_and_saves_full_weights(run_with_ig, tiny_model_dir):
    cfg = config(tiny_model_dir, weighting="plain", lora=False, lr=3e-3, sample=16, max_steps=12, epochs=50, valid_sample=0, name="full")
    manifest = sft.run(cfg, run_with_ig)
    log = schema.read(run_with_ig.artifact("sft/full", "train_log.parquet"), "train_log")
    losses = log.filter(pl.col("split") == "train")["loss"].to_list()
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < losses[0] - 0.5
    assert manifest["stats"]["zero_ig_logged"] and log["ce_zero_ig"].null_count() == 0  # plain logs zero-IG CE too
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(run_with_ig.stage_dir("sft/full") / "model"))


def test_igd_refuses_an_ig_index_built_with_another_tokenizer(tiny_model_dir, tmp_path):
    other_dir = tmp_path / "other-tokenizer"
    build_tokenizer(vocab_size=300).save_pretrained(other_dir)
    (other_dir / "config.json").write_text("{}")
    run = synthetic_run(tmp_path / "run")
    publish_ig_stage(run, load_tokenizer(str(other_dir)), str(other_dir))
    with pytest.raises(IgdrecError, match="tokenizer"):
        sft.run(config(tiny_model_dir), run)
    assert not run.stage_dir("sft").exists()
    # other schemes train, without the zero-IG logs
    manifest = sft.run(config(tiny_model_dir, weighting="pos", beta=0.5, max_steps=1, valid_sample=0), run)
    assert manifest["stats"]["zero_ig_logged"] is False


def test_igd_needs_an_ig_index_and_checks_its_arrays(tiny_model_dir, tmp_path):
    run = synthetic_run(tmp_path / "run")
    with pytest.raises(IgdrecError, match="build-ig-index"):
        sft.run(config(tiny_model_dir), run)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    publish_ig_stage(run, tokenizer, str(tiny_model_dir), corrupt={"train": lambda t: t.with_columns(pl.col("zero_ig").list.slice(1))})
    with pytest.raises(IgdrecError, match=r"sample_ig_train\.parquet: sample_id \d+: .* IG values for a target of"):
        sft.run(config(tiny_model_dir, sample=None), run)
    assert not run.stage_dir("sft").exists()

    # a catalog of training targets only: valid targets outside it have null IG lists
    def outside(table):
        return table.with_columns(pl.when(pl.col("sample_id") % 2 == 0).then(pl.col("zero_ig")).alias("zero_ig"))

    publish_ig_stage(run, tokenizer, str(tiny_model_dir), corrupt={"train": outside})
    with pytest.raises(IgdrecError, match=r"sample_ig_train\.parquet: sample_id \d+: target item \d+ is outside the IG catalog"):
        sft.run(config(tiny_model_dir, sample=None), run)
    publish_ig_stage(run, tokenizer, str(tiny_model_dir), corrupt={"valid": outside})
    manifest = sft.run(config(tiny_model_dir, max_steps=1, valid_sample=None), run)  # validates with unknown flags
    assert manifest["stats"]["valid_ce_zero_ig"] is not None


def test_bad_options_are_one_line_errors(run_with_ig, tiny_model_dir):
    with pytest.raises(IgdrecError, match="--cft-alpha"):
        sft.run(config(tiny_model_dir, weighting="igd", cft_alpha=0.1), run_with_ig)
    with pytest.raises(IgdrecError, match="--beta"):
        sft.run(config(tiny_model_dir, beta=1.5), run_with_ig)
    with pytest.raises(IgdrecError, match="--weighting"):
        sft.run(config(tiny_model_dir, weighting="focal"), run_with_ig)
