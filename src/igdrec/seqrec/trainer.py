"""Training loop of the trainable recommenders, RecBole 1.2's defaults and early stopping.

Adam, shuffled mini-batches, one validation after every epoch. Early stopping as RecBole's
`stopping_step`: a validation value ≥ the best so far (ties count as better, so the later epoch wins)
resets the count; after `patience` + 1 epochs in a row below the best, training stops. The state of the
best epoch is restored at the end.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from igdrec.config import BaselineConfig
from igdrec.seqrec.data import SequenceData
from igdrec.seqrec.models import TrainableSequentialRecommender


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    loss: float  # mean training loss over the epoch's batches
    valid: float  # validation value (higher is better)
    seconds: float  # training plus validation time of the epoch (wall clock)
    cpu_seconds: float  # the same in CPU time of this process (comparable on a shared machine)


@dataclass
class BaselineTrainResult:
    best_epoch: int
    best_valid: float
    epochs_run: int
    stopped_early: bool
    train_seconds: float
    history: list[EpochRecord] = field(default_factory=list)


class Trainer:
    """Fits a model on `train`, validating with `validate(model) -> value` (higher is better), with the
    `epochs`, `lr`, `batch_size`, `patience` and `seed` of a baseline config."""

    def __init__(self, config: BaselineConfig, device: torch.device | None = None):
        self.config = config
        self.device = device or torch.device("cpu")

    def fit(
        self,
        model: TrainableSequentialRecommender,
        train: SequenceData,
        validate: Callable[[TrainableSequentialRecommender], float],
        on_epoch: Callable[[EpochRecord], None] | None = None,
    ) -> BaselineTrainResult:
        s = self.config
        # The caller seeds the initialisation; the batch order has its own generator and dropout draws
        # from the global generator, seeded here so a run depends on the seed alone.
        torch.manual_seed(s.seed)
        order = torch.Generator().manual_seed(s.seed)
        model.to(self.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
        best_valid, best_epoch, best_state, bad_epochs = float("-inf"), 0, None, 0
        history: list[EpochRecord] = []
        started = time.perf_counter()
        stopped_early = False
        for epoch in range(1, s.epochs + 1):
            epoch_start, epoch_cpu = time.perf_counter(), time.process_time()
            model.train()
            total, batches = 0.0, 0
            for batch in train.batches(s.batch_size, generator=order):
                loss = model.calculate_loss(batch.to(self.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                batches += 1
            value = float(validate(model))
            record = EpochRecord(epoch, total / max(batches, 1), value, time.perf_counter() - epoch_start, time.process_time() - epoch_cpu)
            history.append(record)
            if value >= best_valid:
                best_valid, best_epoch, bad_epochs = value, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_epochs += 1
            if on_epoch is not None:
                on_epoch(record)
            if bad_epochs > s.patience:
                stopped_early = True
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        return BaselineTrainResult(best_epoch, best_valid, len(history), stopped_early, time.perf_counter() - started, history)
