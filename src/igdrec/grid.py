"""The paper's experiment grid (Tables 1–2, docs/method.md §8) as cached stage chains: plan, dry run, run.

A grid config (YAML, see `configs/grid/`) names the datasets, the settings shared by every stage, the
fine-tuning variants (Pos, CFT, IGD and their candidate values) and the selection grid. From it
`plan_grid` builds the rows of the paper's tables; each row is one or more *cells*, a cell being one
chain of stages that ends in a `metrics` artifact. Cells share their upstream stages through the
run directory's stage cache: per dataset one preprocess and one IG index, one fine-tune per variant,
and many decodes of each. `<run_root>/<dataset>/` is each dataset's run directory.

Selection happens on the **validation** split: a row with several candidates — the decoding α of the
`selection.alphas` grid, and the fine-tunes of a weighting that lists candidate values (IGD β, Pos β, CFT
β × α: one fine-tune per combination) — decodes every candidate on `selection.valid_limit` valid samples,
reranks and scores it; the best `selection.metric` wins (ties: the earlier candidate, i.e. the earlier
listed value and the smaller α), and only the winner is decoded on test. (The reference code picks α by
test metrics; we do not.)

Rows whose stage this igdrec does not have yet (the `baseline` stage, TFA inside decode) are
*unavailable*: left out of `rows: all` with a note, an error when asked for by name.
"""

from __future__ import annotations

import copy
import difflib
import dataclasses
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from igdrec import config as cfg
from igdrec import runner
from igdrec.console import console, err_console
from igdrec.errors import IgdrecError
from igdrec.rundir import MANIFEST, RunDir, write_json_atomic
from igdrec.stages.sft import default_name as sft_default_name

GRID_STATE = "grid.json"
CONFIG_COPY = "grid-config.yaml"

# The rows of the paper's tables, in table order. `sft`: the fine-tuning variant; `lp`: length penalty
# (1 = BIGRec, 0 = D3); `alpha`: "select" = chosen on valid from the α grid, else fixed.
ROWS: dict[str, dict] = {
    "gru4rec": {"label": "GRU4Rec", "baseline": "gru4rec"},
    "sasrec": {"label": "SASRec", "baseline": "sasrec"},
    "bigrec": {"label": "BIGRec", "sft": "plain", "lp": 1.0, "alpha": 0.0},
    "bigrec+pos": {"label": "+Pos", "sft": "pos", "lp": 1.0, "alpha": 0.0},
    "bigrec+cft": {"label": "+CFT", "sft": "cft", "lp": 1.0, "alpha": 0.0},
    "bigrec+igd": {"label": "+IGD", "sft": "igd", "lp": 1.0, "alpha": "select"},
    "d3": {"label": "D3", "sft": "plain", "lp": 0.0, "alpha": 0.0},
    "d3+pos": {"label": "+Pos", "sft": "pos", "lp": 0.0, "alpha": 0.0},
    "d3+cft": {"label": "+CFT", "sft": "cft", "lp": 0.0, "alpha": 0.0},
    "d3+igd": {"label": "+IGD", "sft": "igd", "lp": 0.0, "alpha": "select"},
    "d3+tfa": {"label": "D3 + TFA (SASRec assistant; beyond the paper)", "sft": "plain", "lp": 0.0, "alpha": 0.0, "tfa": "sasrec"},
    # Table 2 (D3 base): IGD is d3+igd, w/o both is d3.
    "d3+igd-no-wd": {"label": "w/o w_d (α = 0)", "sft": "igd", "lp": 0.0, "alpha": 0.0},
    "d3+igd-no-wt": {"label": "w/o w_t (plain SFT + α)", "sft": "plain", "lp": 0.0, "alpha": "select"},
}
TABLE1_ROWS = ["gru4rec", "sasrec", "bigrec", "bigrec+pos", "bigrec+cft", "bigrec+igd", "d3", "d3+pos", "d3+cft", "d3+igd", "d3+tfa"]
TABLE2_ROWS = [("IGD", "d3+igd"), ("w/o w_d", "d3+igd-no-wd"), ("w/o w_t", "d3+igd-no-wt"), ("w/o both", "d3")]
IMPROVEMENTS = [("bigrec", "bigrec+igd"), ("d3", "d3+igd")]  # (base, +IGD): the Improvement rows
WEIGHTINGS = ("plain", "pos", "cft", "igd")


