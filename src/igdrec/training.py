"""The fine-tuning loop: collation, LR schedule, gradient accumulation, validation, checkpoints, DDP.

One optimiser step consumes one *effective batch* of `batch_size` samples. Under torchrun each rank takes
the strided shard `batch[rank::world]` of it and splits that into micro-batches; the loss of every micro-
batch is divided by Σ w over the whole effective batch (all-reduced once per step), so the summed gradient
is the single-process gradient whatever the world size or micro-batch size.

Sequences are padded on the left, so every sample's target tokens end the row and the logits predicting
them are the same trailing positions in the main and in CFT's reference pass; only those positions go
through the LM head.

Throughput without changing the loss (the gradient of an effective batch is a sum over its samples, so how
they are split into micro-batches changes nothing but float rounding):
- length grouping: the rows of an effective batch are sorted by encoded length before the split into
  micro-batches, so each micro-batch pads to little more than its own longest row;
- shared prefix: every prompt starts with the same instruction text (about a third of an ml-100k sample's
  tokens). Under causal attention these tokens' hidden states are identical in every row, so they are
  computed once per micro-batch and every row attends to that one copy (its key/value cache repeated over the
  batch; the gradient through the repeat sums the rows' contributions). This is exact only when no dropout
  is active (LoRA dropout draws a different mask per row), so it switches itself off when dropout would act;
- encodings are tokenised once and kept for later epochs;
- on CPU, LoRA dropout draws the gaps between dropped elements instead of one Bernoulli number per element
  (igdrec.dropout): the same distribution of masks, a twentieth of the random draws at p = 0.05, and each
  LoRA layer runs as one autograd function (igdrec.fused_lora): the same function, fewer passes over the
  activations.

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
from igdrec.modeling import autocast_dtype, kv_cache_kwargs, pick_device, returned_cache
from igdrec.prompt import encode_prompt, encode_sample, shared_prefix_len
from igdrec.rundir import atomic_write

CHECKPOINT = "checkpoint.pt"


# ----------------------------------------------------------------------------------------------- data


PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16")


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


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) left-padded prompt + target
    attention_mask: torch.Tensor
    targets: torch.Tensor  # (B, m) target ids, right-aligned; IGNORE where a sample has fewer than m
    weights: torch.Tensor  # (B, m) token weights of the scheme, 0 on padding
    zero_ig: torch.Tensor  # (B, m) target token is zero-IG (False where unknown or padding)
    positive_ig: torch.Tensor  # (B, m) target token has IG > 0 (False where unknown or padding)
    high_ig: torch.Tensor  # (B, m) positive IG above the group threshold (low IG = positive_ig & ~high_ig)
    prefix_ids: torch.Tensor | None = None  # (1, p) tokens every row starts with (see `shared_prefix_len`)
    ref_input_ids: torch.Tensor | None = None  # CFT reference prompt + target, left-padded
    ref_attention_mask: torch.Tensor | None = None
    ref_prefix_ids: torch.Tensor | None = None

    def to(self, device: torch.device) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device, non_blocking=True) if v is not None else None for k, v in moved.items()})

    def passes(self) -> list[tuple[list[int], int]]:
        """(real tokens of each row, shared prefix length) of the main and CFT's reference pass (host side)."""
        out = []
        for mask, prefix in ((self.attention_mask, self.prefix_ids), (self.ref_attention_mask, self.ref_prefix_ids)):
            if mask is not None:
                out.append((mask.sum(-1).tolist(), 0 if prefix is None else prefix.shape[1]))
        return out


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


