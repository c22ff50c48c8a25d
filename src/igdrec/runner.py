"""The one stage runner: check → plan (upstream, name, cache key) → cached? → compute → report.

A stage is the module `igdrec.stages.<name>` (dashes as underscores) of a stage registered by its config
class in `config.STAGE_CONFIGS`; adding a stage is that module plus that registry line. The module exposes

    plan(config, run) -> StagePlan      what it would write and from what: reads upstream manifests only
                                        (no device, no weights), so the grid's dry run can ask it too
    compute(plan, out)                  the work, writing into `out` (a StageWriter being published)

and, where it needs them,

    prepare(plan, writer) -> world      work before the stage directory opens (load data, a model, join
                                        torchrun's process group); the world's rank 0 alone publishes
    report(plan, manifest, cached)      what it prints once its result is published (or found cached),
                                        before the runner's "wrote NAME (next: …)" line

The CLI's stage commands, `igdrec run` and the grid all run stages through `run_stage`. Its check is
`options.check`: the entry point of a Python caller's `stage.run(config, ...)`, and free for a config the
command line or the YAML loader already checked (each rule lives in config.py, none in a stage).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from igdrec import config as cfg
from igdrec import options, tracking
from igdrec.console import console
from igdrec.rundir import RunDir, StageWriter, cache_key


def module_name(stage: str) -> str:
    return f"igdrec.stages.{stage.replace('-', '_')}"


STAGE_MODULES = {stage: module_name(stage) for stage in cfg.STAGE_CONFIGS}


@dataclass
class StagePlan:
    """One stage invocation as its cache sees it: where it writes, and the key of what it would write."""

    stage: str
    run: RunDir
    path: str  # stage path in the run directory: data, ig, sft/NAME, decode/NAME, ...
    config: Any
    params: dict  # the cache-key parameters (the config's key fields plus what the stage resolved)
    inputs: dict[str, str] = field(default_factory=dict)  # upstream fingerprints, also in the key
    resumable: bool = False  # a failed run keeps its partial directory for the next run with this key
    notes: list[str] = field(default_factory=list)  # printed before the stage runs (or reports cached)
    next: str | None = None  # the command that takes the result on, told once it is written
    product: str | None = None  # the file `next` reads, shown with the stage directory
    context: dict = field(default_factory=dict)  # what plan() and prepare() resolved for compute()

    @property
    def key(self) -> str:
        return cache_key(self.stage, self.params, self.inputs)

    def writer(self, force: bool = False) -> StageWriter:
        return StageWriter(self.run, self.path, stage=self.stage, params=self.params, inputs=self.inputs,
                           force=force, resumable=self.resumable)

    def tracker(self, main: bool = True) -> tracking.Tracker:
        """The `--report-to` tracker of what the stage computes (one that drops everything where the stage has
        no such option, and on ranks other than 0), with the stage's settings and cache key."""
        backends = getattr(self.config, "report_to", [tracking.NONE]) if main else [tracking.NONE]
        return tracking.start(backends, self.run.root, self.path, dataclasses.asdict(self.config) | {"cache_key": self.key})


class _OneProcess:
    """The world of a stage that runs in this process only."""

    is_main = True

    def barrier(self) -> None:
        pass


def stage_module(stage: str):
    if stage not in cfg.STAGE_CONFIGS:  # only a registered name becomes an import
        raise KeyError(stage)
    return importlib.import_module(module_name(stage))


def plan_stage(stage: str, config, run: RunDir) -> StagePlan:
    """The stage's checked config planned against the run directory (raises what the stage would)."""
    module = stage_module(stage)
    options.check(config)
    return module.plan(config, run)


def is_cached(plan: StagePlan) -> bool:
    """Whether running the plan would find its result cached (StageWriter's own test)."""
    return plan.run.cached_manifest(plan.path, plan.key) is not None


def run_stage(stage: str, config, run_dir: RunDir | str | Path | None, force: bool = False) -> dict:
    """Run one stage (or report it cached) and return its manifest."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    module = stage_module(stage)
    plan = plan_stage(stage, config, run)
    for note in plan.notes:
        console.print(note)
    writer = plan.writer(force)
    report = getattr(module, "report", None)
    if writer.cached:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank finds it; rank 0 says so
            writer.report_cached()
            if report is not None:
                report(plan, writer.manifest, cached=True)
        return writer.manifest
    tracking.require(getattr(config, "report_to", []))  # before any work: a missing package fails at once
    prepare = getattr(module, "prepare", None)
    world = prepare(plan, writer) if prepare is not None else _OneProcess()
    # Under torchrun every rank computes (its shard, its gradient share); rank 0 alone publishes.
    with (writer if world.is_main else contextlib.nullcontext(writer)) as out:
        world.barrier()
        module.compute(plan, out)
    world.barrier()
    if not world.is_main:
        return run.manifest(plan.path)
    if report is not None:
        report(plan, writer.manifest, cached=False)
    if plan.next is not None:
        where = run.stage_dir(plan.path)
        console.print(f"{plan.stage} wrote [bold]{plan.path.rpartition('/')[2]}[/] → {where / plan.product if plan.product else where} "
                      f"(next: {plan.next})")
    return writer.manifest