# ----------------------------------------------------------------------------------------------- config


@dataclass
class Selection:
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4])
    valid_limit: int | None = 100  # valid samples each candidate is decoded on (None: all)
    metric: str = "NDCG@10"


@dataclass
class Dataset:
    name: str
    run_dir: Path
    preprocess: dict | None  # None: the run directory already holds a finished `data` stage
    stages: dict[str, dict]  # per-stage settings, the grid's shared ones with this dataset's on top
    weightings: dict[str, dict]  # weighting -> {sft field: value or list of candidate values}
    paper: str | None = None  # the paper's column (Books, Games, Toys, CDs) to show beside ours
    cost: dict | None = None  # this dataset's cost model overrides (sizes before its data exist)


@dataclass
class GridConfig:
    path: Path
    scale: str
    run_root: Path
    datasets: list[Dataset]
    selection: Selection
    rows: list[str]
    explicit_rows: bool
    tfa_guidance: float
    cost: dict = field(default_factory=dict)  # cost model for --dry-run (see estimate_seconds())
    raw: dict = field(default_factory=dict)


_TOP_KEYS = {"scale", "description", "run_root", "datasets", "stages", "weightings", "selection", "rows", "tfa_guidance", "cost"}
_DATASET_KEYS = {"preprocess", "stages", "weightings", "paper", "cost"}
_GRID_STAGES = ("build-ig-index", "sft", "decode", "rerank", "metrics", "baseline")
# The rates and sizes estimate_seconds() reads (a misspelt one would silently leave its steps unestimated).
_COST_KEYS = ("train_tokens_per_s", "tokens_per_sample", "cft_factor", "decode_s_per_sample",
              "train_samples", "valid_samples", "test_samples",
              *(f"{s.replace('-', '_')}_overhead_s" for s in ("preprocess", *_GRID_STAGES)))
# The cut-offs the report's tables print (report.py); a grid whose metrics lack one is refused before it runs.
REPORT_METRICS = ("NDCG@5", "NDCG@10", "HR@5", "HR@10")


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise IgdrecError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _unknown_keys(keys, known, where: str) -> None:
    bad = sorted(str(k) for k in keys if k not in known)
    if bad:
        hint = cfg.suggestion(bad[0], known) if len(bad) == 1 else ""
        raise IgdrecError(f"{where}: unknown key(s) {', '.join(bad)}{hint}; known: {', '.join(sorted(known))}")


def _value(cls: type, name: str, value: Any, where: str) -> Any:
    """A grid value parsed and bounded by the stage option it stands for (config.py declares each once)."""
    opt = cfg.option_named(cls, name)
    parsed = cfg.parse(opt, value, where)
    cfg.validate(opt, parsed, where)
    return parsed


def _stage_sections(value: Any, where: str) -> dict[str, dict]:
    sections = {}
    for key, values in _mapping(value, where).items():
        stage = str(key).replace("_", "-")
        if stage not in _GRID_STAGES:
            raise IgdrecError(f"{where}: unknown stage {key!r}{cfg.suggestion(stage, _GRID_STAGES)}; known: {', '.join(_GRID_STAGES)}")
        sections[stage] = dict(_mapping(values, f"{where}.{key}"))
    return sections


def _selection(value: Any, where: str) -> Selection:
    sel = _mapping(value, where)
    _unknown_keys(sel, {f.name for f in dataclasses.fields(Selection)}, where)
    selection = Selection()
    if "alphas" in sel:
        alphas = sel["alphas"]
        if not isinstance(alphas, list) or not alphas:
            raise IgdrecError(f"{where}.alphas: expected a list of decoding α candidates, e.g. [0.0, 0.2], got {alphas!r}")
        selection.alphas = [_value(cfg.DecodeConfig, "alpha", a, f"{where}.alphas") for a in alphas]
        if len(set(selection.alphas)) < len(selection.alphas):
            raise IgdrecError(f"{where}.alphas: {alphas} lists an α twice")
    if "valid_limit" in sel:
        selection.valid_limit = _value(cfg.DecodeConfig, "limit", sel["valid_limit"], f"{where}.valid_limit")
    if "metric" in sel:
        if not isinstance(sel["metric"], str):
            raise IgdrecError(f"{where}.metric: expected a metric name such as NDCG@10, got {sel['metric']!r}")
        selection.metric = sel["metric"]
    return selection


