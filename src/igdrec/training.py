"""The fine-tuning loop: gradient accumulation over an effective batch, validation, early stopping, resume.

The pieces it runs are modules of their own: the data and its collation (igdrec.sft_data), the forward
and weighted loss (igdrec.sft_loss), the step plan and learning rate (igdrec.schedule), the processes
under torchrun (igdrec.distributed), checkpoints (igdrec.checkpoints) and the cost accounting
(igdrec.flops). Its settings are the `SFTConfig` of the sft stage, taken as they are.

One optimiser step consumes one *effective batch* of `batch_size` samples. Under torchrun each rank takes
the strided shard `batch[rank::world]` of it and splits that into micro-batches; the loss of every micro-
batch is divided by Σ w over the whole effective batch (all-reduced once per step), so the summed gradient
is the single-process gradient whatever the world size or micro-batch size.

On CPU, LoRA dropout draws the gaps between dropped elements instead of one Bernoulli number per element
(igdrec.dropout): the same distribution of masks, a twentieth of the random draws at p = 0.05, and each
LoRA layer runs as one autograd function (igdrec.fused_lora): the same function, fewer passes over the
activations.

Determinism and resume: the data order of epoch e is a permutation seeded by (seed, e), and the torch RNG
(LoRA dropout) is re-seeded from (seed, step, rank) before every step. The step counter therefore fixes the
data position and the random state, and a checkpoint (trainable weights, optimiser, scheduler, step,
early-stopping state, log) resumes to the same weights as an uninterrupted run.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from igdrec import checkpoints, flops, tracking, weighting
from igdrec.config import SFTConfig
from igdrec.distributed import World
from igdrec.flops import attention_shape, pass_cost
from igdrec.modeling import autocast_dtype
from igdrec.precision import Precision
from igdrec.schedule import effective_warmup, epoch_order, make_scheduler, steps_per_epoch
from igdrec.sft_data import Batch, SFTExamples, micro_batch_rows
from igdrec.sft_loss import WeightedLoss


@dataclass
class TrainResult:
    log: list[dict]
    steps: int
    total_steps: int
    best_valid_loss: float | None
    best_step: int | None
    stopped_early: bool
    train_tokens: int
    computed_tokens: int = 0  # tokens that went through the model in training (padding and repeats of a shared prefix excluded)
    attention_flops: float = 0.0  # forward FLOPs of attention scores and mixing in training, see `flops.model_flops`
    msl_tau: float | None = None  # MSL: the adaptive temperature at the end of training


@dataclass
class StepDone:
    """What `train(..., on_step)` hears after each optimiser step."""

    step: int
    total_steps: int
    rows: list[dict]  # the training-log rows this step wrote: train and/or valid, or none
    computed_tokens: int  # this rank's, since this process started training (`TrainResult.computed_tokens`)
    attention_flops: float


def train(
    model: nn.Module,
    train_data: SFTExamples,
    valid_data: SFTExamples | None,
    config: SFTConfig,
    precision: Precision,
    device: torch.device,
    world: World,
    checkpoint_dir: Path,
    on_step: Callable[[StepDone], None] | None = None,
) -> TrainResult:
    """Fine-tune `model` in place with `config`'s scheme and loop settings (resuming from `checkpoint_dir`
    with `config.resume`); at the end it holds the weights of the best validation (if any)."""
    per_epoch, total_steps = planned_steps(len(train_data), config, world.size)
    first_tokens = None if train_data.trie is None else int(train_data.trie.child_count[0])
    loss_module = WeightedLoss(model, config.weighting, config.cft_alpha, share_prefix=config.share_prefix, first_tokens=first_tokens)
    temperature = loss_module.temperature  # MSL's adaptive τ, moved after every optimiser step
    optimiser = _Optimiser(model, config, device, precision.autocast, total_steps)
    loop = _LoopState()
    checkpoint_path = checkpoint_dir / checkpoints.CHECKPOINT
    if config.resume and checkpoint_path.exists():
        checkpoint = checkpoints.load_checkpoint(checkpoint_path)
        loop = optimiser.restore(model, checkpoint)
        if temperature is not None:
            temperature.tau = checkpoint["msl_tau"]
    ddp_module = loss_module
    if world.size > 1:
        ddp_module = nn.parallel.DistributedDataParallel(loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    cost = _Cost(attention_shape(model))

    model.train()
    stopped_early = False
    interval_start, stats = time.perf_counter(), _StepStats(device)
    while loop.step < total_steps and not stopped_early:
        host_batches = effective_batch(train_data, config, world, loop.step, per_epoch)
        cost.add(host_batches, loss_module.sharing())
        micro_batches = [b.to(device) for b in host_batches]
        torch.manual_seed((config.seed * 1_000_003 + loop.step) * 1024 + world.rank)
        lr = optimiser.step(ddp_module, micro_batches, world, stats)
        if temperature is not None:
            temperature.update(world)
        loop.step += 1

        logged = len(loop.log)
        saving = config.save_every > 0 and loop.step % config.save_every == 0
        if loop.step % config.log_every == 0 or loop.step % per_epoch == 0 or loop.step == total_steps or saving:
            loop.log_train(stats, world, lr, per_epoch, interval_start)
            interval_start, stats = time.perf_counter(), _StepStats(device)
        if valid_data is not None and len(valid_data) > 0 and (loop.step % per_epoch == 0 or loop.step == total_steps):
            started = time.perf_counter()
            valid = evaluate(loss_module, valid_data, config.micro_batch_size, config.length_grouping, device, world, precision.autocast)
            valid["seconds"] = time.perf_counter() - started
            stopped_early = loop.validated(model, valid, lr, per_epoch, config.patience) and loop.step < total_steps
            interval_start = time.perf_counter()
        if on_step is not None:
            on_step(StepDone(loop.step, total_steps, loop.log[logged:], cost.tokens, cost.attention_flops))
        if saving and loop.step < total_steps and not stopped_early:
            if world.is_main:
                msl = {} if temperature is None else {"msl_tau": temperature.tau}
                checkpoints.save_checkpoint(checkpoint_path, {"trainable": checkpoints.trainable_state(model), **optimiser.state(),
                                                              **loop.state(), **msl})
            world.barrier()

    if loop.best["state"] is not None:
        checkpoints.load_trainable_state(model, loop.best["state"])
    return TrainResult(
        log=loop.log, steps=loop.step, total_steps=total_steps, best_valid_loss=loop.best["loss"], best_step=loop.best["step"],
        stopped_early=stopped_early, train_tokens=loop.train_tokens, computed_tokens=cost.tokens, attention_flops=cost.attention_flops,
        msl_tau=None if temperature is None else temperature.tau,
    )


class TrackedScalars:
    """The scalars `--report-to` logs after a step, from the training-log rows it wrote: loss, CE by IG group
    (and, in training, learning rate) per split, and the throughput of each training row's interval:
    target and computed tokens per second and, given the device's peak rate, model TFLOP/s and MFU."""

    LOGGED = ("loss", "ce_zero_ig", "ce_low_ig", "ce_high_ig", "ce_positive_ig")

    def __init__(self, model: nn.Module, world_size: int, peak: float | None):
        self.model, self.world_size, self.peak = model, world_size, peak
        self.tokens, self.attention_flops = 0, 0.0  # `StepDone`'s running counts at the last training row

    def __call__(self, done: StepDone) -> dict[str, float]:
        values = {}
        for row in done.rows:
            logged = {k: row[k] for k in self.LOGGED}
            if row["split"] == "train":
                seconds = row["seconds"]
                rates = flops.rates(self.model, done.computed_tokens - self.tokens, done.attention_flops - self.attention_flops,
                                    seconds, self.world_size, self.peak)
                rates.pop("peak_bf16_tflops", None)  # a constant of the device, not of the step
                logged |= {"lr": row["lr"], "target_tokens_per_second": row["tokens"] / seconds if seconds > 0 else None} | rates
                self.tokens, self.attention_flops = done.computed_tokens, done.attention_flops
            values |= tracking.scalars(logged, row["split"])
        return values


