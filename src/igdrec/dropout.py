"""Dropout whose mask is drawn from the gaps between dropped elements (LoRA dropout on CPU).

`nn.Dropout(p)` draws one Bernoulli number per element. On CPU that draw is most of dropout's cost: with
LoRA on every linear layer of the embedded model (seven masks per layer, each the size of the layer's
input), it took 19% of a fine-tuning step. LoRA's dropout rate is small (0.05), so almost every draw says
"keep". `GapDropout` draws instead the gaps between dropped elements, about p·n numbers instead of n:

    in a row of independent Bernoulli(p) trials, the distance G from one success to the next (or from the
    start to the first) is Geometric(p) on {1, 2, ...}, G = floor(ln U / ln(1 - p)) + 1 with U uniform on
    (0, 1], and successive gaps are independent.

So dropping the elements at positions G1 - 1, G1 + G2 - 1, ... of the flattened input gives each element
the same chance p of being dropped, independently of all others: the same distribution of masks as
`nn.Dropout` (not the same masks for a seed), with kept elements scaled by 1 / (1 - p) as there.
tests/unit/test_dropout.py checks the rate, the independence of neighbours and the gradient.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Above this rate drawing gaps saves little over one draw per element; nn.Dropout's own path is used.
GAP_DROPOUT_MAX_P = 0.25


@torch.compiler.disable  # its length depends on the draws: compiled callers (`--compile`) run it eagerly
def dropped_positions(n: int, p: float, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """Sorted positions in range(n) where independent Bernoulli(p) trials succeed, drawn as geometric gaps."""
    if n == 0 or p <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    log_keep = math.log1p(-p)
    expected = n * p
    chunk = int(expected + 6 * math.sqrt(expected * (1 - p)) + 16)  # almost always enough in one draw
    parts, end = [], -1  # end: position of the last success drawn so far
    while end < n - 1:
        uniform = 1.0 - torch.rand(chunk, dtype=torch.float64, device=device, generator=generator)  # (0, 1]
        gaps = torch.floor(torch.log(uniform) / log_keep).long() + 1
        positions = end + torch.cumsum(gaps, dim=0)
        parts.append(positions)
        end = int(positions[-1])
    positions = torch.cat(parts)
    return positions[: int(torch.searchsorted(positions, n))]  # sorted: a slice, not a boolean mask's nonzero


class GapDropout(nn.Dropout):
    """`nn.Dropout` with the mask drawn as geometric gaps (module docstring); same p, same distribution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p > GAP_DROPOUT_MAX_P:
            return super().forward(x)
        scale = torch.full((x.numel(),), 1.0 / (1.0 - self.p), dtype=x.dtype, device=x.device)
        scale[dropped_positions(x.numel(), self.p, x.device)] = 0.0
        return x * scale.view(x.shape)


def use_gap_dropout(model: nn.Module, enabled: bool = True) -> int:
    """Swap every `nn.Dropout` with 0 < p <= GAP_DROPOUT_MAX_P (the LoRA adapters') for a `GapDropout` of
    the same p, or back with `enabled=False`; returns how many were swapped. Meant for CPU, where it saves
    time; on CUDA a Bernoulli draw per element is cheap and the gaps' length needs a host sync."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if enabled and type(child) is nn.Dropout and 0 < child.p <= GAP_DROPOUT_MAX_P:
                replacement = GapDropout(child.p, child.inplace)
            elif not enabled and type(child) is GapDropout:
                replacement = nn.Dropout(child.p, child.inplace)
            else:
                continue
            replacement.train(child.training)
            setattr(parent, name, replacement)
            swapped += 1
    return swapped