def _cost(value: Any, where: str) -> dict:
    cost = _mapping(value, where)
    _unknown_keys(cost, _COST_KEYS, where)
    for key, rate in cost.items():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate < 0:
            raise IgdrecError(f"{where}.{key}: expected a number ≥ 0, got {rate!r}")
    return cost


def _cutoffs(grid_path: Path, dataset: Dataset, baselines: bool) -> tuple[list[int], str]:
    """The cut-offs K this dataset's metrics will hold, and what bounds them.

    The metrics stage keeps the `ks` no longer than the lists (stages/metrics.py, cutoffs_within_lists):
    an LLM row's list holds at most min(decode num_beams, rerank top_k) items, a baseline's its top_k.
    """
    where = f"{grid_path}:datasets.{dataset.name}"

    def setting(stage: str, cls: type, name: str) -> Any:
        values = dataset.stages.get(stage, {})
        return _value(cls, name, values[name], f"{where}.{stage}.{name}") if name in values else cfg.option_named(cls, name).default

    ks = setting("metrics", cfg.MetricsConfig, "ks")
    bounds = {f"{stage} {name}": setting(stage, cls, name)
              for stage, cls, name in (("decode", cfg.DecodeConfig, "num_beams"), ("rerank", cfg.RerankConfig, "top_k"),
                                       *((("baseline", cfg.BaselineConfig, "top_k"),) if baselines else ()))}
    what, longest = min(bounds.items(), key=lambda item: item[1])
    return sorted({k for k in ks if k <= longest}), f"metrics.ks {ks}, lists of at most {longest} items ({what} {longest})"


def _check_metrics(grid: GridConfig) -> None:
    """Refuse, before anything runs, a selection metric or a report cut-off the grid's metrics will not hold
    (either would otherwise fail only after every validation decode, or every cell, has run)."""
    baselines = any("baseline" in ROWS[r] for r in grid.rows)
    names: set[str] | None = None
    for dataset in grid.datasets:
        ks, _ = _cutoffs(grid.path, dataset, baselines=False)
        held = {f"{m}@{k}" for m in ("NDCG", "HR") for k in ks}
        names = held if names is None else names & held
        ks_all, why = _cutoffs(grid.path, dataset, baselines)
        missing = [m for m in REPORT_METRICS if int(m.split("@")[1]) not in ks_all]
        if missing:
            raise IgdrecError(f"{grid.path}:datasets.{dataset.name}: the report's tables show {', '.join(REPORT_METRICS)} but "
                              f"this grid's metrics would lack {', '.join(missing)} ({why}); keep 5 and 10 in metrics.ks "
                              "and num_beams, top_k ≥ 10")
    known = sorted(names or (), key=lambda n: (n.split("@")[0], int(n.split("@")[1])))
    if grid.selection.metric not in known:
        raise IgdrecError(f"{grid.path}:selection.metric: {grid.selection.metric!r} is not a metric this grid computes"
                          f"{cfg.suggestion(grid.selection.metric, known)}; known: {', '.join(known)}")


