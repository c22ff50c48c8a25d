"""The grid YAML (configs/grid/): its schema, declared with `options.option()` like the stage configs and
read by the same functions (`options.build`), so a wrong type, a bound or an unknown key reads as it does
in a stage section: one line naming the file and key, before anything runs."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from igdrec import config as cfg
from igdrec import options
from igdrec.errors import IgdrecError
from igdrec.experiments.rows import ROWS
from igdrec.options import like, option

GRID_STATE = "grid.json"  # in the run root: wall time per phase, when the grid finished
CONFIG_COPY = "grid-config.yaml"  # in the run root: the grid config it was run with
WEIGHTINGS = cfg.WEIGHTINGS
# The stages a grid's `stages:` sections configure (preprocess is set per dataset), in the order errors list them.
_GRID_STAGES = ("build-ig-index", "sft", "decode", "search-errors", "rerank", "metrics", "baseline")
# The cut-offs the report's tables print (report.py); a grid whose metrics lack one is refused before it runs.
REPORT_METRICS = ("NDCG@5", "NDCG@10", "HR@5", "HR@10")
ALL_ROWS = "all"


# ---------------------------------------------------------------------------------------------------
# The file's sections: what `options.build` reads (configs/grid/README.md shows them all).


def _overhead(stage: str):
    return option(None, f"Seconds every {stage} step adds (model loading, validation...).", min=0)


@dataclass
class CostSection:
    """`cost:` the --dry-run estimate's rates and sizes (experiments/cost.py); a rate left out leaves its
    steps without an estimate."""

    train_tokens_per_s: float | None = option(None, "Computed prompt+target tokens per second of fine-tuning.", min=0)
    tokens_per_sample: float | None = option(None, "Computed tokens per training sample (left out: cost.py's guess).", min=0)
    cft_factor: float | None = option(None, "A CFT fine-tune's cost over a plain one (its second pass; left out: cost.py's).", min=0)
    decode_s_per_sample: float | None = option(None, "Seconds to decode one sample.", min=0)
    train_samples: float | None = option(None, "Training samples, for estimates before the data stage has run.", min=0)
    valid_samples: float | None = option(None, "Validation samples, likewise.", min=0)
    test_samples: float | None = option(None, "Test samples, likewise.", min=0)
    preprocess_overhead_s: float | None = _overhead("preprocess")
    build_ig_index_overhead_s: float | None = _overhead("build-ig-index")
    sft_overhead_s: float | None = _overhead("sft")
    decode_overhead_s: float | None = _overhead("decode")
    search_errors_overhead_s: float | None = _overhead("search-errors")
    rerank_overhead_s: float | None = _overhead("rerank")
    metrics_overhead_s: float | None = _overhead("metrics")
    baseline_overhead_s: float | None = _overhead("baseline")
    baseline_epoch_s_per_1k_windows: dict[str, float] | None = option(
        None, "Seconds per epoch per 1,000 training windows, per baseline model.", choices=cfg.BASELINE_MODELS, min=0)
    baseline_best_epoch: dict[str, float] | None = option(
        None, "The epoch early stopping keeps, per baseline model.", choices=cfg.BASELINE_MODELS, min=0)


# The cost keys that hold one number per baseline model, e.g. `baseline_best_epoch: {gru4rec: 40, sasrec: 30}`.
PER_MODEL_COST_KEYS = tuple(o.name for o in options.options(CostSection) if o.kind is dict)


def _given(section: CostSection) -> dict:
    """The rates a `cost:` section sets (a dataset's override only those)."""
    return {o.name: getattr(section, o.name) for o in options.options(CostSection) if getattr(section, o.name) is not None}


@dataclass
class Selection:
    """`selection:` how a row's candidates (decoding α, a weighting's listed values) are chosen on valid."""

    alphas: list[float] = like(cfg.DecodeConfig, "alpha", factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4], unique=True,
                               help="Decoding calibration α candidates of the +IGD rows.")
    valid_limit: int | None = like(cfg.DecodeConfig, "limit", default=100,
                                   help="Valid samples each candidate is decoded on (null: all).")
    metric: str = option("NDCG@10", "The metric a candidate is chosen by: NDCG@K or HR@K, K among metrics.ks.")


