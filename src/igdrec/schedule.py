"""The step plan of a fine-tuning run: the data order of each epoch, steps per epoch, and the learning rate.

The data order of epoch e is a permutation seeded by (seed, e), so a step counter alone fixes the data
position (what makes a resumed run equal to an uninterrupted one).
"""

from __future__ import annotations

import torch

from igdrec.config import LR_SCHEDULES


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1009 + epoch))


def steps_per_epoch(n: int, batch_size: int, world_size: int) -> int:
    """ceil(n / batch_size), minus a last partial batch too small to give every rank a sample."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= world_size else 0)


def effective_warmup(warmup_steps: int, total_steps: int) -> int:
    """The reference's fixed warm-up (20 steps), but at most a tenth of a short run: a 2-step run with
    20 warm-up steps would train at lr 0 and 1/20 of the peak and learn nothing."""
    return min(warmup_steps, max(1, total_steps // 10))


def make_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Linear warm-up to the peak, then `cosine` decay to min_lr_ratio × peak, or `linear` decay to 0 (the HF
    Trainer's default, which the reference's scripts ran; docs/method.md §5)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup, get_linear_schedule_with_warmup

    if schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if schedule == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, total_steps, min_lr_rate=min_lr_ratio)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; known: {', '.join(LR_SCHEDULES)}")