def planned_steps(n: int, config: SFTConfig, world_size: int) -> tuple[int, int]:
    """(optimiser steps per epoch, steps of the whole run) for n training samples."""
    per_epoch = steps_per_epoch(n, config.batch_size, world_size)
    if per_epoch == 0:
        raise ValueError(f"{n} training samples cannot fill one batch across {world_size} processes")
    total_steps = per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    return per_epoch, total_steps


def effective_batch(data: SFTExamples, config: SFTConfig, world: World, step: int, per_epoch: int) -> list[Batch]:
    """This rank's micro-batches (on the host) of the effective batch of optimiser step `step`."""
    epoch, position = divmod(step, per_epoch)
    rows = epoch_order(len(data), config.seed, epoch)[position * config.batch_size:(position + 1) * config.batch_size]
    return [data.collate(r) for r in micro_batch_rows(data, rows[world.rank::world.size], config.micro_batch_size, config.length_grouping)]


def backward_effective_batch(module: nn.Module, micro_batches: list[Batch], world: World, scaler, stats: _StepStats | None = None,
                             autocast: torch.dtype | None | str = "device") -> None:
    """Accumulate into .grad the gradient of Σ w·CE / Σ w over the effective batch (all ranks' micro-batches).

    `autocast`: the dtype of the forward's autocast, None for none; "device" picks the device's default."""
    device = micro_batches[0].input_ids.device
    dtype = autocast_dtype(device) if autocast == "device" else autocast
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


