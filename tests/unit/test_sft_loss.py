"""The batched, padded training loss against a hand computation from separate, unpadded forward passes."""

import pytest
import torch
from ig_helpers import brute_force_sample_ig

from fixtures import synthetic_dataset
from igdrec import prompt, training
from igdrec.distributed import World
from igdrec.modeling import load_model, load_tokenizer
from igdrec.sft_data import SFTExamples
from igdrec.sft_loss import WeightedLoss

BETA, ALPHA = 0.1, 0.3
ROWS = [0, 3, 5, 8]


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    items, splits = synthetic_dataset()
    titles = items["title"].to_list()
    train = splits["train"]
    ig = brute_force_sample_ig(tokenizer, titles, train, train)
    zero_ig = [list(z) for z in ig["zero_ig"].to_list()]
    return tokenizer, model, titles, train, zero_ig


def examples(setup, scheme):
    tokenizer, _, titles, train, zero_ig = setup
    return SFTExamples(
        tokenizer, train["history_item_ids"].to_list(), train["item_id"].to_list(), titles,
        prompt.item_token_sequences(tokenizer, titles), "movies", scheme, BETA, cutoff_len=512,
        zero_ig=zero_ig, with_reference=scheme == "cft",
    )


def hand_terms(setup, row):
    """Per-token CE of one sample from an unpadded forward, plus CE of (logits - reference logits)."""
    tokenizer, model, titles, train, _ = setup
    history = [titles[i] for i in train["history_item_ids"][row]]
    target = prompt.item_token_sequence(tokenizer, titles[train["item_id"][row]])
    encoded = prompt.encode_sample(tokenizer, history, "movies", target, 512)
    logits = model(torch.tensor([encoded.input_ids])).logits[0, encoded.prompt_len - 1:-1]
    ref_prompt = tokenizer(prompt.reference_prompt("movies"), add_special_tokens=False)["input_ids"]
    ref_logits = model(torch.tensor([ref_prompt + target])).logits[0, len(ref_prompt) - 1:-1]
    y = torch.tensor(target)
    ce = -torch.log_softmax(logits, -1)[torch.arange(len(target)), y]
    ce_causal = -torch.log_softmax(logits - ref_logits, -1)[torch.arange(len(target)), y]
    return ce, ce_causal


def hand_igd_loss(setup):
    zero_ig = setup[4]
    numerator, total = 0.0, 0.0
    for row in ROWS:
        ce, _ = hand_terms(setup, row)
        w = torch.tensor([BETA if z else 1.0 for z in zero_ig[row]])
        numerator, total = numerator + (w * ce).sum(), total + w.sum()
    return numerator / total


def test_igd_batch_loss_equals_hand_computation(setup):
    assert any(any(setup[4][r]) for r in ROWS) and not all(all(setup[4][r]) for r in ROWS)
    batch = examples(setup, "igd").collate(ROWS)
    with torch.no_grad():
        numerator, _ = WeightedLoss(setup[1], "igd", 0.0, share_prefix=True)(batch)
        expected = hand_igd_loss(setup)
    assert (numerator / batch.weights.sum()).item() == pytest.approx(expected.item(), rel=1e-5)


def test_cft_loss_equals_pos_plus_alpha_causal_from_two_separate_passes(setup):
    batch = examples(setup, "cft").collate(ROWS)
    with torch.no_grad():
        numerator, _ = WeightedLoss(setup[1], "cft", ALPHA, share_prefix=True)(batch)
        main, causal, total = 0.0, 0.0, 0.0
        for row in ROWS:
            ce, ce_causal = hand_terms(setup, row)
            n = len(ce)
            w = torch.tensor([1.0 - k * (1.0 - BETA) / (n - 1) for k in range(n)]) if n > 1 else torch.ones(1)
            main, causal, total = main + (w * ce).sum(), causal + (w * ce_causal).sum(), total + w.sum()
    expected = main / total + ALPHA * causal / total
    assert (numerator / batch.weights.sum()).item() == pytest.approx(expected.item(), rel=1e-5)


def test_accumulated_gradient_normalises_by_the_whole_effective_batch(setup):
    model = setup[1]
    data = examples(setup, "igd")
    micro_batches = [data.collate([row]) for row in ROWS]  # one sample per micro-batch, unequal Σw
    model.zero_grad()
    training.backward_effective_batch(WeightedLoss(model, "igd", 0.0, share_prefix=True), micro_batches, World(), torch.amp.GradScaler("cpu", enabled=False))
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hand_igd_loss(setup).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(accumulated[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)
    model.zero_grad()
