"""Throughput measures that must not change what is computed: length-grouped micro-batches, the shared
prompt prefix computed once, cached encodings (docs/method.md §5; the docstrings of igdrec.sft_data and igdrec.sft_loss)."""

import numpy as np
import pytest
import torch
from ig_helpers import brute_force_sample_ig, publish_ig_stage
from safetensors.torch import load_file

from fixtures import synthetic_dataset, synthetic_run
from igdrec import prompt, schema
from igdrec.config import SFTConfig
from igdrec.flops import matmul_params, measure_peak_flops, model_flops, pass_cost
from igdrec.modeling import load_model, load_tokenizer
from igdrec.prompt import shared_prefix_len
from igdrec.schedule import epoch_order
from igdrec.sft_data import SFTExamples, micro_batch_rows
from igdrec.sft_loss import WeightedLoss
from igdrec.stages import sft

ROWS = [0, 3, 5, 8, 11, 2]


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    items, splits = synthetic_dataset()
    titles = items["title"].to_list()
    train = splits["train"]
    ig = brute_force_sample_ig(tokenizer, titles, train, train)
    return tokenizer, titles, train, [np.asarray(z) for z in ig["zero_ig"].to_list()]


def examples(setup, scheme):
    tokenizer, titles, train, zero_ig = setup
    return SFTExamples(
        tokenizer, train["history_item_ids"].to_list(), train["item_id"].to_list(), titles,
        prompt.item_token_sequences(tokenizer, titles), "movies", scheme, 0.5, cutoff_len=512,
        zero_ig=zero_ig, with_reference=scheme == "cft",
    )


def test_shared_prefix_is_the_common_prompt_start_and_stops_before_every_target(setup):
    data = examples(setup, "cft")
    batch = data.collate(ROWS)
    p = batch.prefix_ids.shape[1]
    sequences = [data.encoded(i)[0] for i in ROWS]
    assert all((s[:p] == sequences[0][:p]).all() for s in sequences)
    assert len({int(s[p]) for s in sequences}) > 1 or p == min(data.encoded(i)[1] for i in ROWS) - 1
    assert p >= len(prompt.TEMPLATE.split("{history}")[0]) // 8  # the instruction text, in (at most 8-byte) tokens
    # CFT's reference rows share the whole reference prompt but its last token, which predicts the first target token
    ref_len = len(data.reference_prompt_ids)
    assert batch.ref_prefix_ids.shape[1] == ref_len - 1
    assert shared_prefix_len([np.array([1, 2, 3, 4]), np.array([1, 2, 3, 5])], [4, 4]) == 3
    assert shared_prefix_len([np.array([1, 2, 3, 4]), np.array([1, 2, 3, 4])], [2, 3]) == 1


