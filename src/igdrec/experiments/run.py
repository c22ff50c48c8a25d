"""`igdrec grid`: every cell's steps through the stage runner (cached ones cost a manifest check), resumable
after a kill; fine-tunes data-parallel through torchrun on several GPUs; then the reports."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from igdrec import runner
from igdrec.console import err_console
from igdrec.errors import IgdrecError
from igdrec.experiments import report as report_module
from igdrec.experiments.dryrun import cache_state
from igdrec.experiments.grid_config import CONFIG_COPY, GRID_STATE
from igdrec.experiments.plan import Cell, Plan, Step, count_cells, plan_grid
from igdrec.experiments.select import resolve_test_cell
from igdrec.rundir import write_json_atomic


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable torch means no GPUs
        return 0


def _run_sft_torchrun(step: Step, force: bool, gpus: int) -> None:
    """Several GPUs: `sft` data-parallel through torchrun, its config handed over as a YAML section."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump({"sft": dataclasses.asdict(step.config)}, handle)
        config_path = handle.name
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    command = [torchrun, f"--nproc_per_node={gpus}", "-m", "igdrec.cli", "sft", "--config", config_path, "--run-dir", str(step.run_dir)]
    if force:
        command.append("--force")
    try:
        done = subprocess.run(command, check=False)
    finally:
        os.unlink(config_path)
    if done.returncode != 0:
        raise IgdrecError(f"sft {step.path} under torchrun ({gpus} GPUs) failed with exit code {done.returncode}")


def run_step(step: Step, force: bool = False) -> None:
    if step.stage == "sft" and _gpu_count() > 1:
        _run_sft_torchrun(step, force, _gpu_count())
        return
    runner.run_stage(step.stage, step.config, step.run_dir, force)


class _Progress:
    """Grid-wide progress: one rich rule per cell (cells done / total, the cell, elapsed, ETA).

    A rule rather than a live bar because each stage shows its own live progress bar, and rich allows
    one live display at a time.
    """

    def __init__(self, total: int):
        self.total, self.done, self.started = total, 0, time.perf_counter()
        self.worked_s, self.worked_cells = 0.0, 0

    def begin(self, label: str) -> float:
        elapsed = time.perf_counter() - self.started
        left = self.total - self.done
        eta = f"{self.worked_s / self.worked_cells * left / 60:.0f} min" if self.worked_cells else "?"
        err_console.rule(f"[bold]grid cell {self.done + 1}/{self.total}[/] · elapsed {elapsed / 60:.1f} min · ETA {eta} · {label}", align="left")
        return time.perf_counter()

    def end(self, started: float, cached: bool) -> None:
        self.done += 1
        if not cached:
            self.worked_s += time.perf_counter() - started
            self.worked_cells += 1


def run_grid(plan: Plan, force: bool = False, report: bool = True) -> dict:
    """Run every cell (cached ones cost a manifest check), then write the reports."""
    grid = plan.grid
    grid.run_root.mkdir(parents=True, exist_ok=True)
    (grid.run_root / CONFIG_COPY).write_text(grid.path.read_text())
    state_path = grid.run_root / GRID_STATE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    phases: dict[str, float] = state.get("wall_time_s", {})
    progress = _Progress(count_cells(plan))
    done_steps: set[tuple[str, str]] = set()

    def run_cell(cell: Cell, label: str) -> None:
        started = progress.begin(label)
        states: dict = {}
        all_cached = True
        for step in cell.steps:
            key = (step.dataset, step.path)
            if key in done_steps and not force:
                continue
            states[key] = cache_state(step, states)
            all_cached &= states[key] == "cached"
            t0 = time.perf_counter()
            run_step(step, force=force and key not in done_steps)
            phase = _phase(step)
            phases[phase] = round(phases.get(phase, 0.0) + time.perf_counter() - t0, 3)
            done_steps.add(key)
            write_json_atomic(state_path, {**state, "wall_time_s": phases})
        progress.end(started, all_cached)

    for row in plan.rows:
        for cell in row.candidates:
            run_cell(cell, f"{cell.dataset} · {row.row} · valid candidate {cell.metrics}")
        test = resolve_test_cell(row, grid.selection.metric)
        if test is None:
            raise IgdrecError(f"{row.dataset}/{row.row}: selection cells finished without metrics; rerun the grid")
        run_cell(test, f"{test.dataset} · {row.row} · test {test.metrics}")
    state = {**state, "wall_time_s": phases, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json_atomic(state_path, state)
    if report:
        t0 = time.perf_counter()
        report_module.write_reports(plan_grid(grid))  # every row of the grid, also after --only
        phases["report"] = round(phases.get("report", 0.0) + time.perf_counter() - t0, 3)
        write_json_atomic(state_path, {**state, "wall_time_s": phases})
    return state


def _phase(step: Step) -> str:
    if step.stage in ("decode", "rerank", "metrics"):
        split = getattr(step.config, "split", None)
        if step.stage != "decode":
            split = "valid" if "-valid-" in step.path else "test"
        return f"{step.stage} ({split})"
    return step.stage
