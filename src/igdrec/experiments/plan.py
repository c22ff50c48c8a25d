"""The grid's plan: every row of the paper's tables as cells, each a chain of cached stage steps.

A row is one or more *cells*, a cell being one chain of stages that ends in a `metrics` artifact. Cells
share their upstream stages through the run directory's stage cache: per dataset one preprocess and one
IG index, one fine-tune per variant, and many decodes of each. A row with several candidates (the α grid,
a weighting's listed values) has one valid cell per candidate and a test cell for the chosen one
(experiments/select.py)."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from igdrec import config as cfg
from igdrec import options
from igdrec.errors import IgdrecError
from igdrec.experiments.grid_config import CONFIG_COPY, Dataset, GridConfig, load_grid
from igdrec.experiments.rows import ROWS, SEARCH_ERROR_ROWS
from igdrec.stages.sft import default_name as sft_default_name


@dataclass
class Step:
    """One stage invocation in one dataset's run directory."""

    dataset: str
    run_dir: Path
    stage: str
    path: str  # stage path inside the run directory: data, ig, sft/NAME, decode/NAME, ...
    config: Any
    after: tuple[str, ...] = ()  # stage paths of the upstream steps (same run directory)


@dataclass
class Cell:
    """A chain of steps that ends in one metrics artifact."""

    dataset: str
    row: str
    split: str
    steps: list[Step]
    metrics: str  # metrics name (artifact <run>/metrics/<name>.json)
    candidate: dict  # the selected-over values (sft name, beta, alpha)


@dataclass
class RowPlan:
    dataset: str
    row: str
    candidates: list[Cell]  # valid cells (empty when nothing is selected)
    fixed: Cell | None  # the test cell when nothing is selected
    make_test: Callable[[dict], Cell] | None  # the test cell for a chosen candidate


@dataclass
class Plan:
    grid: GridConfig
    rows: list[RowPlan]


def _fmt(value: float) -> str:
    return f"{value:g}"


def _build(stage: str, values: dict, where: str):
    return options.build(cfg.STAGE_CONFIGS[stage], values, where)


