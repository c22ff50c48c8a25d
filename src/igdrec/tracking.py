"""Experiment tracking (`--report-to`): a stage's curves and results, handed to TensorBoard or W&B.

A stage that trains or scores opens one `Tracker` for the artifact it computes (`start`), logs scalars by
step (`log`), its final numbers once (`summary`) and closes it; a cached stage computes nothing and logs
nothing. The run is named after the artifact, `<stage>-<name>` (`sft-igd-b0.1`), and grouped by the run
directory; its logs go to `<run>/tracking/<stage>-<name>/` unless the backend's own environment says
otherwise (`WANDB_DIR`, `WANDB_PROJECT`, `WANDB_MODE`...). The backends are optional extras, imported only
when asked for; `require` turns a missing one into a one-line error naming the extra.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path

from igdrec.errors import IgdrecError

NONE = "none"
# backend -> the package it needs, which is also the name of igdrec's extra that installs it
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
TRACKING_DIR = "tracking"


def require(backends: list[str]) -> None:
    """A one-line error for the first backend whose package cannot be imported."""
    for backend in backends:
        if backend == NONE:
            continue
        package = PACKAGES[backend]
        try:
            importlib.import_module(package)
        except ImportError:
            raise IgdrecError(f"--report-to {backend} needs the {package} package: pip install 'igdrec[{backend}]'") from None


def scalars(values: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of `values` (nested dicts flattened to `a/b`), each tag under `prefix/`."""
    found = {}
    for key, value in values.items():
        tag = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            found |= scalars(value, tag)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            found[tag] = float(value)
    return found


class Tracker:
    """Where a stage's numbers go. This base class drops them (`--report-to none`, and ranks other than 0)."""

    def log(self, values: dict[str, float], step: int) -> None:
        """Scalars at a training step (tags like `train/loss`)."""

    def summary(self, values: dict[str, float]) -> None:
        """The final numbers of the artifact (best valid loss, NDCG@10...)."""

    def close(self, failed: bool = False) -> None:
        pass

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(failed=exc is not None)
        return False


class _Trackers(Tracker):
    """Several backends at once."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step)

    def summary(self, values: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.summary(values)

    def close(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            tracker.close(failed)


class TensorBoardTracker(Tracker):
    """Event files in `directory` (one run of `tensorboard --logdir <run>/tracking`). A rerun of the same
    artifact adds an event file whose steps restart; TensorBoard then drops the old run's later points."""

    def __init__(self, directory: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def summary(self, values: dict[str, float]) -> None:
        # one point each: TensorBoard has no run summary, so the final numbers are scalars at step 0
        for tag, value in values.items():
            self.writer.add_scalar(f"summary/{tag}", value, 0)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run: project `igdrec` (or $WANDB_PROJECT), group = the run directory's name, its files under
    `directory` (or $WANDB_DIR); offline with WANDB_MODE=offline (`wandb sync` uploads it later)."""

    def __init__(self, directory: Path, name: str, group: str, job_type: str, config: dict):
        import wandb

        where = {} if os.environ.get("WANDB_DIR") else {"dir": str(directory)}
        if where:
            directory.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "igdrec"), name=name, group=group,
                                  job_type=job_type, config=config, **where)
        except wandb.errors.Error as exc:  # no account, a bad setting: said before any work is done
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise IgdrecError(f"--report-to wandb: {reason} (or set WANDB_MODE=offline to log locally)") from None

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def start(backends: list[str], run_root: Path, stage_path: str, config: dict) -> Tracker:
    """The tracker of the artifact at `stage_path` (`sft/NAME`) of the run directory `run_root`; `config`
    is logged with it (its settings, cache key)."""
    require(backends)
    name = stage_path.replace("/", "-")
    directory = run_root / TRACKING_DIR / name
    trackers: list[Tracker] = []
    try:
        for backend in backends:
            if backend == "tensorboard":
                trackers.append(TensorBoardTracker(directory, config))
            elif backend == "wandb":
                trackers.append(WandbTracker(directory, name, run_root.name, stage_path.split("/")[0], config))
    except BaseException:
        _Trackers(trackers).close(failed=True)
        raise
    if not trackers:
        return Tracker()
    return trackers[0] if len(trackers) == 1 else _Trackers(trackers)
