"""GapDropout: the same distribution of masks as nn.Dropout (rate, independence, scaling, gradient)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from igdrec.dropout import GAP_DROPOUT_MAX_P, GapDropout, dropped_positions, use_gap_dropout


@pytest.mark.parametrize("p", [0.05, 0.2])
def test_each_position_is_dropped_with_probability_p_independently(p):
    n, draws = 4000, 300
    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros((draws, n), dtype=torch.bool)
    for d in range(draws):
        positions = dropped_positions(n, p, generator=generator)
        assert bool((positions[1:] > positions[:-1]).all()) and (len(positions) == 0 or 0 <= int(positions[0]) and int(positions[-1]) < n)
        masks[d, positions] = True
    total = draws * n
    sigma = math.sqrt(p * (1 - p) / total)
    assert abs(masks.float().mean().item() - p) < 5 * sigma
    # no position is favoured: the first, middle and last positions are dropped at the same rate
    per_position = masks.float().mean(dim=0)
    for block in (per_position[:400], per_position[n // 2:n // 2 + 400], per_position[-400:]):
        assert abs(block.mean().item() - p) < 5 * math.sqrt(p * (1 - p) / (400 * draws))
    # neighbours and elements two apart are independent: both dropped with probability p²
    for lag in (1, 2):
        both = (masks[:, lag:] & masks[:, :-lag]).float().mean().item()
        assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / (draws * (n - lag)))
    # the number dropped per draw is Binomial(n, p): its variance too
    counts = masks.sum(dim=1).double()
    assert counts.var().item() == pytest.approx(n * p * (1 - p), rel=0.25)


def test_forward_scales_kept_elements_and_the_gradient_follows_the_mask():
    torch.manual_seed(0)
    x = torch.randn(3, 50, 40, requires_grad=True)
    dropout = GapDropout(0.1).train()
    y = dropout(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.9)
    assert 0.03 < 1 - kept.float().mean().item() < 0.2
    (y * 2).sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * 2 / 0.9)
    assert torch.equal(dropout.eval()(x), x)


def test_same_seed_same_mask_and_high_rates_use_nn_dropout():
    x = torch.randn(1000)
    torch.manual_seed(3)
    a = GapDropout(0.05).train()(x)
    torch.manual_seed(3)
    assert torch.equal(a, GapDropout(0.05).train()(x))
    p = 0.5
    assert p > GAP_DROPOUT_MAX_P
    torch.manual_seed(3)
    high = GapDropout(p).train()(x)
    torch.manual_seed(3)
    assert torch.equal(high, nn.Dropout(p).train()(x))


def test_swap_keeps_rates_and_skips_other_dropouts():
    model = nn.Sequential(nn.Dropout(0.05), nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)), nn.Dropout(0.6), nn.Dropout(0.0))
    model.eval()
    assert use_gap_dropout(model) == 2
    assert [type(m).__name__ for m in model.modules() if isinstance(m, nn.Dropout)] == ["GapDropout", "GapDropout", "Dropout", "Dropout"]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.05, 0.1, 0.6, 0.0]
    assert not any(m.training for m in model.modules())
    assert use_gap_dropout(model, enabled=False) == 2
    assert not any(isinstance(m, GapDropout) for m in model.modules())


def test_sft_model_on_cpu_draws_lora_dropout_as_gaps(tiny_model_dir):
    from igdrec.config import SFTConfig
    from igdrec.stages import sft

    model = sft.prepare_model(SFTConfig(model=str(tiny_model_dir), lora_dropout=0.05), torch.device("cpu"))
    rates = [m.p for m in model.modules() if isinstance(m, GapDropout)]
    assert rates and set(rates) == {0.05}
    assert not any(type(m) is nn.Dropout and m.p > 0 for m in model.modules())


def test_compiled_callers_draw_the_same_mask():
    """The number of dropped positions depends on the draws, which dynamo cannot trace; `--compile` must
    leave the drawing to eager mode instead of failing ("eager" backend: dynamo's tracing, no codegen)."""
    layer = nn.Sequential(nn.Linear(8, 8), GapDropout(0.1)).train()
    x = torch.randn(50, 8)
    torch.manual_seed(4)
    eager = layer(x)
    torch.manual_seed(4)
    compiled = torch.compile(layer, backend="eager", dynamic=True)(x)
    torch.testing.assert_close(compiled, eager)
    assert (eager == 0).any()
