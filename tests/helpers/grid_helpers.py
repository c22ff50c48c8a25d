"""The tiny grid's YAML, shared by the grid and report tests (tests/experiments/conftest.py runs it once)."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml


ALPHAS = [0.0, 0.4]


def grid_yaml(tmp_path: Path, model_dir: Path, **changes) -> Path:
    spec = {
        "scale": "test",
        "run_root": str(tmp_path / "grid"),
        "datasets": {"toy": {}},  # no preprocess section: the run directory already holds its data stage
        "stages": {
            "build-ig-index": {"model": str(model_dir), "catalog": "train"},
            "sft": {"model": str(model_dir), "sample": 16, "valid_sample": 4, "batch_size": 8, "micro_batch_size": 4,
                    "epochs": 1, "warmup_steps": 1, "lr": 1e-3},
            "decode": {"limit": 6, "num_beams": 10, "batch_size": 8},
            "metrics": {"bootstrap": 50},
        },
        "weightings": {"pos": {"beta": 0.5}, "cft": {"beta": 0.5, "cft_alpha": 0.1}, "igd": {"beta": [0.1, 0.3]}},
        "selection": {"alphas": ALPHAS, "valid_limit": 4},
    } | changes
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))
