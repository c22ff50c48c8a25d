"""What a fine-tuning run computed: tokens, attention and model FLOPs, and the device's peak rate (MFU).

The sft stage reports computed tokens per second and, on CUDA, model-FLOPs utilisation from these.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from igdrec.sft_data import Batch


def attention_shape(model: nn.Module) -> tuple[int, int]:
    """(layers, attention width = heads × head dim) of a Hugging Face decoder, (0, 0) if unknown."""
    config = getattr(model, "config", None)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    head_dim = getattr(config, "head_dim", None) or (int(getattr(config, "hidden_size", 0) or 0) // max(heads, 1))
    return layers, heads * int(head_dim)


def pass_cost(batch: Batch, shared: bool, shape: tuple[int, int]) -> tuple[int, float]:
    """(tokens computed, attention forward FLOPs) of one micro-batch: a shared prefix counts once, padding
    not at all; attention costs 4·layers·width per (query, visible key) pair (scores + mixing)."""
    layers, width = shape
    tokens, flops = 0, 0.0
    for lengths, p in batch.passes():
        p = p if shared and len(lengths) > 1 else 0
        tokens += sum(lengths) - p * (len(lengths) - 1)
        # causal pairs of a row of n tokens: n(n+1)/2; the shared prefix's own pairs are computed once
        pairs = sum(n * (n + 1) / 2 for n in lengths) - (len(lengths) - 1) * p * (p + 1) / 2
        flops += 4.0 * layers * width * pairs
    return tokens, flops


def matmul_params(model: nn.Module) -> tuple[int, int]:
    """(weights of the linear layers in the decoder blocks, those of them that train). The LM head runs on
    the m target positions only and the embedding is a lookup, so neither counts."""
    total = trainable = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "lm_head" not in name:
            total += module.weight.numel()
            trainable += sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
    return total, trainable


def model_flops(model: nn.Module, tokens: int, attention_flops: float) -> float:
    """Training FLOPs actually required: forward 2·N per token plus attention; the backward costs twice the
    forward where the base weights train (input and weight gradients) and once where they are frozen (LoRA:
    input gradients only; the adapters' own matmuls are negligible)."""
    total, trainable = matmul_params(model)
    base_trains = trainable > total / 2
    forward = 2.0 * total * tokens + attention_flops
    return forward * (3.0 if base_trains else 2.0)


def rates(model: nn.Module, tokens: int, attention_flops: float, seconds: float, world_size: int, peak: float | None) -> dict:
    """Throughput of `seconds` of training in which each of `world_size` ranks computed `tokens` tokens and
    `attention_flops`: computed tokens per second (all ranks) and, given the device's peak rate (FLOP/s),
    model TFLOP/s per device and model-FLOPs utilisation (MFU). Empty for no time."""
    if seconds <= 0:
        return {}
    stats = {"computed_tokens_per_second": tokens * world_size / seconds}
    if peak is not None:
        per_device = model_flops(model, tokens, attention_flops) / seconds
        stats |= {"model_tflops_per_second": per_device / 1e12, "peak_bf16_tflops": peak / 1e12, "mfu": per_device / peak}
    return stats


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192, reps: int = 20) -> float | None:
    """The device's dense matmul rate (FLOP/s) in `dtype`, measured by a few n×n matmuls; None off CUDA."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2.0 * n**3 * reps / (time.perf_counter() - started)
