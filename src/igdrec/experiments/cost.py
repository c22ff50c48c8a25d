"""The dry run's cost model: rough seconds per step from the grid's `cost:` rates and the data's sizes."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from igdrec.experiments.grid_config import PER_MODEL_COST_KEYS, GridConfig
from igdrec.experiments.plan import RowPlan, Step
from igdrec.rundir import MANIFEST


def _split_sizes(run_dir: Path) -> dict:
    """Row counts of a finished data stage (read from its manifest, for estimates only)."""
    try:
        return json.loads((Path(run_dir) / "data" / MANIFEST).read_text()).get("rows", {})
    except (OSError, json.JSONDecodeError):
        return {}


def _step_cost(step: Step, grid: GridConfig) -> dict:
    """The cost model a step is priced with: the grid's `cost:`, its dataset's on top (per-model rates merged)."""
    dataset = next((d for d in grid.datasets if d.name == step.dataset), None)
    shared, own = grid.cost or {}, (dataset.cost if dataset else None) or {}
    cost = {**shared, **own}
    for key in PER_MODEL_COST_KEYS:
        if key in shared and key in own:
            cost[key] = {**shared[key], **own[key]}
    return cost


def baseline_epochs(step: Step, cost: dict) -> int | None:
    """Epochs a baseline is expected to run: early stopping keeps the best epoch and stops `patience` + 1
    epochs after it (seqrec/trainer.py), so min(epochs, best + patience + 1). None without a best epoch."""
    best = cost.get("baseline_best_epoch", {}).get(step.config.model)
    return None if best is None else min(step.config.epochs, math.ceil(best) + step.config.patience + 1)


def estimate_seconds(step: Step, grid: GridConfig) -> float | None:
    """Rough cost of a step from the grid's `cost` model (a dataset's `cost:` overrides the grid's).

    sft = samples · epochs · tokens_per_sample / train_tokens_per_s (× cft_factor for CFT's second pass);
    decode = samples · decode_s_per_sample; baseline = baseline_epochs() · training windows / 1000 ·
    baseline_epoch_s_per_1k_windows[model] (an epoch's training and validation both grow with the windows);
    plus `<stage>_overhead_s` per step (model loading, validation). Sample counts come from the data stage
    when it has run, else from the cost model's `train_samples` / `valid_samples` / `test_samples`. None
    where a rate is missing.
    """
    cost = _step_cost(step, grid)
    sizes = _split_sizes(step.run_dir)
    overhead = cost.get(f"{step.stage.replace('-', '_')}_overhead_s", 0.0)  # model loading, validation...
    if step.stage == "sft":
        rate = cost.get("train_tokens_per_s")
        available = sizes.get("train") or cost.get("train_samples")
        n = min(step.config.sample or available or 0, available or step.config.sample or 0)
        if not rate or not n:
            return None
        seconds = n * step.config.epochs * cost.get("tokens_per_sample", 220) / rate
        if step.config.max_steps:
            seconds = min(seconds, step.config.max_steps * step.config.batch_size * cost.get("tokens_per_sample", 220) / rate)
        return overhead + seconds * (cost.get("cft_factor", 2.0) if step.config.weighting == "cft" else 1.0)
    if step.stage == "decode":
        per = cost.get("decode_s_per_sample")
        available = sizes.get(step.config.split) or cost.get(f"{step.config.split}_samples")
        n = min(step.config.limit or available or 0, available or step.config.limit or 0)
        return None if not per or not n else overhead + n * per
    if step.stage == "baseline":
        per = cost.get("baseline_epoch_s_per_1k_windows", {}).get(step.config.model)
        windows = sizes.get("train") or cost.get("train_samples")
        epochs = baseline_epochs(step, cost)
        return None if per is None or not windows or epochs is None else overhead + epochs * windows / 1000 * per
    return overhead


def pending_test_estimate(row: RowPlan, grid: GridConfig) -> float | None:
    decode = next(s for s in row.candidates[0].steps if s.stage == "decode")
    dataset = next(d for d in grid.datasets if d.name == row.dataset)
    test_like = dataclasses.replace(decode.config, split="test", limit=dataset.stages.get("decode", {}).get("limit"))
    return estimate_seconds(dataclasses.replace(decode, config=test_like), grid)
