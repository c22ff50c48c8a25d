"""Token weights of the fine-tuning objectives and the weighted loss (docs/method.md §5).

Weights are computed per sample when a batch is collated and shipped with it as a tensor, so the training
step is the plain step plus one elementwise multiply. The batch loss is Σ w·CE / Σ w with Σ w taken over the
whole effective batch: callers pass that normaliser in, because with gradient accumulation a micro-batch
only sees its own share of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from igdrec.config import WEIGHTINGS

IGNORE = -100  # label of padding positions: F.cross_entropy gives them CE = 0


def plain_weights(n: int) -> torch.Tensor:
    return torch.ones(n)


def pos_weights(n: int, beta: float) -> torch.Tensor:
    """Positional decay: w_k = 1 - (k-1)(1-beta)/(n-1) for the k-th of n target tokens (1 ... beta)."""
    if n == 1:
        return torch.ones(1)
    k = torch.arange(n, dtype=torch.float32)
    return 1.0 - k * (1.0 - beta) / (n - 1)


def igd_weights(zero_ig: torch.Tensor, beta: float) -> torch.Tensor:
    """IGD (paper Eq. 8): beta on zero-IG (forced) tokens, 1 elsewhere."""
    return torch.where(zero_ig, torch.tensor(beta, dtype=torch.float32), torch.tensor(1.0))


def token_weights(scheme: str, n: int, beta: float, zero_ig: torch.Tensor | None = None) -> torch.Tensor:
    """Weights of one sample's n target tokens under `scheme` (CFT uses the Pos weights)."""
    if scheme == "plain":
        return plain_weights(n)
    if scheme in ("pos", "cft"):
        return pos_weights(n, beta)
    if scheme == "igd":
        if zero_ig is None:
            raise ValueError("IGD weights need the zero-IG flags of the target tokens")
        return igd_weights(zero_ig, beta)
    raise ValueError(f"unknown weighting {scheme!r}; known: {', '.join(WEIGHTINGS)}")


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy, (B, m, V) logits vs (B, m) targets; IGNORE positions give 0. Always fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none").view(targets.shape)


def weighted_ce_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w·CE over the micro-batch, per-token CE); divide the sum by the effective batch's Σ w."""
    ce = token_ce(logits, targets)
    return (weights * ce).sum(), ce


def cft_ce_sum(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CFT numerator: Σ w·CE(logits) + α·Σ w·CE(logits − logits_ref), with Pos weights w.

    `ref_logits` are the reference-prompt pass's logits at the same target tokens. Gradients flow through
    both passes, as in the reference implementation (one model, two forwards).
    """
    main, ce = weighted_ce_sum(logits, targets, weights)
    if alpha == 0.0:
        return main, ce
    causal, _ = weighted_ce_sum(logits.float() - ref_logits.float(), targets, weights)
    return main + alpha * causal, ce
