"""The fine-tuning loop: collation, LR schedule, gradient accumulation, validation, checkpoints, DDP.

One optimiser step consumes one *effective batch* of `batch_size` samples. Under torchrun each rank takes
the strided shard `batch[rank::world]` of it and splits that into micro-batches; the loss of every micro-
batch is divided by Σ w over the whole effective batch (all-reduced once per step), so the summed gradient
is the single-process gradient whatever the world size or micro-batch size.

Sequences are padded on the left, so every sample's target tokens end the row and the logits predicting
them are the same trailing positions in the main and in CFT's reference pass; only those positions go
through the LM head.

Determinism and resume: the data order of epoch e is a permutation seeded by (seed, e), and the torch RNG
(LoRA dropout) is re-seeded from (seed, step, rank) before every step. The step counter therefore fixes the
data position and the random state, and a checkpoint (trainable weights, optimiser, scheduler, step,
early-stopping state, log) resumes to the same weights as an uninterrupted run.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from igdrec import weighting
from igdrec.modeling import autocast_dtype, pick_device
from igdrec.prompt import encode_prompt, encode_sample
from igdrec.rundir import atomic_write

CHECKPOINT = "checkpoint.pt"


# ----------------------------------------------------------------------------------------------- data


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) left-padded prompt + target
    attention_mask: torch.Tensor
    targets: torch.Tensor  # (B, m) target ids, right-aligned; IGNORE where a sample has fewer than m
    weights: torch.Tensor  # (B, m) token weights of the scheme, 0 on padding
    zero_ig: torch.Tensor  # (B, m) target token is zero-IG (False where unknown or padding)
    positive_ig: torch.Tensor  # (B, m) target token has IG > 0 (False where unknown or padding)
    ref_input_ids: torch.Tensor | None = None  # CFT reference prompt + target, left-padded
    ref_attention_mask: torch.Tensor | None = None

    def to(self, device: torch.device) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device, non_blocking=True) if v is not None else None for k, v in moved.items()})


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


class SFTExamples:
    """One split's samples for fine-tuning, encoded when a batch is collated.

    `zero_ig[i]` holds the zero-IG flags of sample i's target tokens (aligned with
    `item_token_sequence`); `zero_ig` is None when no IG index is available, and an entry is None for a
    target outside the index's catalog (IGD then weighs that sample's tokens 1, as nothing marks them forced).
    """

    def __init__(
        self,
        tokenizer,
        histories: Sequence[Sequence[int]],
        targets: Sequence[int],
        titles: Sequence[str],
        item_sequences: Sequence[Sequence[int]],
        category: str,
        scheme: str,
        beta: float,
        cutoff_len: int | None,
        zero_ig: Sequence[np.ndarray] | None = None,
        with_reference: bool = False,
    ):
        if scheme == "igd" and zero_ig is None:
            raise ValueError("IGD weighting needs zero-IG flags")
        self.tokenizer = tokenizer
        self.histories = histories
        self.targets = targets
        self.titles = titles
        self.item_sequences = item_sequences
        self.category = category
        self.scheme = scheme
        self.beta = beta
        self.cutoff_len = cutoff_len
        self.zero_ig = zero_ig
        self.reference_prompt_ids = encode_prompt(tokenizer, [], category, None)[0] if with_reference else None

    def __len__(self) -> int:
        return len(self.targets)

    def collate(self, rows: Sequence[int]) -> Batch:
        sequences, target_seqs, weight_rows, zero_rows = [], [], [], []
        for i in rows:
            target = self.item_sequences[self.targets[i]]
            history = [self.titles[item] for item in self.histories[i]]
            sequences.append(encode_sample(self.tokenizer, history, self.category, target, self.cutoff_len).input_ids)
            flags = None if self.zero_ig is None else self.zero_ig[i]
            zero = None if flags is None else torch.as_tensor(flags, dtype=torch.bool)
            target_seqs.append(target)
            scheme = "plain" if self.scheme == "igd" and zero is None else self.scheme
            weight_rows.append(weighting.token_weights(scheme, len(target), self.beta, zero))
            zero_rows.append(zero)
        input_ids, attention_mask = left_pad(sequences, self.tokenizer.pad_token_id)
        m = max(len(t) for t in target_seqs)
        targets = torch.full((len(rows), m), weighting.IGNORE, dtype=torch.long)
        weights = torch.zeros((len(rows), m))
        zero_ig = torch.zeros((len(rows), m), dtype=torch.bool)
        positive_ig = torch.zeros((len(rows), m), dtype=torch.bool)
        for row, (target, w, zero) in enumerate(zip(target_seqs, weight_rows, zero_rows)):
            n = len(target)
            targets[row, m - n:] = torch.as_tensor(target)
            weights[row, m - n:] = w
            if zero is not None:
                zero_ig[row, m - n:] = zero
                positive_ig[row, m - n:] = ~zero
        batch = Batch(input_ids, attention_mask, targets, weights, zero_ig, positive_ig)
        if self.reference_prompt_ids is not None:
            batch.ref_input_ids, batch.ref_attention_mask = left_pad(
                [self.reference_prompt_ids + list(t) for t in target_seqs], self.tokenizer.pad_token_id
            )
        return batch


# --------------------------------------------------------------------------------------------- model


def target_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, m: int) -> torch.Tensor:
    """Logits predicting the last m tokens of each left-padded row, (B, m, V)."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    width = input_ids.shape[1]
    keep = torch.arange(width - m - 1, width - 1, device=input_ids.device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep, use_cache=False)
    return out.logits


