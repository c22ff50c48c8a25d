"""MSL (docs/method.md §5.1): the masked softmax loss against a brute-force hand computation, its edge cases
(every token allowed = plain CE; no gradient on masked logits) and the adaptive temperature by hand."""

import math

import numpy as np
import pytest
import torch
from decode_helpers import fixture_trie
from ig_helpers import brute_force_sample_ig

from fixtures import synthetic_dataset
from igdrec import prompt, weighting
from igdrec.distributed import World
from igdrec.modeling import load_model, load_tokenizer
from igdrec.sft_data import SFTExamples
from igdrec.sft_loss import WeightedLoss
from igdrec.stages.sft import target_nodes

BETA = 0.3
ROWS = [0, 3, 5, 8, 11]


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    items, splits = synthetic_dataset()
    titles = items["title"].to_list()
    train = splits["train"]
    trie = fixture_trie(tokenizer, items, train)
    zero_ig = [np.asarray(z, dtype=bool) for z in brute_force_sample_ig(tokenizer, titles, train, train)["zero_ig"].to_list()]
    return tokenizer, model, titles, train, trie, zero_ig


def examples(setup, scheme):
    tokenizer, _, titles, train, trie, zero_ig = setup
    return SFTExamples(
        tokenizer, train["history_item_ids"].to_list(), train["item_id"].to_list(), titles,
        prompt.item_token_sequences(tokenizer, titles), "movies", scheme, BETA, cutoff_len=512, zero_ig=zero_ig,
        trie=trie, target_nodes=target_nodes(trie, train["item_id"].to_numpy()),
    )


def allowed_by_brute_force(sequences, target):
    """At each position of `target`: the tokens that continue some catalog sequence sharing its prefix."""
    return [sorted({s[k] for s in sequences if len(s) > k and list(s[:k]) == list(target[:k])}) for k in range(len(target))]


def hand_msl_loss(setup, scheme, tau):
    """Σ w·τ·CE(z/τ over the allowed tokens) / Σ w from separate unpadded forwards; w = 0 where one token is
    allowed, else 1 (msl) or IGD's weight (msl-igd)."""
    tokenizer, model, titles, train, _, zero_ig = setup
    sequences = prompt.item_token_sequences(tokenizer, titles)
    numerator, total = 0.0, 0.0
    for row in ROWS:
        history = [titles[i] for i in train["history_item_ids"][row]]
        target = sequences[train["item_id"][row]]
        encoded = prompt.encode_sample(tokenizer, history, "movies", target, 512)
        logits = model(torch.tensor([encoded.input_ids])).logits[0, encoded.prompt_len - 1:-1].double()
        for k, allowed in enumerate(allowed_by_brute_force(sequences, target)):
            if len(allowed) < 2:
                continue
            log_p = torch.log_softmax(logits[k, allowed] / tau, dim=-1)[allowed.index(target[k])]
            w = BETA if scheme == "msl-igd" and zero_ig[row][k] else 1.0
            numerator, total = numerator + w * -tau * log_p, total + w
    return numerator / total


@pytest.mark.parametrize("scheme", ["msl", "msl-igd"])
@pytest.mark.parametrize("tau", [1.5, 3.7])
def test_msl_batch_loss_equals_a_softmax_over_the_allowed_tokens_by_hand(setup, scheme, tau):
    batch = examples(setup, scheme).collate(ROWS)
    loss = WeightedLoss(setup[1], scheme, 0.0, share_prefix=True, first_tokens=int(setup[4].child_count[0])).eval()
    loss.temperature.tau = tau
    with torch.no_grad():
        numerator, _ = loss(batch)
        expected = hand_msl_loss(setup, scheme, tau)
    assert (numerator / batch.weights.sum()).item() == pytest.approx(expected.item(), rel=1e-5)


def test_msl_igd_puts_beta_on_zero_ig_tokens_that_offer_a_choice(setup):
    """Forced positions weigh 0 in both; a zero-IG position with siblings (here: every token flagged) weighs β."""
    msl = examples(setup, "msl").collate(ROWS)
    flagged = examples(setup, "msl-igd")
    flagged.zero_ig = [np.ones_like(z) for z in flagged.zero_ig]
    both = flagged.collate(ROWS)
    assert torch.equal(msl.targets, both.targets) and torch.equal(msl.allowed, both.allowed)
    assert (msl.weights == 0).any() and (msl.weights == 1).any()
    torch.testing.assert_close(both.weights, BETA * msl.weights)


def test_collated_allowed_pairs_are_the_brute_force_trie_children(setup):
    tokenizer, _, titles, train, _, _ = setup
    sequences = prompt.item_token_sequences(tokenizer, titles)
    batch = examples(setup, "msl").collate(ROWS)
    m = batch.targets.shape[1]
    got = {}
    for position, token in batch.allowed.T.tolist():
        got.setdefault(position, []).append(token)
    for b, row in enumerate(ROWS):
        target = sequences[train["item_id"][row]]
        for k, allowed in enumerate(allowed_by_brute_force(sequences, target)):
            assert sorted(got.pop(b * m + m - len(target) + k)) == allowed
    assert not got  # nothing on padding positions


def test_with_every_token_allowed_msl_is_plain_cross_entropy():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 4, 11), torch.randint(0, 11, (3, 4))
    targets[0, :2] = weighting.IGNORE
    everything = torch.ones(3, 4, 11, dtype=torch.bool)
    torch.testing.assert_close(weighting.msl_ce(logits, targets, everything, 1.0), weighting.token_ce(logits, targets))