def load_grid(path: str | Path, run_root: str | Path | None = None, check_metrics: bool = True) -> GridConfig:
    """Read and check a grid config: every mistake is one line naming the file and key, before anything runs.

    `check_metrics=False` (the report re-rendering a finished run root) skips the refusal of a selection
    metric or report cut-off the metrics lack: an older grid's results render, missing columns shown empty.
    """
    path = Path(path)
    raw = cfg._read_yaml(path) or {}  # a directory, a missing or non-UTF-8 file, broken YAML: one line each
    if not isinstance(raw, dict):
        raise IgdrecError(f"{path}: top level must be a mapping")
    _unknown_keys(raw, _TOP_KEYS, path)
    for key in ("scale", "run_root", "description"):
        if key in raw and not isinstance(raw[key], str):
            raise IgdrecError(f"{path}:{key}: expected a string, got {raw[key]!r}")
    root = Path(run_root or raw.get("run_root") or f"runs/grid-{raw.get('scale', path.stem)}")
    shared = _stage_sections(raw.get("stages"), f"{path}:stages")
    shared_weightings = _weightings(raw.get("weightings"), f"{path}:weightings")
    datasets = []
    for name, spec in _mapping(raw.get("datasets"), f"{path}:datasets").items():
        cfg.check_artifact_name(name, f"{path}:datasets")  # the name is the dataset's run directory
        where = f"{path}:datasets.{name}"
        spec = _mapping(spec, where)
        _unknown_keys(spec, _DATASET_KEYS, where)
        stages = copy.deepcopy(shared)
        for stage, values in _stage_sections(spec.get("stages"), f"{where}.stages").items():
            stages.setdefault(stage, {}).update(values)
        weightings = copy.deepcopy(shared_weightings)
        for w, values in _weightings(spec.get("weightings"), f"{where}.weightings").items():
            weightings.setdefault(w, {}).update(values)
        preprocess = spec.get("preprocess")
        if preprocess is not None:
            preprocess = _mapping(preprocess, f"{where}.preprocess")
            cfg.build(cfg.PreprocessConfig, preprocess, f"{where}.preprocess")  # check the keys now
        paper = spec.get("paper")
        if paper is not None and paper not in ("Books", "Games", "Toys", "CDs"):
            raise IgdrecError(f"{where}.paper: {paper!r} is not one of the paper's datasets (Books, Games, Toys, CDs)")
        datasets.append(Dataset(name, root / name, preprocess, stages, weightings, paper, _cost(spec.get("cost"), f"{where}.cost")))
    if not datasets:
        raise IgdrecError(f"{path}: `datasets` is empty; name at least one dataset")
    selection = _selection(raw.get("selection"), f"{path}:selection")
    rows = raw.get("rows", "all")
    if isinstance(rows, str) and rows != "all":  # `rows: bigrec, d3`
        rows = [r.strip() for r in rows.split(",") if r.strip()]
    if rows != "all" and (not isinstance(rows, list) or not rows):
        raise IgdrecError(f"{path}:rows: expected `all` or a list of rows, got {rows!r}; known rows: {', '.join(ROWS)}")
    explicit = rows != "all"
    rows = list(ROWS) if rows == "all" else list(rows)
    for row in rows:
        if row not in ROWS:
            close = difflib.get_close_matches(str(row), list(ROWS), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise IgdrecError(f"{path}:rows: unknown row {row!r}{hint}; known: {', '.join(ROWS)}")
    tfa_guidance = _value(cfg.DecodeConfig, "tfa_guidance", raw.get("tfa_guidance", 0.5), f"{path}:tfa_guidance")
    grid = GridConfig(path, str(raw.get("scale", path.stem)), root, datasets, selection, rows, explicit,
                      tfa_guidance, _cost(raw.get("cost"), f"{path}:cost"), raw)
    if check_metrics:
        _check_metrics(grid)
    return grid


def _weightings(value: Any, where: str) -> dict[str, dict]:
    out = {}
    for w, values in _mapping(value, where).items():
        if w not in WEIGHTINGS:
            raise IgdrecError(f"{where}: unknown weighting {w!r}; known: {', '.join(WEIGHTINGS)}")
        out[w] = dict(_mapping(values, f"{where}.{w}"))
        for key, value in out[w].items():
            if isinstance(value, list) and key != "lora_target_modules" and len(set(map(repr, value))) < max(len(value), 1):
                raise IgdrecError(f"{where}.{w}.{key}: a candidate list needs at least one value, each once; got {value!r}")
    return out


# ------------------------------------------------------------------------------------------------ plan


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
    unavailable: dict[str, str]  # row -> why it cannot run with this igdrec


def stage_available(stage: str) -> bool:
    """Whether this igdrec has the stage: its config class, its module, and the CLI's runner knows it."""
    import importlib.util

    module = runner.STAGE_MODULES.get(stage)
    return stage in cfg.STAGE_CONFIGS and module is not None and importlib.util.find_spec(module) is not None


def _has_field(cls: type, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(cls)}


def row_unavailable(row: str) -> str | None:
    spec = ROWS[row]
    if "baseline" in spec and not stage_available("baseline"):
        return "needs the `baseline` stage (igdrec baseline), which this igdrec does not have yet"
    if "baseline" in spec and not _has_field(cfg.MetricsConfig, "baseline"):
        return "needs MetricsConfig.baseline (metrics of a baseline's topk), which this igdrec does not have yet"
    if spec.get("tfa"):
        if not _has_field(cfg.DecodeConfig, "tfa"):
            return "needs TFA inside decode (DecodeConfig.tfa), which this igdrec does not have yet"
        if not stage_available("baseline"):
            return "needs the `baseline` stage for its SASRec assistant, which this igdrec does not have yet"
    return None


def _fmt(value: float) -> str:
    return f"{value:g}"


def _build(stage: str, values: dict, where: str):
    return cfg.build(cfg.STAGE_CONFIGS[stage], values, where)


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

    def llm_cell(self, row: str, sft_step: Step, split: str, lp: float, alpha: float, tfa: str | None) -> Cell:
        sft_name = sft_step.path.split("/", 1)[1]
        decode_values = dict(self.ds.stages.get("decode", {}))
        limit = self.grid.selection.valid_limit if split == "valid" else decode_values.get("limit")
        name = f"{sft_name}-{split}-lp{_fmt(lp)}-a{_fmt(alpha)}"
        decode_values |= {"sft": sft_name, "split": split, "length_penalty": lp, "alpha": alpha, "limit": limit, "name": name}
        if tfa:
            name += f"-tfa-{tfa}"
            decode_values |= {"tfa": tfa, "tfa_guidance": self.grid.tfa_guidance, "name": name}
        if limit is not None:
            name += f"-n{limit}"
            decode_values["name"] = name
        steps = [*self.upstream(), sft_step]
        if tfa:
            steps.append(self.baseline_step(tfa))
        after = ("data", "ig", sft_step.path) + ((f"baseline/{tfa}",) if tfa else ())
        steps.append(self.step("decode", f"decode/{name}", decode_values, after))
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
        lp, tfa = spec["lp"], spec.get("tfa")
        if len(pairs) == 1:
            return RowPlan(self.ds.name, row, [], self.llm_cell(row, pairs[0][0], "test", lp, pairs[0][1], tfa), None)
        candidates = [self.llm_cell(row, v, "valid", lp, a, tfa) for v, a in pairs]
        by_sft = {v.path.split("/", 1)[1]: v for v in variants}
        return RowPlan(self.ds.name, row, candidates, None,
                       lambda chosen: self.llm_cell(row, by_sft[chosen["sft"]], "test", lp, chosen["alpha"], tfa))


def fine_tunes(grid: GridConfig, dataset: Dataset, weighting: str) -> list[Step]:
    """The sft steps of one weighting in one dataset (several when the config lists candidate values)."""
    return _Planner(grid, dataset).sft_variants(weighting)


def plan_grid(grid: GridConfig, only: str | None = None) -> Plan:
    if only is not None and only not in ROWS:
        close = difflib.get_close_matches(only, list(ROWS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise IgdrecError(f"--only {only!r}: unknown row{hint}; known: {', '.join(ROWS)}")
    wanted = [only] if only else grid.rows
    unavailable = {}
    for row in wanted:
        why = row_unavailable(row)
        if why:
            if only:
                raise IgdrecError(f"--only {row}: the row {why}")
            if grid.explicit_rows:
                raise IgdrecError(f"{grid.path}:rows: {row} {why}; leave it out of `rows:`")
            unavailable[row] = why
    runnable = [row for row in wanted if row not in unavailable]
    rows = [_Planner(grid, dataset).row(row) for dataset in grid.datasets for row in runnable]  # dataset by dataset
    return Plan(grid, rows, unavailable)


# ---------------------------------------------------------------------------------------- cache state


def cache_state(step: Step, states: dict[tuple[str, str], str], run: RunDir | None = None) -> str:
    """`cached`, `to run` (no finished artifact, or one made with other settings) or `pending`.

    `pending`: an artifact exists but an upstream step still has to run, so whether it stays valid is
    only known then. `states` holds the states of the steps already looked at (upstream first). Whether
    the artifact is current is the stage's own answer: its plan's cache key against the manifest's.
    """
    run = run or RunDir(step.run_dir)
    if not (run.stage_dir(step.path) / MANIFEST).exists():
        return "to run"
    upstream = [states.get((step.dataset, p), "cached") for p in step.after]
    if any(s != "cached" for s in upstream):
        return "pending"
    try:
        plan = runner.plan_stage(step.stage, step.config, run)
    except IgdrecError:  # e.g. an upstream artifact changed after it was written
        return "to run"
    return "cached" if plan.path == step.path and runner.is_cached(plan) else "to run"


# ------------------------------------------------------------------------------------------- selection


def choose(run_dir: Path, candidates: list[Cell], metric: str) -> tuple[dict | None, list[dict]]:
    """The candidate with the best valid `metric` (ties: the earlier one) and every candidate's score.

    Returns (None, partial scores) while some candidate has no metrics yet.
    """
    scores = []
    for cell in candidates:
        path = Path(run_dir) / "metrics" / f"{cell.metrics}.json"
        value = None
        if path.exists() and RunDir(run_dir).manifest(f"metrics/{cell.metrics}"):
            summary = json.loads(path.read_text())
            if metric not in summary:  # e.g. NDCG@10 of lists shorter than 10: the metrics stage drops it
                known = ", ".join(k for k in summary if k.startswith(("NDCG@", "HR@")))
                raise IgdrecError(f"{path}: has no {metric} to select by (it has {known}); raise num_beams / top_k or change selection.metric")
            value = summary[metric]
        scores.append({**cell.candidate, "metrics": cell.metrics, metric: value})
    if any(s[metric] is None for s in scores):
        return None, scores
    best = max(range(len(scores)), key=lambda i: (scores[i][metric], -i))
    return {k: scores[best][k] for k in ("sft", "beta", "alpha")}, scores


def selected_over(row: RowPlan) -> str | None:
    """What a row chooses on valid ("α", "fine-tune", "fine-tune and α"), or None for a fixed row."""
    varied = [what for what, key in (("fine-tune", "sft"), ("α", "alpha")) if len({c.candidate[key] for c in row.candidates}) > 1]
    return " and ".join(varied) or None


def resolve_test_cell(row: RowPlan, metric: str) -> Cell | None:
    if row.fixed is not None:
        return row.fixed
    chosen, _ = choose(row.candidates[0].steps[0].run_dir, row.candidates, metric)
    return None if chosen is None else row.make_test(chosen)


# ----------------------------------------------------------------------------------------- dry run


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


class _Unchanging(RunDir):
    """A run directory that nothing writes to while it is read: each artifact's check (which hashes its
    outputs) is made once, not again for every step whose plan reads it."""

    def __init__(self, root: Path):
        super().__init__(root)
        self._checked: dict[str, tuple[dict | None, str | None]] = {}

    def _checked_manifest(self, stage_path: str) -> tuple[dict | None, str | None]:
        if stage_path not in self._checked:
            self._checked[stage_path] = super()._checked_manifest(stage_path)
        return self._checked[stage_path]


def dry_run(plan: Plan) -> list[dict]:
    """Every step the grid would run, in order, with its cache state (runs nothing)."""
    rows = []
    states: dict[tuple[str, str], str] = {}
    seen = set()
    runs = {d.name: _Unchanging(d.run_dir) for d in plan.grid.datasets}

    def add(cell: Cell, row: RowPlan, role: str, note: dict[str, str]) -> None:
        for step in cell.steps:
            key = (step.dataset, step.path)
            if key in seen:
                continue
            seen.add(key)
            states[key] = cache_state(step, states, runs[step.dataset])
            rows.append({"dataset": step.dataset, "row": row.row, "role": role, "stage": step.stage, "path": step.path,
                         "state": states[key], "estimate_s": estimate_seconds(step, plan.grid), "note": note.get(step.path)})

    for row in plan.rows:
        # a fine-tune among several the row chooses from says so (where it first appears)
        sfts = list(dict.fromkeys(c.candidate["sft"] for c in row.candidates))
        note = {f"sft/{name}": f"candidate {i} of {len(sfts)}, chosen on valid by {plan.grid.selection.metric}"
                for i, name in enumerate(sfts, 1)} if len(sfts) > 1 else {}
        for cell in row.candidates:
            add(cell, row, "select on valid", note)
        test = resolve_test_cell(row, plan.grid.selection.metric)
        if test is not None:
            add(test, row, "test", {})
        else:
            rows.append({"dataset": row.dataset, "row": row.row, "role": "test", "stage": "decode+rerank+metrics",
                         "path": f"({selected_over(row)} chosen on valid)", "state": "pending",
                         "estimate_s": _pending_test_estimate(row, plan.grid), "note": None})
    return rows


def _pending_test_estimate(row: RowPlan, grid: GridConfig) -> float | None:
    decode = next(s for s in row.candidates[0].steps if s.stage == "decode")
    dataset = next(d for d in grid.datasets if d.name == row.dataset)
    test_like = dataclasses.replace(decode.config, split="test", limit=dataset.stages.get("decode", {}).get("limit"))
    return estimate_seconds(dataclasses.replace(decode, config=test_like), grid)


def count_cells(plan: Plan) -> int:
    return sum(len(r.candidates) + 1 for r in plan.rows)


# ---------------------------------------------------------------------------------------------- run


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
    if step.stage == "baseline" and not stage_available("baseline"):
        raise IgdrecError(f"{step.path}: the `baseline` stage is not part of this igdrec yet")
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
    for row, why in plan.unavailable.items():
        err_console.print(f"[yellow]note:[/] row {row} is left out: it {why}")
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
        from igdrec import report as report_module

        t0 = time.perf_counter()
        report_module.write_reports(grid.run_root, only=None)
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


def print_dry_run(plan: Plan) -> list[dict]:
    rows = dry_run(plan)
    colours = {"cached": "green", "to run": "yellow", "pending": "cyan"}
    console.print(f"[bold]grid {plan.grid.scale}[/]: {count_cells(plan)} cells over {len(plan.grid.datasets)} dataset(s) → {plan.grid.run_root}")
    width = max((len(r["row"]) for r in rows), default=4)
    dataset = None
    for r in rows:
        if r["dataset"] != dataset:
            dataset = r["dataset"]
            console.print(f"[bold]{dataset}[/] ({plan.grid.run_root / dataset})")
        est = "" if r["estimate_s"] is None else f"  ~{r['estimate_s'] / 60:.1f} min"
        role = "valid" if r["role"].startswith("select") else "test "
        state = f"[{colours[r['state']]}]{r['state']:<7}[/]"
        note = f"  [cyan]({r['note']})[/]" if r["note"] else ""
        console.print(f"  {state}  {r['row']:<{width}}  {role}  {r['stage']:<14} {r['path']}{est}{note}", soft_wrap=True)
    todo = [r for r in rows if r["state"] != "cached"]
    known = [r["estimate_s"] for r in todo if r["estimate_s"] is not None]
    console.print(f"{len(rows) - len(todo)} of {len(rows)} steps cached; {len(todo)} to run or pending "
                  "(pending: an upstream step runs first, or the test decode waits for the choice on valid)")
    if known:
        if len(plan.grid.datasets) > 1:
            per = {d.name: sum(r["estimate_s"] or 0 for r in todo if r["dataset"] == d.name) / 3600 for d in plan.grid.datasets}
            console.print("estimated per dataset: " + ", ".join(f"{k} {v:.1f} h" for k, v in per.items()), soft_wrap=True)
        console.print(f"estimated cost of what is left: {sum(known) / 3600:.2f} h "
                      f"(cost model `cost:` in {plan.grid.path}; {len(todo) - len(known)} steps without an estimate)", soft_wrap=True)
    for row, why in plan.unavailable.items():
        console.print(f"[yellow]left out:[/] {row}: {why}", soft_wrap=True)
    console.print(f"chosen on the validation split by {plan.grid.selection.metric} (ties: the earlier candidate; the "
                  "reference picks α by test metrics, we do not):", soft_wrap=True)
    for dataset in plan.grid.datasets:
        for row in (r for r in plan.rows if r.dataset == dataset.name and r.candidates):
            sfts = list(dict.fromkeys(c.candidate["sft"] for c in row.candidates))
            alphas = list(dict.fromkeys(c.candidate["alpha"] for c in row.candidates))
            console.print(f"  {dataset.name} {row.row}: {selected_over(row)} among {len(row.candidates)} candidates "
                          f"(fine-tunes {', '.join(sfts)}; α {', '.join(map(_fmt, alphas))})", soft_wrap=True)
    return rows
