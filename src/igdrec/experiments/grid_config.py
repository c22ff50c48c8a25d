"""The grid YAML (configs/grid/): its schema, read and checked before anything runs; every mistake one line
naming the file and key."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from igdrec import config as cfg
from igdrec import options
from igdrec.errors import IgdrecError
from igdrec.experiments.rows import ROWS

GRID_STATE = "grid.json"  # in the run root: wall time per phase, when the grid finished
CONFIG_COPY = "grid-config.yaml"  # in the run root: the grid config it was run with
WEIGHTINGS = cfg.WEIGHTINGS


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
    tfa_guidance: float
    cost: dict = field(default_factory=dict)  # cost model for --dry-run (see estimate_seconds())
    raw: dict = field(default_factory=dict)


_TOP_KEYS = {"scale", "description", "run_root", "datasets", "stages", "weightings", "selection", "rows", "tfa_guidance", "cost"}
_DATASET_KEYS = {"preprocess", "stages", "weightings", "paper", "cost"}
# The stages a grid's `stages:` sections configure (preprocess is set per dataset), in the order errors list them.
_GRID_STAGES = ("build-ig-index", "sft", "decode", "search-errors", "rerank", "metrics", "baseline")
# The rates and sizes estimate_seconds() reads (a misspelt one would silently leave its steps unestimated).
_COST_KEYS = ("train_tokens_per_s", "tokens_per_sample", "cft_factor", "decode_s_per_sample",
              "train_samples", "valid_samples", "test_samples",
              *(f"{s.replace('-', '_')}_overhead_s" for s in ("preprocess", *_GRID_STAGES)))
# The cost keys that hold one number per baseline model, e.g. `baseline_best_epoch: {gru4rec: 40, sasrec: 30}`.
PER_MODEL_COST_KEYS = ("baseline_epoch_s_per_1k_windows", "baseline_best_epoch")
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
        hint = options.suggestion(bad[0], known) if len(bad) == 1 else ""
        raise IgdrecError(f"{where}: unknown key(s) {', '.join(bad)}{hint}; known: {', '.join(sorted(known))}")


def _value(cls: type, name: str, value: Any, where: str) -> Any:
    """A grid value parsed and bounded by the stage option it stands for (config.py declares each once)."""
    opt = options.option_named(cls, name)
    parsed = options.parse(opt, value, where)
    options.check_value(opt, parsed, where)
    return parsed


def _stage_sections(value: Any, where: str) -> dict[str, dict]:
    sections = {}
    for key, values in _mapping(value, where).items():
        stage = str(key).replace("_", "-")
        if stage not in _GRID_STAGES:
            raise IgdrecError(f"{where}: unknown stage {key!r}{options.suggestion(stage, _GRID_STAGES)}; known: {', '.join(_GRID_STAGES)}")
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
    cost = dict(_mapping(value, where))
    _unknown_keys(cost, (*_COST_KEYS, *PER_MODEL_COST_KEYS), where)
    for key, rate in cost.items():
        if key in PER_MODEL_COST_KEYS:
            if not isinstance(rate, dict):
                raise IgdrecError(f"{where}.{key}: expected a number ≥ 0 per baseline model, e.g. {{gru4rec: 6, sasrec: 9}}, got {rate!r}")
            _unknown_keys(rate, cfg.BASELINE_MODELS, f"{where}.{key}")
            for model, number in rate.items():
                _cost_number(number, f"{where}.{key}.{model}")
            cost[key] = dict(rate)
        else:
            _cost_number(rate, f"{where}.{key}")
    return cost


def _cost_number(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise IgdrecError(f"{where}: expected a number ≥ 0, got {value!r}")


def _cutoffs(grid_path: Path, dataset: Dataset, baselines: bool) -> tuple[list[int], str]:
    """The cut-offs K this dataset's metrics will hold, and what bounds them.

    The metrics stage keeps the `ks` no longer than the lists (stages/metrics.py, cutoffs_within_lists):
    an LLM row's list holds at most min(decode num_beams, rerank top_k) items, a baseline's its top_k.
    """
    where = f"{grid_path}:datasets.{dataset.name}"

    def setting(stage: str, cls: type, name: str) -> Any:
        values = dataset.stages.get(stage, {})
        return _value(cls, name, values[name], f"{where}.{stage}.{name}") if name in values else options.option_named(cls, name).default

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
                          f"{options.suggestion(grid.selection.metric, known)}; known: {', '.join(known)}")


def load_grid(path: str | Path, run_root: str | Path | None = None, check_metrics: bool = True) -> GridConfig:
    """Read and check a grid config: every mistake is one line naming the file and key, before anything runs.

    `check_metrics=False` (the report re-rendering a finished run root) skips the refusal of a selection
    metric or report cut-off the metrics lack: an older grid's results render, missing columns shown empty.
    """
    path = Path(path)
    raw = options.read_yaml(path) or {}  # a directory, a missing or non-UTF-8 file, broken YAML: one line each
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
        options.check_artifact_name(name, f"{path}:datasets")  # the name is the dataset's run directory
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
            options.build(cfg.PreprocessConfig, preprocess, f"{where}.preprocess")  # check the keys now
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
    rows = list(ROWS) if rows == "all" else list(rows)
    for row in rows:
        if row not in ROWS:
            close = difflib.get_close_matches(str(row), list(ROWS), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise IgdrecError(f"{path}:rows: unknown row {row!r}{hint}; known: {', '.join(ROWS)}")
    tfa_guidance = _value(cfg.DecodeConfig, "tfa_guidance", raw.get("tfa_guidance", 0.5), f"{path}:tfa_guidance")
    grid = GridConfig(path, str(raw.get("scale", path.stem)), root, datasets, selection, rows,
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