@dataclass
class DatasetSection:
    """`datasets.NAME:` one dataset; its run directory is `run_root/NAME`."""

    preprocess: dict | None = option(None, "Its preprocess section; left out: the run directory's data stage is used.")
    paper: str | None = option(None, "The paper's column to show beside ours.", choices=("Books", "Games", "Toys", "CDs"))
    stages: dict[str, dict] = option(factory=dict, help="This dataset's stage settings over the shared ones.",
                                     choices=_GRID_STAGES)
    weightings: dict[str, dict] = option(factory=dict, help="This dataset's fine-tuning variants over the shared ones.",
                                         choices=WEIGHTINGS)
    cost: CostSection = option(factory=CostSection, help="This dataset's cost model over the grid's.")


@dataclass
class GridFile:
    """A grid config file, as written."""

    scale: str | None = option(None, "Names the reports (default: the file's name).")
    description: str | None = option(None, "One line on what the grid is.")
    run_root: str | None = option(None, "Where each dataset's run directory goes (default: runs/grid-SCALE).")
    datasets: dict[str, DatasetSection] = option(factory=dict, help="The datasets, by run-directory name.", artifact=True)
    stages: dict[str, dict] = option(factory=dict, help="Stage settings shared by every cell.", choices=_GRID_STAGES)
    weightings: dict[str, dict] = option(factory=dict, choices=WEIGHTINGS,
                                         help="The fine-tuning variants: sft settings, a list being candidates chosen on valid.")
    selection: Selection = option(factory=Selection, help="How candidates are chosen on valid.")
    rows: list[str] = option(factory=lambda: [ALL_ROWS], help="The rows to run (`all`: every row).",
                             choices=(*ROWS, ALL_ROWS), unique=True)
    tfa_guidance: float = like(cfg.DecodeConfig, "tfa_guidance", help="D3's guidance g for the d3+tfa row.")
    cost: CostSection = option(factory=CostSection, help="The --dry-run estimate's rates and sizes.")

    def check_fields(self) -> None:
        if not self.datasets:
            raise IgdrecError("`datasets` is empty; name at least one dataset")


# ---------------------------------------------------------------------------------------------------
# The grid as planned: each dataset with the shared settings merged under its own.


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


def _value(cls: type, name: str, value: Any, where: str) -> Any:
    """A grid value parsed and bounded by the stage option it stands for (config.py declares each once)."""
    opt = options.option_named(cls, name)
    parsed = options.parse(opt, value, where)
    options.check_value(opt, parsed, where)
    return parsed


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
    raw = options.read_yaml(path)  # a directory, a missing or non-UTF-8 file, broken YAML: one line each
    spec = options.build(GridFile, {} if raw is None else raw, str(path), sep=":")
    scale = spec.scale if spec.scale is not None else path.stem
    root = Path(run_root or spec.run_root or f"runs/grid-{scale}")
    _check_candidates(spec.weightings, f"{path}:weightings")
    datasets = []
    for name, own in spec.datasets.items():
        where = f"{path}:datasets.{name}"
        stages = copy.deepcopy(spec.stages)
        for stage, values in own.stages.items():
            stages.setdefault(stage, {}).update(values)
        _check_candidates(own.weightings, f"{where}.weightings")
        weightings = copy.deepcopy(spec.weightings)
        for w, values in own.weightings.items():
            weightings.setdefault(w, {}).update(values)
        if own.preprocess is not None:
            options.build(cfg.PreprocessConfig, own.preprocess, f"{where}.preprocess")  # check the keys now
        datasets.append(Dataset(name, root / name, own.preprocess, stages, weightings, own.paper, _given(own.cost)))
    if ALL_ROWS in spec.rows and len(spec.rows) > 1:
        raise IgdrecError(f"{path}:rows: {spec.rows}: `{ALL_ROWS}` stands alone (it is every row)")
    rows = list(ROWS) if spec.rows == [ALL_ROWS] else spec.rows
    grid = GridConfig(path, scale, root, datasets, spec.selection, rows, spec.tfa_guidance, _given(spec.cost))
    if check_metrics:
        _check_metrics(grid)
    return grid


def _check_candidates(weightings: dict[str, dict], where: str) -> None:
    """A weighting's listed values are candidates (one fine-tune each): at least one, each once."""
    for w, values in weightings.items():
        for key, value in values.items():
            if isinstance(value, list) and key != "lora_target_modules" and len(set(map(repr, value))) < max(len(value), 1):
                raise IgdrecError(f"{where}.{w}.{key}: a candidate list needs at least one value, each once; got {value!r}")
