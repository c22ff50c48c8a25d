import math

import pytest
import torch

from igdrec import weighting


def test_pos_weights_decay_linearly_from_one_to_beta():
    assert weighting.pos_weights(5, 0.5).tolist() == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5])
    assert weighting.pos_weights(2, 0.2).tolist() == pytest.approx([1.0, 0.2])
    assert weighting.pos_weights(1, 0.3).tolist() == [1.0]
    # CFT trains with the Pos weights
    assert torch.equal(weighting.token_weights("cft", 4, 0.1), weighting.token_weights("pos", 4, 0.1))


def test_igd_weights_put_beta_on_zero_ig_tokens_only():
    zero = torch.tensor([True, False, True, False])
    assert weighting.token_weights("igd", 4, 0.1, zero).tolist() == pytest.approx([0.1, 1.0, 0.1, 1.0])
    assert weighting.token_weights("plain", 3, 0.1).tolist() == [1.0, 1.0, 1.0]
    # beta = 1 is plain training
    assert torch.equal(weighting.token_weights("igd", 4, 1.0, zero), weighting.token_weights("plain", 4, 1.0))
    with pytest.raises(ValueError):
        weighting.token_weights("igd", 4, 0.1)
    with pytest.raises(ValueError):
        weighting.token_weights("focal", 4, 0.1)


def _hand_ce(logits, target):
    """-log softmax(logits)[target], written out."""
    z = [float(v) for v in logits]
    return math.log(sum(math.exp(v) for v in z)) - z[target]


def test_weighted_ce_sum_matches_hand_computation_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    targets = torch.tensor([[weighting.IGNORE, 4, 2], [1, 6, 0]])
    weights = torch.tensor([[0.0, 1.0, 0.1], [1.0, 0.875, 0.75]])
    numerator, ce = weighting.weighted_ce_sum(logits, targets, weights)
    expected = 0.0
    for b in range(2):
        for t in range(3):
            if targets[b, t] != weighting.IGNORE:
                hand = _hand_ce(logits[b, t], int(targets[b, t]))
                assert ce[b, t].item() == pytest.approx(hand, rel=1e-5)
                expected += float(weights[b, t]) * hand
    assert ce[0, 0].item() == 0.0
    assert numerator.item() == pytest.approx(expected, rel=1e-5)


def test_cft_numerator_adds_alpha_times_the_causal_term():
    torch.manual_seed(1)
    logits, ref = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    targets = torch.tensor([[3, 0, 4]])
    weights = weighting.pos_weights(3, 0.5)[None]
    numerator, _ = weighting.cft_ce_sum(logits, ref, targets, weights, alpha=0.2)
    expected = sum(
        float(weights[0, t]) * (_hand_ce(logits[0, t], int(targets[0, t])) + 0.2 * _hand_ce(logits[0, t] - ref[0, t], int(targets[0, t])))
        for t in range(3)
    )
    assert numerator.item() == pytest.approx(expected, rel=1e-5)
    # alpha = 0 is Pos
    pos, _ = weighting.weighted_ce_sum(logits, targets, weights)
    assert weighting.cft_ce_sum(logits, ref, targets, weights, alpha=0.0)[0].item() == pytest.approx(pos.item())
