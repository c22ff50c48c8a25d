"""The fine-tuning forward: target-token logits of a batch (its shared prompt prefix computed once) and
the weighted loss of the scheme (igdrec.weighting; docs/method.md §5).

Shared prefix: every prompt starts with the same instruction text (about a third of an ml-100k sample's
tokens). Under causal attention these tokens' hidden states are identical in every row, so they are
computed once per micro-batch and every row attends to that one copy (its key/value cache repeated over the
batch; the gradient through the repeat sums the rows' contributions). This is exact only when no dropout
is active (LoRA dropout draws a different mask per row), so it switches itself off when dropout would act.
Only the positions that predict target tokens go through the LM head.
"""

from __future__ import annotations

import torch
from torch import nn

from igdrec import weighting
from igdrec.config import MSL_WEIGHTINGS
from igdrec.modeling import kv_cache_kwargs, returned_cache
from igdrec.sft_data import Batch


def target_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, m: int, prefix_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits predicting the last m tokens of each left-padded row, (B, m, V).

    With `prefix_ids` (the p tokens every row starts with), those are run once and the rest of every row
    attends to their cached keys/values: the same logits as one padded pass, with p·(B−1) fewer tokens.
    """
    width, rows = input_ids.shape[1], input_ids.shape[0]
    if prefix_ids is None or rows == 1:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        keep = torch.arange(width - m - 1, width - 1, device=input_ids.device)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep, use_cache=False)
        return out.logits
    p = prefix_ids.shape[1]
    prefix_positions = torch.arange(p, device=input_ids.device)[None]
    cache = returned_cache(model(input_ids=prefix_ids, position_ids=prefix_positions, logits_to_keep=1, use_cache=True))
    cache.batch_repeat_interleave(rows)  # differentiable: the prefix's gradient sums over the rows
    # Dropping the first p columns of the padded layout removes the longest row's prefix; a shorter row keeps
    # its padding and its own prefix copy in front of its rest. Masking those columns like padding gives exactly
    # the mask of the first width − p columns of the original layout (row r is real from column width − len_r).
    rest_ids, rest_mask = input_ids[:, p:], attention_mask[:, : width - p]
    position_ids = p - 1 + rest_mask.cumsum(-1)
    mask = torch.cat([attention_mask.new_ones(rows, p), rest_mask], dim=1)
    keep = torch.arange(width - p - m - 1, width - p - 1, device=input_ids.device)
    out = model(input_ids=rest_ids, attention_mask=mask, position_ids=position_ids, **kv_cache_kwargs(model, cache),
                logits_to_keep=keep, use_cache=True)
    return out.logits


def has_dropout(model: nn.Module) -> bool:
    """Whether a training-mode forward of `model` draws dropout masks (LoRA dropout, attention dropout...)."""
    if any(isinstance(module, nn.Dropout) and module.p > 0 for module in model.modules()):
        return True
    config = getattr(model, "config", None)
    return any(float(getattr(config, name, 0.0) or 0.0) > 0 for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "attn_pdrop"))


class WeightedLoss(nn.Module):
    """Micro-batch → (Σ w·CE numerator, per-token CE). One module so DDP sees CFT's two passes as one forward.

    `share_prefix`: compute the rows' common prompt prefix once (see the module docstring); used only where
    it is exact, i.e. in eval mode or when the model has no dropout. MSL schemes take `first_tokens`, the
    number of the catalog's first tokens, for the adaptive temperature; a training-mode forward adds its
    statistics, and `temperature.update` after each optimiser step moves τ (weighting.AdaptiveTemperature).
    """

    def __init__(self, model: nn.Module, scheme: str, alpha: float, share_prefix: bool, first_tokens: int | None = None):
        super().__init__()
        self.model = model
        self.causal_alpha = alpha if scheme == "cft" else 0.0
        self.share_prefix = share_prefix
        self._dropout = has_dropout(model)
        self.temperature = None
        if scheme in MSL_WEIGHTINGS:
            if first_tokens is None:
                raise ValueError("MSL needs the number of the catalog's first tokens")
            self.temperature = weighting.AdaptiveTemperature(first_tokens)

    def sharing(self) -> bool:
        return self.share_prefix and not (self.model.training and self._dropout)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        m = batch.targets.shape[1]
        share = self.sharing()
        logits = target_logits(self.model, batch.input_ids, batch.attention_mask, m, batch.prefix_ids if share else None)
        if self.temperature is not None:
            mask = weighting.allowed_mask(batch.allowed, batch.targets, logits.shape[-1])
            if self.model.training:
                self.temperature.observe(logits, batch.targets, mask)
            return weighting.msl_ce_sum(logits, batch.targets, batch.weights, mask, self.temperature.tau)
        if self.causal_alpha == 0.0:
            return weighting.weighted_ce_sum(logits, batch.targets, batch.weights)
        ref_logits = target_logits(self.model, batch.ref_input_ids, batch.ref_attention_mask, m, batch.ref_prefix_ids if share else None)
        return weighting.cft_ce_sum(logits, ref_logits, batch.targets, batch.weights, self.causal_alpha)
