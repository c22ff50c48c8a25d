"""Token weights of the fine-tuning objectives and the weighted loss (docs/method.md §5).

Weights are computed per sample when a batch is collated and shipped with it as a tensor, so the training
step is the plain step plus one elementwise multiply. The batch loss is Σ w·CE / Σ w with Σ w taken over the
whole effective batch: callers pass that normaliser in, because with gradient accumulation a micro-batch
only sees its own share of it.
"""

from __future__ import annotations

import math

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


def token_weights(scheme: str, n: int, beta: float, zero_ig: torch.Tensor | None = None,
                  choice: torch.Tensor | None = None) -> torch.Tensor:
    """Weights of one sample's n target tokens under `scheme` (CFT uses the Pos weights).

    `choice` (MSL): the target position offers more than one trie-valid token. MSL's loss at a forced
    position is exactly 0 and the authors leave such positions out of the mean, so they weigh 0 here: Σ w
    then counts what they count (docs/method.md §5.1).
    """
    if scheme == "plain":
        return plain_weights(n)
    if scheme in ("pos", "cft"):
        return pos_weights(n, beta)
    if scheme in ("igd", "msl-igd"):
        if zero_ig is None:
            raise ValueError("IGD weights need the zero-IG flags of the target tokens")
        weights = igd_weights(zero_ig, beta)
        return weights if scheme == "igd" else weights * _msl_choice(choice)
    if scheme == "msl":
        return _msl_choice(choice).float()
    raise ValueError(f"unknown weighting {scheme!r}; known: {', '.join(WEIGHTINGS)}")


def _msl_choice(choice: torch.Tensor | None) -> torch.Tensor:
    if choice is None:
        raise ValueError("MSL weights need to know which target positions offer a choice of tokens")
    return choice


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


# -- MSL: the masked softmax loss and its adaptive temperature (docs/method.md §5.1) ---------------------
def allowed_mask(allowed: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, m, V) bool: the trie-valid tokens of each target position, from the (2, K) pairs (flat position
    b·m + j, token) a batch carries. Unlabelled positions allow everything, so no row is all -inf."""
    mask = torch.zeros(targets.numel(), vocab, dtype=torch.bool, device=targets.device)
    mask[allowed[0], allowed[1]] = True
    mask |= (targets == IGNORE).flatten()[:, None]
    return mask.view(*targets.shape, vocab)


def msl_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-token MSL term τ · CE(z/τ) with the softmax over the allowed tokens only; IGNORE positions give 0.

    The factor τ keeps the gradient on the logits at softmax(z/τ) − onehot, as in the authors' code.
    """
    masked = logits.float().masked_fill(~mask, float("-inf")) / tau
    return tau * token_ce(masked, targets)


def msl_ce_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
               tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w·MSL term over the micro-batch, per-token MSL term); divide by the effective batch's Σ w."""
    ce = msl_ce(logits, targets, mask, tau)
    return (weights * ce).sum(), ce


class AdaptiveTemperature:
    """MSL's adaptive temperature (ATS), with the defaults of the authors' code (docs/method.md §5.1).

    From the logits at each sample's first target position (where all N first tokens of the catalog are
    allowed): Δ = mean positive logit − mean allowed logit, σ² = variance of the allowed logits,
    C = log(N·η); τ̂ = (Δ + sqrt(max(Δ² − 2Cσ², 0))) / (2C) clipped to [1.5, 5], and τ ← (1 − γ)·τ + γ·τ̂.
    The statistics of one optimiser step's effective batch (all ranks) set the τ of the next step, so τ
    does not depend on how the batch is split into micro-batches or processes.
    """

    INITIAL, ETA, EMA, LOW, HIGH = 1.5, 0.25, 0.05, 1.5, 5.0

    def __init__(self, first_tokens: int):
        self.first_tokens = first_tokens  # N: the trie root's children
        self.tau = self.INITIAL
        self._sums = None  # n_pos, Σ pos, n_allowed, Σ allowed, Σ allowed²

    def observe(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> None:
        """Add the first target position of every row of a training micro-batch to this step's statistics."""
        labelled = targets != IGNORE
        first = labelled & (labelled.cumsum(dim=1) == 1)
        z = logits.detach()[first].double()
        allowed = mask[first]
        positive = z.gather(1, targets[first][:, None])
        values = z[allowed]
        sums = torch.stack([torch.tensor(float(len(positive)), dtype=torch.float64, device=z.device), positive.sum(),
                            allowed.sum().double(), values.sum(), (values * values).sum()])
        self._sums = sums if self._sums is None else self._sums + sums

    def update(self, world) -> float:
        """Fold this step's statistics into τ (after the optimiser step); returns the new τ."""
        if self._sums is None:
            return self.tau
        n_pos, s_pos, n, s, s2 = world.all_reduce(self._sums).tolist()
        self._sums = None
        if n_pos == 0 or n < 2:
            return self.tau
        self.tau = self.next_tau(self.tau, s_pos / n_pos, s / n, (s2 - s * s / n) / (n - 1), self.first_tokens)
        return self.tau

    @classmethod
    def next_tau(cls, tau: float, positive_mean: float, allowed_mean: float, allowed_var: float, first_tokens: int) -> float:
        """One ATS update from the step's statistics. With N·η ≤ 1 (at most 4 first tokens) log(N·η) ≤ 0 and
        the root is negative or infinite; the clip then gives 1.5 or 5, as in the authors' code, and 0/0 keeps τ."""
        diff, c = positive_mean - allowed_mean, math.log(first_tokens * cls.ETA)
        root = math.sqrt(max(diff * diff - 2 * c * allowed_var, 0.0))
        if c == 0.0:
            if diff + root == 0.0:
                return tau
            estimate = math.copysign(math.inf, diff + root)
        else:
            estimate = (diff + root) / (2 * c)
        estimate = min(max(estimate, cls.LOW), cls.HIGH)
        return (1 - cls.EMA) * tau + cls.EMA * estimate