@pytest.mark.parametrize("scheme", ["igd", "cft"])
def test_shared_prefix_forward_gives_the_padded_forwards_loss_and_gradient(setup, tiny_model_dir, scheme):
    model = load_model(str(tiny_model_dir)).train()
    batch = examples(setup, scheme).collate(ROWS)
    results = {}
    for share in (False, True):
        loss_module = WeightedLoss(model, scheme, 0.3, share_prefix=share)
        assert loss_module.sharing() == share
        model.zero_grad()
        numerator, ce = loss_module(batch)
        numerator.backward()
        results[share] = (numerator.detach(), ce.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-6)
    for name, grad in results[False][2].items():
        torch.testing.assert_close(results[True][2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("lora", [False, True])
def test_length_grouping_and_prefix_sharing_leave_the_training_run_unchanged(tiny_model_dir, tmp_path, lora):
    """Same samples and order: the loss curve and the final weights equal the ungrouped, unshared run's."""
    run = synthetic_run(tmp_path / "run")
    publish_ig_stage(run, load_tokenizer(str(tiny_model_dir)), str(tiny_model_dir))
    common = dict(model=str(tiny_model_dir), weighting="igd", beta=0.1, sample=32, valid_sample=8, batch_size=16,
                  micro_batch_size=4, epochs=2, warmup_steps=1, lr=5e-3, lora=lora, lora_dropout=0.0)
    variants = {"old": dict(length_grouping=False, share_prefix=False), "new": dict(length_grouping=True, share_prefix=True)}
    for name, flags in variants.items():
        sft.run(SFTConfig(name=name, **common, **flags), run)

    # the variants really differ: grouping changes the micro-batches and cuts padding
    config = SFTConfig(**common)
    data = sft.split_examples(run, "train", 32, config, load_tokenizer(str(tiny_model_dir)), schema.read(run.artifact("data", "items.parquet"), "items")["title"].to_list(),
                              prompt.item_token_sequences(load_tokenizer(str(tiny_model_dir)), schema.read(run.artifact("data", "items.parquet"), "items")["title"].to_list()), "movies", run.manifest("ig"))
    rows = epoch_order(len(data), config.seed, 0)[:16]
    padded = {g: sum(data.collate(r).input_ids.numel() for r in micro_batch_rows(data, rows, 4, g)) for g in (False, True)}
    assert padded[True] < padded[False]

    logs = {k: schema.read(run.artifact(f"sft/{k}", "train_log.parquet"), "train_log") for k in variants}
    assert logs["new"].select("step", "split", "tokens", "tokens_zero_ig").equals(logs["old"].select("step", "split", "tokens", "tokens_zero_ig"))
    for column in ("loss", "ce_zero_ig", "ce_low_ig", "ce_high_ig"):
        assert logs["new"][column].to_list() == pytest.approx(logs["old"][column].to_list(), rel=1e-4), column
    weights_file = "adapter_model.safetensors" if lora else "model.safetensors"
    old, new = (load_file(run.stage_dir(f"sft/{k}") / "model" / weights_file) for k in variants)
    assert old.keys() == new.keys()
    for name in old:
        torch.testing.assert_close(new[name], old[name], rtol=1e-4, atol=1e-5, msg=name)
    stats = {k: run.manifest(f"sft/{k}")["stats"] for k in variants}
    assert stats["new"]["computed_tokens"] < stats["old"]["computed_tokens"]  # the shared prefix ran once per micro-batch


def test_prefix_sharing_switches_itself_off_under_dropout(setup, tiny_model_dir):
    model = sft.prepare_model(SFTConfig(model=str(tiny_model_dir), lora_dropout=0.1), torch.device("cpu"))
    loss_module = WeightedLoss(model, "plain", 0.0, share_prefix=True)
    model.train()
    assert not loss_module.sharing()  # per-row dropout masks make the rows' prefixes differ
    model.eval()
    assert loss_module.sharing()  # validation runs without dropout


def test_pass_cost_counts_a_shared_prefix_once(setup):
    batch = examples(setup, "plain").collate(ROWS[:3])
    lengths = batch.attention_mask.sum(-1).tolist()
    p = batch.prefix_ids.shape[1]
    tokens, flops = pass_cost(batch, True, (2, 8))
    assert tokens == sum(lengths) - 2 * p
    pairs = sum(n * (n + 1) / 2 for n in lengths) - 2 * p * (p + 1) / 2
    assert flops == 4 * 2 * 8 * pairs
    assert pass_cost(batch, False, (2, 8))[0] == sum(lengths)


def test_model_flops_counts_the_backward_by_what_trains(tiny_model_dir):
    full = load_model(str(tiny_model_dir))
    config = full.config
    n = sum(m.weight.numel() for name, m in full.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in name)
    assert n == config.num_hidden_layers * (2 * config.hidden_size**2 + 2 * config.hidden_size * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
                                            + 3 * config.hidden_size * config.intermediate_size)
    assert model_flops(full, 100, 5.0) == 3 * (2 * n * 100 + 5.0)  # full fine-tuning: input and weight gradients
    lora = sft.prepare_model(SFTConfig(model=str(tiny_model_dir)), torch.device("cpu"))
    lora_n = matmul_params(lora)[0]
    assert lora_n > n and model_flops(lora, 100, 5.0) == 2 * (2 * lora_n * 100 + 5.0)  # frozen base: input gradients only
    assert measure_peak_flops(torch.device("cpu")) is None


def test_compile_option_compiles_every_decoder_block_in_place(tiny_model_dir, tmp_path, monkeypatch):
    """Wiring only: a real CPU compile of even the tiny model takes minutes on a busy 2-core machine (checked
    by hand: identical logits). The blocks are compiled in place, so checkpoint names do not change."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((type(self).__name__, kw)))
    run = synthetic_run(tmp_path / "run")
    publish_ig_stage(run, load_tokenizer(str(tiny_model_dir)), str(tiny_model_dir))
    sft.run(SFTConfig(model=str(tiny_model_dir), compile=True, sample=8, valid_sample=0, batch_size=8, max_steps=1, name="c"), run)
    layers = load_model(str(tiny_model_dir)).config.num_hidden_layers
    assert compiled == [("LlamaDecoderLayer", {"dynamic": True})] * layers
