"""A LoRA linear layer as one autograd function (CPU fine-tuning).

peft computes a LoRA layer as `base(x) + B(A(dropout(x))) · s`. Besides the base layer's matrix product,
that makes several passes over activation-sized tensors per adapted layer: the dropout mask's multiply,
the product by s, the sum with the base output, and in the backward the same three again plus the sum of
the two input gradients. With LoRA on all seven linear layers of every block, these passes took a fifth
of a CPU fine-tuning step of the embedded model, where a tensor of a micro-batch's MLP activations no
longer fits the core's cache.

`_LoRALinear` computes the same function with the small factors doing the extra work (h is tokens × r):

    forward   y  = x W^T + b + s · (h B^T),        h = (x ⊙ keep) A^T / (1 − p)
    backward  ∂x = ∂y W + (s · ∂y B) A / (1 − p)   with the dropped positions zeroed
              ∂A = (s · ∂y B)^T (x ⊙ keep) / (1 − p),   ∂B = s · ∂y^T h

Both sums of two products are one GEMM each that accumulates into the other (`addmm`), the scale factors
ride on the r-wide products, and the dropout mask is applied by zeroing the p·n dropped positions in
place instead of a multiply. The dropped positions come from `igdrec.dropout.dropped_positions`, drawn in
the same order and with the same generator as the `GapDropout` module they replace, so for a seed the
masks — and hence losses and gradients, up to float rounding — equal peft's path with `GapDropout`
(tests/unit/test_fused_lora.py). The base weights are frozen: no gradient is computed for them.

Anything else peft's layer supports (merged or disabled adapters, several active adapters, DoRA and
other variants, LoRA bias, mixed-adapter batches, autocast, a non-`nn.Linear` base, a base weight or
bias that trains) takes peft's own forward, unchanged.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from igdrec.dropout import GAP_DROPOUT_MAX_P, dropped_positions

NO_POSITIONS = torch.zeros(0, dtype=torch.long)


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float):
        rows = x.reshape(-1, x.shape[-1])
        out = nn.functional.linear(rows, weight, bias)
        dropped = dropped_positions(rows.numel(), p, x.device) if p > 0 else None
        if dropped is not None:
            rows = rows.clone(memory_format=torch.contiguous_format)
            rows.view(-1)[dropped] = 0
        inv_keep = 1.0 / (1.0 - p)
        h = torch.mm(rows, lora_a.t()).mul_(inv_keep)
        out.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(rows, h, weight, lora_a, lora_b, NO_POSITIONS if dropped is None else dropped)
        ctx.scaling, ctx.inv_keep, ctx.dropout, ctx.input_shape = scaling, inv_keep, dropped is not None, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        kept, h, weight, lora_a, lora_b, dropped = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        g_h = torch.mm(g, lora_b).mul_(ctx.scaling)  # ∂h, (tokens, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            through_adapter = torch.mm(g_h, lora_a)
            if ctx.dropout:
                through_adapter.view(-1)[dropped] = 0
            # in place: torch.addmm would first copy the adapter term into a new output
            grad_x = through_adapter.addmm_(g, weight, beta=ctx.inv_keep).view(ctx.input_shape)
        if ctx.needs_input_grad[3]:
            grad_a = torch.mm(g_h.t(), kept).mul_(ctx.inv_keep)
        if ctx.needs_input_grad[4]:
            grad_b = torch.mm(g.t(), h).mul_(ctx.scaling)
        return grad_x, None, None, grad_a, grad_b, None, None


def _dropout_rate(dropout: nn.Module) -> float | None:
    """The rate the fused path draws for an adapter's dropout module, None where it cannot stand in for it."""
    if isinstance(dropout, nn.Identity):
        return 0.0
    if isinstance(dropout, nn.Dropout) and not dropout.inplace:
        p = dropout.p if dropout.training else 0.0
        return p if p <= GAP_DROPOUT_MAX_P else None
    return None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    fallback = type(self).forward
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return fallback(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.base_layer
    p = _dropout_rate(self.lora_dropout[name]) if name in self.lora_A else None
    plain = (
        p is not None
        and type(base) is nn.Linear
        and not getattr(self, "fan_in_fan_out", False)
        and not getattr(self, "use_dora", {}).get(name, False)
        and name not in getattr(self, "lora_variant", {})
        and not getattr(self, "lora_bias", {}).get(name, False)
        and not torch.is_autocast_enabled(x.device.type)
        and not base.weight.requires_grad
        and (base.bias is None or not base.bias.requires_grad)
        and x.dtype == base.weight.dtype == self.lora_A[name].weight.dtype
    )
    if not plain:
        return fallback(self, x, *args, **kwargs)
    return _LoRALinear.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name]), p)


def use_fused_lora(model: nn.Module, enabled: bool = True) -> int:
    """Route every peft LoRA `Linear` of `model` through `_LoRALinear` (or back to peft's forward with
    `enabled=False`); returns how many layers. Parameter names and checkpoints are unchanged. Meant for
    CPU, alongside `use_gap_dropout` (its dropout draws the same positions)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            if enabled:
                module.forward = types.MethodType(_fused_forward, module)
            else:
                module.__dict__.pop("forward", None)
            count += 1
    return count