def test_gradients_are_exactly_zero_on_disallowed_logits():
    torch.manual_seed(1)
    logits, targets = torch.randn(2, 3, 13, requires_grad=True), torch.randint(0, 13, (2, 3))
    mask = torch.rand(2, 3, 13) < 0.4
    mask.scatter_(2, targets[..., None], True)
    pairs = torch.nonzero(mask.flatten(0, 1)).T
    assert torch.equal(weighting.allowed_mask(pairs, targets, 13), mask)
    numerator, _ = weighting.msl_ce_sum(logits, targets, torch.rand(2, 3), mask, 2.5)
    numerator.backward()
    assert torch.all(logits.grad[~mask] == 0)
    assert torch.all(logits.grad[mask] != 0)


def test_masked_target_of_a_padding_position_gives_no_loss_and_no_nan():
    logits, targets = torch.randn(1, 2, 5, requires_grad=True), torch.tensor([[weighting.IGNORE, 2]])
    mask = weighting.allowed_mask(torch.tensor([[1], [2]]), targets, 5)  # position 1 allows token 2 only
    numerator, ce = weighting.msl_ce_sum(logits, targets, torch.tensor([[0.0, 0.0]]), mask, 1.5)
    numerator.backward()
    assert ce.tolist() == [[0.0, 0.0]] and torch.isfinite(logits.grad).all()


def hand_tau(tau, positives, allowed_logits, n_first):
    """The authors' ATS update written out with numpy (defaults η = 0.25, γ = 0.05, clip [1.5, 5])."""
    diff = np.mean(positives) - np.mean(allowed_logits)
    var = np.var(allowed_logits, ddof=1)
    c = math.log(n_first * 0.25)
    estimate = (diff + math.sqrt(max(diff ** 2 - 2 * c * var, 0.0))) / (2 * c)
    return 0.95 * tau + 0.05 * min(max(estimate, 1.5), 5.0)


@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_adaptive_temperature_matches_a_hand_computation(scale):
    """Statistics from the first target position of each row only, over two micro-batches of one step."""
    torch.manual_seed(2)
    V, N = 40, 24  # N first tokens allowed at the first position
    temperature = weighting.AdaptiveTemperature(N)
    positives, allowed_logits = [], []
    for _ in range(2):
        logits = torch.randn(3, 4, V) * scale
        targets = torch.randint(0, N, (3, 4))
        targets[1, 0] = weighting.IGNORE  # row 1's first target position is column 1
        mask = torch.zeros(3, 4, V, dtype=torch.bool)
        mask[:, :, :N] = True
        mask[:, 2:, N:] = True  # later positions: other allowed sets, which must not count
        temperature.observe(logits, targets, weighting.allowed_mask(torch.nonzero(mask.flatten(0, 1)).T, targets, V))
        for row, col in ((0, 0), (1, 1), (2, 0)):
            positives.append(float(logits[row, col, targets[row, col]]))
            allowed_logits.extend(logits[row, col, :N].tolist())
    assert temperature.update(World()) == pytest.approx(hand_tau(1.5, positives, allowed_logits, N), rel=1e-9)
    assert temperature.update(World()) == temperature.tau  # no statistics since: τ stays


def test_adaptive_temperature_clips_where_the_root_is_negative_or_infinite():
    # N·η < 1: log(N·η) < 0, the larger root is negative and the clip gives 1.5, as the authors' code does
    assert weighting.AdaptiveTemperature.next_tau(2.0, 3.0, 1.0, 0.5, 3) == pytest.approx(0.95 * 2.0 + 0.05 * 1.5)
    # N·η = 1: division by zero, +inf, clipped to 5
    assert weighting.AdaptiveTemperature.next_tau(2.0, 3.0, 1.0, 0.5, 4) == pytest.approx(0.95 * 2.0 + 0.05 * 5.0)
    assert weighting.AdaptiveTemperature.next_tau(2.0, 1.0, 1.0, 0.0, 4) == 2.0  # 0/0: τ kept


def test_msl_weights_need_the_choice_flags():
    with pytest.raises(ValueError, match="choice"):
        weighting.token_weights("msl", 3, 0.1)
    choice = torch.tensor([True, False, True])
    assert weighting.token_weights("msl", 3, 0.1, choice=choice).tolist() == [1.0, 0.0, 1.0]
    zero = torch.tensor([True, True, False])
    assert weighting.token_weights("msl-igd", 3, 0.1, zero, choice).tolist() == pytest.approx([0.1, 0.0, 1.0])


@pytest.mark.parametrize("scheme", ["msl", "msl-igd"])
def test_a_target_outside_the_catalog_is_left_unlabelled_with_unknown_ig(setup, scheme):
    """A validation target the trie cannot spell (`--catalog train`): no label, no weight, no IG flags."""
    data = examples(setup, scheme)
    data.target_nodes = list(data.target_nodes)
    data.zero_ig = list(data.zero_ig)
    data.target_nodes[ROWS[1]] = data.zero_ig[ROWS[1]] = None
    batch = data.collate(ROWS)
    assert torch.all(batch.targets[1] == weighting.IGNORE) and torch.all(batch.weights[1] == 0)
    assert not batch.positive_ig[1].any() and not batch.zero_ig[1].any()
    m = batch.targets.shape[1]
    assert not ((batch.allowed[0] >= m) & (batch.allowed[0] < 2 * m)).any()
    assert torch.all(batch.targets[0] == examples(setup, scheme).collate(ROWS).targets[0])
