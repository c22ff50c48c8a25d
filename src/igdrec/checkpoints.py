"""Resumable fine-tuning checkpoints: written atomically, read back without running code.

A checkpoint holds the trainable weights, the optimiser, scheduler and loss-scaler states and the loop's
own state (step, log, early stopping; see `training.train`): tensors and plain Python values only.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from igdrec.errors import IgdrecError
from igdrec.rundir import atomic_write

CHECKPOINT = "checkpoint.pt"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write-then-rename, so a kill during the write leaves the previous checkpoint intact. `state` holds
    tensors and plain Python values only, so `load_checkpoint` reads it back without running code."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint of `save_checkpoint`, read with torch's restricted unpickler (tensors, numbers, strings,
    lists and dicts; anything else is refused unread): run directories are shared and copied between
    machines, and nothing igdrec reads may run code."""
    try:
        with warnings.catch_warnings():  # torch warns about a pickle protocol before it refuses the file
            warnings.filterwarnings("ignore", message=".*pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's restricted unpickler, or a damaged file
        raise IgdrecError(
            f"{path}: refused, not a checkpoint igdrec wrote (it holds more than tensors and plain values, or is "
            f"damaged: {type(exc).__name__}); nothing in it was run; delete it or pass --force to start over"
        ) from exc
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise IgdrecError(f"{path}: refused, not a checkpoint igdrec wrote (no step); delete it or pass --force to start over")
    return state


def checkpoint_step(checkpoint_dir: Path) -> int | None:
    path = checkpoint_dir / CHECKPOINT
    if not path.exists():
        return None
    return load_checkpoint(path)["step"]