class WeightedLoss(nn.Module):
    """Micro-batch → (Σ w·CE numerator, per-token CE). One module so DDP sees CFT's two passes as one forward."""

    def __init__(self, model: nn.Module, scheme: str, alpha: float):
        super().__init__()
        self.model = model
        self.causal_alpha = alpha if scheme == "cft" else 0.0

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        m = batch.targets.shape[1]
        logits = target_logits(self.model, batch.input_ids, batch.attention_mask, m)
        if self.causal_alpha == 0.0:
            return weighting.weighted_ce_sum(logits, batch.targets, batch.weights)
        ref_logits = target_logits(self.model, batch.ref_input_ids, batch.ref_attention_mask, m)
        return weighting.cft_ce_sum(logits, ref_logits, batch.targets, batch.weights, self.causal_alpha)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


# ------------------------------------------------------------------------------------- distribution


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


def init_distributed(device_name: str = "auto") -> tuple[World, torch.device]:
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


# ---------------------------------------------------------------------------------------- schedule


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


def make_scheduler(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, total_steps, min_lr_rate=min_lr_ratio)


# ------------------------------------------------------------------------------------------- loop


@dataclass
class TrainSettings:
    batch_size: int
    micro_batch_size: int
    epochs: int
    max_steps: int | None
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    max_grad_norm: float
    seed: int
    log_every: int
    save_every: int
    patience: int


@dataclass
class TrainResult:
    log: list[dict]
    steps: int
    total_steps: int
    best_valid_loss: float | None
    best_step: int | None
    stopped_early: bool
    train_tokens: int


class _StepStats:
    """Sums kept on the device during a step; read back (one sync) only when logged."""

    NAMES = ("numerator", "weight", "ce_zero", "n_zero", "ce_positive", "n_positive", "tokens")

    def __init__(self, device):
        self.values = torch.zeros(len(self.NAMES), dtype=torch.float64, device=device)

    def add(self, numerator, weight, ce, batch: Batch) -> None:
        ce = ce.detach()
        labelled = batch.targets != weighting.IGNORE
        self.values += torch.stack([
            numerator.detach().double(), weight.double(),
            (ce * batch.zero_ig).sum().double(), batch.zero_ig.sum().double(),
            (ce * batch.positive_ig).sum().double(), batch.positive_ig.sum().double(),
            labelled.sum().double(),
        ])

    def row(self, world: World) -> dict:
        v = dict(zip(self.NAMES, world.all_reduce(self.values).tolist()))
        return {
            "loss": v["numerator"] / v["weight"] if v["weight"] > 0 else float("nan"),
            "ce_zero_ig": v["ce_zero"] / v["n_zero"] if v["n_zero"] > 0 else None,
            "ce_positive_ig": v["ce_positive"] / v["n_positive"] if v["n_positive"] > 0 else None,
            "tokens": int(v["tokens"]),
        }


def _chunks(rows: torch.Tensor, size: int) -> list[list[int]]:
    rows = rows.tolist()
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def evaluate(loss_module: WeightedLoss, data: SFTExamples, micro_batch_size: int, device, world: World) -> dict:
    """The weighted objective and zero-/positive-IG CE over `data` (sharded across ranks)."""
    model = loss_module.model
    was_training = model.training
    model.eval()
    stats = _StepStats(device)
    dtype = autocast_dtype(device)
    with torch.no_grad():
        for rows in _chunks(torch.arange(len(data))[world.rank::world.size], micro_batch_size):
            batch = data.collate(rows).to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                numerator, ce = loss_module(batch)
            stats.add(numerator, batch.weights.sum(), ce, batch)
    model.train(was_training)
    return stats.row(world)


def backward_effective_batch(module: nn.Module, micro_batches: list[Batch], world: World, scaler, stats: _StepStats | None = None) -> None:
    """Accumulate into .grad the gradient of Σ w·CE / Σ w over the effective batch (all ranks' micro-batches)."""
    device = micro_batches[0].input_ids.device
    dtype = autocast_dtype(device)
    # clamped so that an all-zero-weight batch (IGD with beta = 0) contributes nothing instead of NaN
    total_weight = world.all_reduce(sum(b.weights.sum() for b in micro_batches)).clamp_min(1e-12)
    for i, batch in enumerate(micro_batches):
        syncing = i == len(micro_batches) - 1 or world.size == 1
        with nullcontext() if syncing else module.no_sync():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                numerator, ce = module(batch)
            # DDP averages gradients over ranks; scaling by the world size turns that into the sum.
            scaler.scale(numerator / total_weight * world.size).backward()
        if stats is not None:
            stats.add(numerator, batch.weights.sum(), ce, batch)