def evaluate(loss_module: WeightedLoss, data: SFTExamples, micro_batch_size: int, length_grouping: bool, device, world: World,
             autocast: torch.dtype | None | str = "device") -> dict:
    """The weighted objective and the CE of the zero-/low-/high-IG groups over `data` (sharded across ranks).
    `autocast` as in `backward_effective_batch`."""
    model = loss_module.model
    autocast = autocast_dtype(device) if autocast == "device" else autocast
    was_training = model.training
    model.eval()
    stats = _StepStats(device)
    with torch.no_grad():
        for rows in micro_batch_rows(data, torch.arange(len(data))[world.rank::world.size], micro_batch_size, length_grouping):
            batch = data.collate(rows).to(device)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                numerator, ce = loss_module(batch)
            stats.add(numerator, batch.weights.sum(), ce, batch)
    model.train(was_training)
    return stats.row(world)


@dataclass
class _LoopState:
    """What the loop carries from step to step and a checkpoint restores besides weights and optimiser."""

    step: int = 0
    log: list[dict] = field(default_factory=list)
    train_tokens: int = 0
    best: dict = field(default_factory=lambda: {"loss": None, "step": None, "state": None, "bad_epochs": 0})

    def state(self) -> dict:
        return {"step": self.step, "log": self.log, "train_tokens": self.train_tokens, "best": self.best}

    def log_train(self, stats: "_StepStats", world: World, lr: float, per_epoch: int, interval_start: float) -> None:
        """Append the training-log row of the steps since the last one: loss and CE are token averages over them."""
        row = {"step": self.step, "epoch": self.step / per_epoch, "split": "train", "lr": lr, **stats.row(world)}
        row["seconds"] = time.perf_counter() - interval_start
        self.train_tokens += row["tokens"]
        self.log.append(row)

    def validated(self, model: nn.Module, valid: dict, lr: float, per_epoch: int, patience: int) -> bool:
        """Log a validation and keep the weights of the best one; whether the last `patience` validations
        brought no improvement."""
        self.log.append({"step": self.step, "epoch": self.step / per_epoch, "split": "valid", "lr": lr, **valid})
        if self.best["loss"] is None or valid["loss"] < self.best["loss"]:
            self.best = {"loss": valid["loss"], "step": self.step, "state": checkpoints.trainable_state(model), "bad_epochs": 0}
            return False
        self.best["bad_epochs"] += 1
        return self.best["bad_epochs"] >= patience