class _Planner:
    def __init__(self, grid: GridConfig, dataset: Dataset):
        self.grid, self.ds = grid, dataset
        self.where = f"{grid.path}:datasets.{dataset.name}"

    def step(self, stage: str, path: str, values: dict, after: tuple[str, ...] = ()) -> Step:
        return Step(self.ds.name, self.ds.run_dir, stage, path, _build(stage, values, f"{self.where}.{stage}"), after)

    def upstream(self) -> list[Step]:
        steps = []
        if self.ds.preprocess is not None:
            steps.append(self.step("preprocess", "data", self.ds.preprocess))
        steps.append(self.step("build-ig-index", "ig", self.ds.stages.get("build-ig-index", {}), ("data",)))
        return steps

    def sft_variants(self, weighting: str) -> list[Step]:
        """Every candidate fine-tune of a weighting (the product of its listed values)."""
        values = dict(self.ds.weightings.get(weighting, {}))
        igd = self.ds.weightings.get("igd", {})
        if weighting == "msl-igd" and "msl-igd" not in self.ds.weightings and "beta" in igd:
            values["beta"] = igd["beta"]  # MSL + IGD uses IGD's β (its candidates too) unless listed on its own
        grid_keys = [k for k, v in values.items() if isinstance(v, list) and k != "lora_target_modules"]
        combos = itertools.product(*[values[k] for k in grid_keys]) if grid_keys else [()]
        combos = list(combos)
        steps = []
        for combo in combos:
            chosen = {**values, **dict(zip(grid_keys, combo)), "weighting": weighting}
            # resume: a grid killed mid-fine-tune continues from the fine-tune's last checkpoint
            merged = {"resume": True, **self.ds.stages.get("sft", {}), **chosen}
            config = _build("sft", merged, f"{self.where}.weightings.{weighting}")
            if config.name is None or len(combos) > 1:  # one name cannot stand for several fine-tunes
                config = dataclasses.replace(config, name=sft_default_name(dataclasses.replace(config, name=None)))
            steps.append(Step(self.ds.name, self.ds.run_dir, "sft", f"sft/{config.name}", config, ("data", "ig")))
        return steps

    def llm_cell(self, row: str, sft_step: Step, split: str, lp: float, alpha: float, tfa: str | None,
                 constrained_softmax: bool = False) -> Cell:
        sft_name = sft_step.path.split("/", 1)[1]
        decode_values = dict(self.ds.stages.get("decode", {}))
        limit = self.grid.selection.valid_limit if split == "valid" else decode_values.get("limit")
        name = f"{sft_name}-{split}-lp{_fmt(lp)}-a{_fmt(alpha)}"
        decode_values |= {"sft": sft_name, "split": split, "length_penalty": lp, "alpha": alpha, "limit": limit, "name": name}
        if tfa:
            name += f"-tfa-{tfa}"
            decode_values |= {"tfa": tfa, "tfa_guidance": self.grid.tfa_guidance, "name": name}
        if constrained_softmax:
            name += "-cs"
            decode_values |= {"constrained_softmax": True, "name": name}
        if limit is not None:
            name += f"-n{limit}"
            decode_values["name"] = name
        steps = [*self.upstream(), sft_step]
        if tfa:
            steps.append(self.baseline_step(tfa))
        after = ("data", "ig", sft_step.path) + ((f"baseline/{tfa}",) if tfa else ())
        steps.append(self.step("decode", f"decode/{name}", decode_values, after))
        if row in SEARCH_ERROR_ROWS:  # a step of its own: the cell's other steps keep their paths and cache keys
            values = {**self.ds.stages.get("search-errors", {}), "decode": name}
            steps.append(self.step("search-errors", f"search-errors/{name}", values, (f"decode/{name}",)))
        steps.append(self.step("rerank", f"rerank/{name}", {**self.ds.stages.get("rerank", {}), "decode": name, "name": name}, (f"decode/{name}",)))
        steps.append(self.step("metrics", f"metrics/{name}", {**self.ds.stages.get("metrics", {}), "rerank": name, "name": name}, (f"rerank/{name}",)))
        beta = sft_step.config.beta if sft_step.config.weighting != "plain" else None
        return Cell(self.ds.name, row, split, steps, name, {"sft": sft_name, "beta": beta, "alpha": alpha})

    def baseline_step(self, model: str) -> Step:
        values = {**self.ds.stages.get("baseline", {}), "model": model, "name": model}
        return self.step("baseline", f"baseline/{model}", values, ("data",))

    def baseline_cell(self, row: str, model: str) -> Cell:
        name = f"baseline-{model}"
        steps = [*self.upstream(), self.baseline_step(model)]
        # scored on the same test samples as the LLM rows (their decodes cover the first `limit`)
        limit = self.ds.stages.get("decode", {}).get("limit")
        values = {**self.ds.stages.get("metrics", {}), "baseline": model, "name": name, "limit": limit}
        steps.append(self.step("metrics", f"metrics/{name}", values, (f"baseline/{model}",)))
        return Cell(self.ds.name, row, "test", steps, name, {})

    def row(self, row: str) -> RowPlan:
        spec = ROWS[row]
        if "baseline" in spec:
            return RowPlan(self.ds.name, row, [], self.baseline_cell(row, spec["baseline"]), None)
        variants = self.sft_variants(spec["sft"])
        alphas = self.grid.selection.alphas if spec["alpha"] == "select" else [spec["alpha"]]
        pairs = [(v, a) for v in variants for a in alphas]
        lp, tfa, cs = spec["lp"], spec.get("tfa"), spec.get("constrained_softmax", False)
        if len(pairs) == 1:
            return RowPlan(self.ds.name, row, [], self.llm_cell(row, pairs[0][0], "test", lp, pairs[0][1], tfa, cs), None)
        candidates = [self.llm_cell(row, v, "valid", lp, a, tfa, cs) for v, a in pairs]
        by_sft = {v.path.split("/", 1)[1]: v for v in variants}
        return RowPlan(self.ds.name, row, candidates, None,
                       lambda chosen: self.llm_cell(row, by_sft[chosen["sft"]], "test", lp, chosen["alpha"], tfa, cs))


def fine_tunes(grid: GridConfig, dataset: Dataset, weighting: str) -> list[Step]:
    """The sft steps of one weighting in one dataset (several when the config lists candidate values)."""
    return _Planner(grid, dataset).sft_variants(weighting)


def plan_grid(grid: GridConfig, only: str | None = None) -> Plan:
    if only is not None and only not in ROWS:
        close = difflib.get_close_matches(only, list(ROWS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise IgdrecError(f"--only {only!r}: unknown row{hint}; known: {', '.join(ROWS)}")
    wanted = [only] if only else grid.rows
    rows = [_Planner(grid, dataset).row(row) for dataset in grid.datasets for row in wanted]  # dataset by dataset
    return Plan(grid, rows)


def count_cells(plan: Plan) -> int:
    return sum(len(r.candidates) + 1 for r in plan.rows)


def run_root_plan(run_root: str | Path, config: str | Path | None = None) -> Plan:
    """The plan of a grid's run root, from the copy of its config there (or `config`), for re-rendering
    its reports. An older run root whose metrics lack a cut-off the tables print still plans (the
    report shows those cells empty)."""
    run_root = Path(run_root)
    config_path = Path(config) if config else run_root / CONFIG_COPY
    if not config_path.exists():
        raise IgdrecError(f"{run_root}: no {CONFIG_COPY}; is this a grid run root? (or pass the grid config with --config)")
    return plan_grid(load_grid(config_path, run_root=run_root, check_metrics=False))