def train(
    model: nn.Module,
    train_data: SFTExamples,
    valid_data: SFTExamples | None,
    settings: TrainSettings,
    scheme: str,
    alpha: float,
    device: torch.device,
    world: World,
    checkpoint_dir: Path,
    resume: bool,
    on_step: Callable[[int, int, dict | None], None] | None = None,
) -> TrainResult:
    """Fine-tune `model` in place; at the end it holds the weights of the best validation (if any)."""
    per_epoch = steps_per_epoch(len(train_data), settings.batch_size, world.size)
    if per_epoch == 0:
        raise ValueError(f"{len(train_data)} training samples cannot fill one batch across {world.size} processes")
    total_steps = per_epoch * settings.epochs
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)

    loss_module = WeightedLoss(model, scheme, alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = make_scheduler(optimizer, effective_warmup(settings.warmup_steps, total_steps), total_steps, settings.min_lr_ratio)
    dtype = autocast_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    step, log, train_tokens = 0, [], 0
    best = {"loss": None, "step": None, "state": None, "bad_epochs": 0}
    checkpoint_path = checkpoint_dir / CHECKPOINT
    if resume and checkpoint_path.exists():
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        load_trainable_state(model, ckpt["trainable"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        step, log, train_tokens, best = ckpt["step"], ckpt["log"], ckpt["train_tokens"], ckpt["best"]

    ddp_module = loss_module
    if world.size > 1:
        ddp_module = nn.parallel.DistributedDataParallel(loss_module, device_ids=[device.index] if device.type == "cuda" else None)

    model.train()
    stopped_early = False
    interval_start, stats = time.perf_counter(), _StepStats(device)
    while step < total_steps and not stopped_early:
        epoch, position = divmod(step, per_epoch)
        batch_rows = epoch_order(len(train_data), settings.seed, epoch)[position * settings.batch_size:(position + 1) * settings.batch_size]
        micro_batches = [train_data.collate(rows).to(device) for rows in _chunks(batch_rows[world.rank::world.size], settings.micro_batch_size)]
        torch.manual_seed((settings.seed * 1_000_003 + step) * 1024 + world.rank)
        backward_effective_batch(ddp_module, micro_batches, world, scaler, stats)
        scaler.unscale_(optimizer)
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        row = None
        saving = settings.save_every > 0 and step % settings.save_every == 0
        if step % settings.log_every == 0 or step % per_epoch == 0 or step == total_steps or saving:
            # a row covers the steps since the last one: loss and CE are token averages over them
            row = {"step": step, "epoch": step / per_epoch, "split": "train", "lr": lr, **stats.row(world)}
            row["seconds"] = time.perf_counter() - interval_start
            train_tokens += row["tokens"]
            log.append(row)
            interval_start, stats = time.perf_counter(), _StepStats(device)
        if valid_data is not None and len(valid_data) > 0 and (step % per_epoch == 0 or step == total_steps):
            started = time.perf_counter()
            valid = evaluate(loss_module, valid_data, settings.micro_batch_size, device, world)
            log.append({"step": step, "epoch": step / per_epoch, "split": "valid", "lr": lr, **valid, "seconds": time.perf_counter() - started})
            if best["loss"] is None or valid["loss"] < best["loss"]:
                best = {"loss": valid["loss"], "step": step, "state": trainable_state(model), "bad_epochs": 0}
            else:
                best["bad_epochs"] += 1
                stopped_early = best["bad_epochs"] >= settings.patience and step < total_steps
            interval_start = time.perf_counter()
        if on_step is not None:
            on_step(step, total_steps, row)
        if saving and step < total_steps and not stopped_early:
            if world.is_main:
                save_checkpoint(checkpoint_path, {
                    "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "step": step, "log": log, "train_tokens": train_tokens, "best": best,
                })
            world.barrier()

    if best["state"] is not None:
        load_trainable_state(model, best["state"])
    return TrainResult(
        log=log, steps=step, total_steps=total_steps, best_valid_loss=best["loss"], best_step=best["step"],
        stopped_early=stopped_early, train_tokens=train_tokens,
    )


def save_checkpoint(path: Path, state: dict) -> None:
    """Write-then-rename, so a kill during the write leaves the previous checkpoint intact."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def checkpoint_step(checkpoint_dir: Path) -> int | None:
    path = checkpoint_dir / CHECKPOINT
    if not path.exists():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=False)["step"])

