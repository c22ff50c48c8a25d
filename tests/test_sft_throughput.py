"""Throughput measures that must not change what is computed: length-grouped micro-batches, the shared
prompt prefix computed once, cached encodings (docs/method.md §5; training.py's module docstring)."""

import numpy as np
import pytest
import torch
from ig_helpers import brute_force_sample_ig, publish_ig_stage
from safetensors.torch import load_file

from fixtures import synthetic_dataset, synthetic_run
from igdrec import prompt, schema, training
from igdrec.config import SFTConfig
from igdrec.modeling import load_model, load_tokenizer
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
    return training.SFTExamples(
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
    assert training.shared_prefix_len([np.array([1, 2, 3, 4]), np.array([1, 2, 3, 5])], [4, 4]) == 3
    assert training.shared_prefix_len([np.array([1, 2, 3, 4]), np.array([1, 2, 3, 4])], [2, 3]) == 1


@pytest.mark.parametrize("scheme", ["igd", "cft"])
def test_shared_prefix_forward_gives_the_padded_forwards_loss_and_gradient(setup, tiny_model_dir, scheme):
    model = load_model(str(tiny_model_dir)).train()
    batch = examples(setup, scheme).collate(ROWS)
    results = {}
    for share in (False, True):
        loss_module = training.WeightedLoss(model, scheme, 0.3, share_prefix=share)
        assert loss_module.sharing() == share
        model.zero_grad()
        numerator, ce = loss_module(batch)
        numerator.backward()
        results[share] = (numerator.detach(), ce.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-6)
    for name, grad in results[False][2].items():
        torch.testing.assert_close(results[True][2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