class _Optimiser:
    """AdamW, the learning-rate schedule and the fp16 loss scaler of one run."""

    def __init__(self, model: nn.Module, config: SFTConfig, device: torch.device, autocast: torch.dtype | None, total_steps: int):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, config.lr, config.weight_decay, device)
        warmup = effective_warmup(config.warmup_steps, total_steps)
        self.scheduler = make_scheduler(self.optimizer, config.lr_schedule, warmup, total_steps, config.min_lr_ratio)
        self.autocast = autocast
        self.scaler = torch.amp.GradScaler(device.type, enabled=autocast == torch.float16)
        self.max_grad_norm = config.max_grad_norm

    def step(self, module: nn.Module, micro_batches: list[Batch], world: World, stats: "_StepStats") -> float:
        """One optimiser step on an effective batch; returns the learning rate it used."""
        backward_effective_batch(module, micro_batches, world, self.scaler, stats, autocast=self.autocast)
        self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def restore(self, model: nn.Module, checkpoint: dict) -> _LoopState:
        """Weights and optimiser as `checkpoint` left them; the loop state it holds."""
        checkpoints.load_trainable_state(model, checkpoint["trainable"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        return _LoopState(checkpoint["step"], checkpoint["log"], checkpoint["train_tokens"], checkpoint["best"])


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; on CUDA its fused kernel (one launch for all parameters instead of several per tensor), which
    computes the same update."""
    fused = device.type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


class _StepStats:
    """Sums kept on the device during a step; read back (one sync) only when logged."""

    NAMES = ("numerator", "weight", "ce_zero", "n_zero", "ce_positive", "n_positive", "ce_high", "n_high", "tokens")

    def __init__(self, device):
        self.values = torch.zeros(len(self.NAMES), dtype=torch.float64, device=device)

    def add(self, numerator, weight, ce, batch: Batch) -> None:
        ce = ce.detach()
        labelled = batch.targets != weighting.IGNORE
        self.values += torch.stack([
            numerator.detach().double(), weight.double(),
            (ce * batch.zero_ig).sum().double(), batch.zero_ig.sum().double(),
            (ce * batch.positive_ig).sum().double(), batch.positive_ig.sum().double(),
            (ce * batch.high_ig).sum().double(), batch.high_ig.sum().double(),
            labelled.sum().double(),
        ])

    def row(self, world: World) -> dict:
        v = dict(zip(self.NAMES, world.all_reduce(self.values).tolist()))
        # low = positive minus high: the three groups partition the tokens whose IG is known
        v["ce_low"], v["n_low"] = v["ce_positive"] - v["ce_high"], v["n_positive"] - v["n_high"]

        def mean(group: str) -> float | None:
            return v[f"ce_{group}"] / v[f"n_{group}"] if v[f"n_{group}"] > 0 else None

        return {
            "loss": v["numerator"] / v["weight"] if v["weight"] > 0 else float("nan"),
            "ce_zero_ig": mean("zero"),
            "ce_low_ig": mean("low"),
            "ce_high_ig": mean("high"),
            "ce_positive_ig": mean("positive"),
            "tokens": int(v["tokens"]),
            "tokens_zero_ig": int(v["n_zero"]),
            "tokens_low_ig": int(v["n_low"]),
            "tokens_high_ig": int(v["n_high"]),
        }


class _Cost:
    """Tokens the model computed in training and the attention FLOPs they took (igdrec.flops)."""

    def __init__(self, shape: tuple[int, int]):
        self.shape, self.tokens, self.attention_flops = shape, 0, 0.0

    def add(self, batches: list[Batch], shared: bool) -> None:
        for batch in batches:
            tokens, flops = pass_cost(batch, shared, self.shape)
            self.tokens, self.attention_flops = self.tokens + tokens, self.attention_flops + flops


def compile_blocks(model: nn.Module) -> int:
    """`torch.compile` each decoder block in place (parameter names, hence checkpoints, unchanged); returns
    how many. Changes no result beyond float rounding; worth it on GPU for long runs, not on short ones."""
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            module.compile(dynamic=True)
            count += 1
    return count
