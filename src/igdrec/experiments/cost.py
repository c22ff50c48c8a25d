"""The dry run's cost model: rough seconds per step from the grid's `cost:` rates and the data's sizes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from igdrec.experiments.grid_config import GridConfig
from igdrec.experiments.plan import RowPlan, Step
from igdrec.rundir import MANIFEST


def _split_sizes(run_dir: Path) -> dict:
    """Row counts of a finished data stage (read from its manifest, for estimates only)."""
    try:
        return json.loads((Path(run_dir) / "data" / MANIFEST).read_text()).get("rows", {})
    except (OSError, json.JSONDecodeError):
        return {}


def estimate_seconds(step: Step, grid: GridConfig) -> float | None:
    """Rough cost of a step from the grid's `cost` model (a dataset's `cost:` overrides the grid's).

    sft = samples · epochs · tokens_per_sample / train_tokens_per_s (× cft_factor for CFT's second pass);
    decode = samples · decode_s_per_sample; plus `<stage>_overhead_s` per step (model loading, validation). Sample counts come from the data stage when it has run, else
    from the cost model's `train_samples` / `valid_samples` / `test_samples`. None where a rate is missing.
    """
    dataset = next((d for d in grid.datasets if d.name == step.dataset), None)
    cost = {**(grid.cost or {}), **((dataset.cost if dataset else None) or {})}
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
    return overhead


def pending_test_estimate(row: RowPlan, grid: GridConfig) -> float | None:
    decode = next(s for s in row.candidates[0].steps if s.stage == "decode")
    dataset = next(d for d in grid.datasets if d.name == row.dataset)
    test_like = dataclasses.replace(decode.config, split="test", limit=dataset.stages.get("decode", {}).get("limit"))
    return estimate_seconds(dataclasses.replace(decode, config=test_like), grid)