class SFTExamples:
    """One split's samples for fine-tuning, encoded once (on first use) and collated into batches.

    `zero_ig[i]` holds the zero-IG flags of sample i's target tokens (aligned with
    `item_token_sequence`); `zero_ig` is None when no IG index is available, and an entry is None for a
    target outside the index's catalog (IGD then weighs that sample's tokens 1, as nothing marks them forced).
    `ig[i]` holds the same tokens' IG values (same None pattern); a positive-IG token is "high" when its IG
    exceeds `ig_group_threshold` and "low" otherwise (docs/method.md §5, the CE-by-IG-group logs).
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
        ig: Sequence[np.ndarray | None] | None = None,
        ig_group_threshold: float | None = None,
        sample_ids: Sequence[int] | None = None,  # named in errors (default: the row)
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
        self.ig = ig
        self.ig_group_threshold = ig_group_threshold
        self.sample_ids = sample_ids
        self.reference_prompt_ids = encode_prompt(tokenizer, [], category, None)[0] if with_reference else None
        self._encoded: dict[int, tuple[np.ndarray, int]] = {}

    def __len__(self) -> int:
        return len(self.targets)

    def encoded(self, i: int) -> tuple[np.ndarray, int]:
        """Sample i's prompt + target ids and its prompt length, tokenised on first use only."""
        found = self._encoded.get(i)
        if found is None:
            target = self.item_sequences[self.targets[i]]
            history = [self.titles[item] for item in self.histories[i]]
            title = self.titles[self.targets[i]]
            name = f"sample_id {self.sample_ids[i]}" if self.sample_ids is not None else f"sample {i}"
            label = f"{name} (target {title[:40]!r}{'…' if len(title) > 40 else ''})"
            sample = encode_sample(self.tokenizer, history, self.category, target, self.cutoff_len, sample=label)
            found = self._encoded[i] = (np.asarray(sample.input_ids, dtype=np.int64), sample.prompt_len)
        return found

    def length(self, i: int) -> int:
        return len(self.encoded(i)[0])

    def collate(self, rows: Sequence[int]) -> Batch:
        sequences, prompt_lens, target_seqs, weight_rows, zero_rows, high_rows = [], [], [], [], [], []
        for i in rows:
            target = self.item_sequences[self.targets[i]]
            ids, prompt_len = self.encoded(i)
            sequences.append(ids)
            prompt_lens.append(prompt_len)
            flags = None if self.zero_ig is None else self.zero_ig[i]
            zero = None if flags is None else torch.as_tensor(flags, dtype=torch.bool)
            target_seqs.append(target)
            scheme = "plain" if self.scheme == "igd" and zero is None else self.scheme
            weight_rows.append(weighting.token_weights(scheme, len(target), self.beta, zero))
            zero_rows.append(zero)
            values = None if self.ig is None or zero is None or self.ig_group_threshold is None else self.ig[i]
            high_rows.append(None if values is None else ~zero & torch.as_tensor(np.asarray(values) > self.ig_group_threshold))
        input_ids, attention_mask = left_pad(sequences, self.tokenizer.pad_token_id)
        m = max(len(t) for t in target_seqs)
        targets = torch.full((len(rows), m), weighting.IGNORE, dtype=torch.long)
        weights = torch.zeros((len(rows), m))
        zero_ig = torch.zeros((len(rows), m), dtype=torch.bool)
        positive_ig = torch.zeros((len(rows), m), dtype=torch.bool)
        high_ig = torch.zeros((len(rows), m), dtype=torch.bool)
        for row, (target, w, zero, high) in enumerate(zip(target_seqs, weight_rows, zero_rows, high_rows)):
            n = len(target)
            targets[row, m - n:] = torch.as_tensor(target)
            weights[row, m - n:] = w
            if zero is not None:
                zero_ig[row, m - n:] = zero
                positive_ig[row, m - n:] = ~zero
            if high is not None:
                high_ig[row, m - n:] = high
        p = shared_prefix_len(sequences, prompt_lens)
        batch = Batch(input_ids, attention_mask, targets, weights, zero_ig, positive_ig, high_ig,
                      prefix_ids=torch.as_tensor(sequences[0][:p])[None] if p > 0 else None)
        if self.reference_prompt_ids is not None:
            ref = [np.asarray(self.reference_prompt_ids + list(t), dtype=np.int64) for t in target_seqs]
            batch.ref_input_ids, batch.ref_attention_mask = left_pad(ref, self.tokenizer.pad_token_id)
            p = shared_prefix_len(ref, [len(self.reference_prompt_ids)] * len(ref))
            batch.ref_prefix_ids = torch.as_tensor(ref[0][:p])[None] if p > 0 else None
        return batch


