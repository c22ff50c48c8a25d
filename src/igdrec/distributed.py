"""Data parallelism under torchrun: which process this is (`World`) and the collectives the stages use.

A single process is a world of size 1, where every collective is a no-op, so stages run the same code
with and without torchrun.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from igdrec.modeling import pick_device


@dataclass
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            torch_dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.size > 1:
            torch_dist.barrier()


def init_distributed(device_name: str) -> tuple[World, torch.device]:
    """Single process, or the process group torchrun describes (gloo on CPU, nccl on CUDA)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if size == 1:
        return World(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank, size), device
