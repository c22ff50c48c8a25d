"""How the fine-tuned weights are stored and the forward runs (`sft --precision`; docs/method.md §5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from igdrec.config import PRECISIONS


@dataclass(frozen=True)
class Precision:
    """How the weights are stored and the forward runs: `param_dtype` for weights (and so AdamW's state),
    `autocast` for the matmuls (None: run in the weights' dtype)."""

    name: str  # resolved: fp32 | bf16-mixed | fp16-mixed | bf16
    param_dtype: torch.dtype
    autocast: torch.dtype | None


def resolve_precision(name: str, device: torch.device) -> Precision:
    """`auto`: fp32 weights under bf16 autocast on CUDA (fp16 on cards without bf16), plain fp32 on CPU;
    `bf16`: pure bf16 weights and optimiser state, as the reference trains (docs/method.md §5)."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; known: {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    if name == "auto":
        if not cuda:
            return Precision("fp32", torch.float32, None)
        return Precision("bf16-mixed", torch.float32, torch.bfloat16) if torch.cuda.is_bf16_supported() else Precision("fp16-mixed", torch.float32, torch.float16)
    if name.startswith("bf16") and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision {name}: this CUDA device has no bf16 support (use auto or fp32)")
    if name == "bf16-mixed":
        return Precision(name, torch.float32, torch.bfloat16)
    if name == "bf16":
        return Precision(name, torch.bfloat16, None)
    return Precision(name, torch.float32, None)