# --------------------------------------------------------------------------------------------- model


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
    it is exact, i.e. in eval mode or when the model has no dropout.
    """

    def __init__(self, model: nn.Module, scheme: str, alpha: float, share_prefix: bool = True):
        super().__init__()
        self.model = model
        self.causal_alpha = alpha if scheme == "cft" else 0.0
        self.share_prefix = share_prefix
        self._dropout = has_dropout(model)

    def sharing(self) -> bool:
        return self.share_prefix and not (self.model.training and self._dropout)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        m = batch.targets.shape[1]
        share = self.sharing()
        logits = target_logits(self.model, batch.input_ids, batch.attention_mask, m, batch.prefix_ids if share else None)
        if self.causal_alpha == 0.0:
            return weighting.weighted_ce_sum(logits, batch.targets, batch.weights)
        ref_logits = target_logits(self.model, batch.ref_input_ids, batch.ref_attention_mask, m, batch.ref_prefix_ids if share else None)
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
    autocast: torch.dtype | None | str = "device"  # forward autocast dtype; "device": the device's default
    length_grouping: bool = True  # sort an effective batch by length before the micro-batch split
    share_prefix: bool = True  # compute the rows' common prompt prefix once (where exact)


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
    attention_flops: float = 0.0  # forward FLOPs of attention scores and mixing in training, see `model_flops`


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


def _chunks(rows: torch.Tensor | list[int], size: int) -> list[list[int]]:
    rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def micro_batch_rows(data: SFTExamples, rows: torch.Tensor | list[int], size: int, length_grouping: bool) -> list[list[int]]:
    """Split one rank's share of an effective batch into micro-batches; with `length_grouping` the rows are
    first sorted by encoded length (stable, so ties keep the data order), which leaves the summed gradient
    unchanged and cuts padding."""
    rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
    if length_grouping:
        rows = sorted(rows, key=data.length)
    return _chunks(rows, size)


def evaluate(loss_module: WeightedLoss, data: SFTExamples, micro_batch_size: int, device, world: World,
             autocast: torch.dtype | None | str = "device", length_grouping: bool = True) -> dict:
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

    loss_module = WeightedLoss(model, scheme, alpha, share_prefix=settings.share_prefix)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, settings.lr, settings.weight_decay, device)
    scheduler = make_scheduler(optimizer, effective_warmup(settings.warmup_steps, total_steps), total_steps, settings.min_lr_ratio)
    dtype = autocast_dtype(device) if settings.autocast == "device" else settings.autocast
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    shape = attention_shape(model)
    computed_tokens, attention_flops = 0, 0.0

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
        host_batches = [train_data.collate(rows) for rows in micro_batch_rows(train_data, batch_rows[world.rank::world.size], settings.micro_batch_size, settings.length_grouping)]
        for batch in host_batches:
            tokens, flops = pass_cost(batch, loss_module.sharing(), shape)
            computed_tokens, attention_flops = computed_tokens + tokens, attention_flops + flops
        micro_batches = [b.to(device) for b in host_batches]
        torch.manual_seed((settings.seed * 1_000_003 + step) * 1024 + world.rank)
        backward_effective_batch(ddp_module, micro_batches, world, scaler, stats, autocast=dtype)
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
            valid = evaluate(loss_module, valid_data, settings.micro_batch_size, device, world, dtype, settings.length_grouping)
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
        stopped_early=stopped_early, train_tokens=train_tokens, computed_tokens=computed_tokens, attention_flops=attention_flops,
    )


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; on CUDA its fused kernel (one launch for all parameters instead of several per tensor), which
    computes the same update."""
    fused = device.type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


# --------------------------------------------------------------------------------- cost accounting


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


def compile_blocks(model: nn.Module) -> int:
    """`torch.compile` each decoder block in place (parameter names, hence checkpoints, unchanged); returns
    how many. Changes no result beyond float rounding; worth it on GPU for long runs, not on short ones."""
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            module.compile(dynamic=True)
            count += 1
    return count


def save_checkpoint(path: Path, state: dict) -> None:
    """Write-then-rename, so a kill during the write leaves the previous checkpoint intact."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def checkpoint_step(checkpoint_dir: Path) -> int | None:
    path = checkpoint_dir / CHECKPOINT
    if not path.exists():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=False)["step"])

