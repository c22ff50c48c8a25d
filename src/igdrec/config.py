"""Typed stage configs: plain dataclasses, loadable from a YAML file, overridable from the CLI.

A YAML config has one section per stage (keys = the dataclass field names) plus `run_dir` and
`stages` (the order `igdrec run` executes). The CLI loads the section for its stage (from `--config`,
if given) and then applies the options the user passed explicitly.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from igdrec.errors import IgdrecError

EMBEDDED_MODEL = "smollm2-135m"


def option(default: Any = dataclasses.MISSING, help: str = "", *, key: bool = True, factory: Any = None):
    """A stage-config field with its help text and its cache-key role, written once.

    `key=True`: the value changes what the stage computes, so it belongs to the stage's cache key;
    `key=False`: a run setting (name, device, batch size, logging...) that leaves the result unchanged.
    The CLI options, the YAML loader and the cache keys are all derived from these fields.
    """
    metadata = {"help": help, "key": key}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class PreprocessConfig:
    source: str = "ml-100k"  # ml-100k | amazon2018 | d3-csv | interactions
    history_len: int = 10
    category_word: str | None = None  # word used in the prompt; default per source
    # amazon2018
    reviews: str | None = None
    meta: str | None = None
    category: str | None = None
    start: str = "2017-10-01"
    end: str = "2018-11-01"
    k_core: int = 5
    min_items: int = 10000
    earliest_year: int = 1996
    seed: int = 42
    # d3-csv
    train: str | None = None
    valid: str | None = None
    test: str | None = None
    info: str | None = None
    # interactions
    interactions: str | None = None
    items: str | None = None
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str = "timestamp"
    title_col: str = "title"
    drop_unknown: bool = False


@dataclass
class IGIndexConfig:
    model: str = EMBEDDED_MODEL  # only its tokenizer is used
    reference: str = "train"  # train (target frequencies) | uniform
    smoothing: float = 0.0  # additive smoothing of the reference counts
    catalog: str = "all"  # all | train (items seen as a training target)


@dataclass
class SFTConfig:
    weighting: str = "igd"  # plain | pos | cft | igd
    beta: float = 0.1  # IGD: weight of zero-IG tokens; Pos/CFT: weight of the last target token
    alpha: float = 0.0  # CFT: weight of the causal loss
    model: str = EMBEDDED_MODEL
    name: str | None = None  # default derived from weighting and parameters
    sample: int | None = None  # seeded random subset of train
    valid_sample: int | None = 256  # seeded subset of valid for the per-epoch validation loss
    epochs: int = 3
    max_steps: int | None = None
    lr: float = 1e-4
    batch_size: int = 128  # effective batch (samples per optimiser step)
    micro_batch_size: int = 4
    cutoff_len: int = 512
    warmup_steps: int = 20  # linear warm-up, capped at a tenth of the planned steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping, as the reference (HF Trainer default); 0 = off
    seed: int = 42
    lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    log_every: int = 1
    save_every: int = 50  # optimiser steps between resumable checkpoints
    patience: int = 1
    resume: bool = False
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class DecodeConfig:
    sft: str | None = None  # name of an sft run in this run directory
    model: str | None = None  # or an un-fine-tuned model
    name: str | None = None
    split: str = "test"
    limit: int | None = None
    num_beams: int = 10
    length_penalty: float = 1.0  # 1.0 = BIGRec, 0.0 = D3
    alpha: float = 0.0  # IGD decoding calibration; 0 = off
    batch_size: int = 8  # samples per batch (each with num_beams beams); 8 measured fastest on 2 CPU cores
    shard_size: int = 64  # samples per resumable shard
    jump_forward: bool = True
    cutoff_len: int = 512
    device: str = "auto"
    constrained: bool = True  # False: free generation (BIGRec's grounding then maps text to items)
    max_new_tokens: int | None = None  # default: the longest catalog sequence
    jump_fill: float = 1.0  # least share of real (not pad) tokens in a jump-forward pass; lower suits GPUs


@dataclass
class RerankConfig:
    decode: str | None = None
    name: str | None = None
    top_k: int = 20
    tfa_scores: str | None = None  # Parquet of a traditional model's item scores (D3 text-free assistant)
    tfa_guidance: float = 1.0
    grounding: bool = False  # BIGRec L2 grounding of unconstrained generations


@dataclass
class BaselineConfig:
    model: str = option("sasrec", "Traditional recommender: sasrec | gru4rec | pop (most popular training target).")
    name: str | None = option(None, "Name of the result under <run>/baseline/ (default: the model).", key=False)
    epochs: int = option(300, "Most training epochs (early stopping usually ends sooner).")
    lr: float = option(1e-3, "Adam learning rate.")
    batch_size: int = option(2048, "Training windows per optimiser step.")
    patience: int = option(10, "Stop after this many more epochs without a better valid NDCG@10 (RecBole's stopping_step).")
    hidden_size: int = option(64, "SASRec: hidden size (= item embedding size); GRU4Rec: item embedding size.")
    n_layers: int | None = option(None, "Transformer layers (SASRec, default 2) or GRU layers (GRU4Rec, default 1).")
    n_heads: int = option(2, "SASRec: attention heads.")
    inner_size: int = option(256, "SASRec: feed-forward inner size.")
    dropout: float | None = option(None, "Hidden dropout (SASRec, default 0.5) or dropout on the item embeddings (GRU4Rec, default 0.3).")
    attn_dropout: float = option(0.5, "SASRec: dropout on the attention probabilities.")
    gru_hidden_size: int = option(128, "GRU4Rec: GRU hidden size.")
    seed: int = option(42, "Seed of the initialisation, the batch order and dropout.")
    top_k: int = option(20, "Length of the ranked test lists in topk.parquet.")
    eval_batch_size: int = option(4096, "Windows per scoring batch (validation, test, probabilities).", key=False)
    device: str = option("auto", "auto | cpu | cuda.", key=False)


@dataclass
class MetricsConfig:
    rerank: str | None = None
    baseline: str | None = option(None, "Score a traditional baseline (<run>/baseline/NAME) instead of a rerank.")
    name: str | None = None
    ks: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 20])
    bootstrap: int = 1000
    seed: int = 0
    diversity_k: int = 10  # list length the diversity and entropy statistics look at


STAGE_ORDER = ("preprocess", "build-ig-index", "sft", "decode", "rerank", "metrics")
STAGE_CONFIGS: dict[str, type] = {
    "preprocess": PreprocessConfig,
    "build-ig-index": IGIndexConfig,
    "sft": SFTConfig,
    "decode": DecodeConfig,
    "rerank": RerankConfig,
    "metrics": MetricsConfig,
    "baseline": BaselineConfig,
}


@dataclass
class PipelineConfig:
    run_dir: str | None = None
    stages: list[str] = field(default_factory=lambda: list(STAGE_ORDER))
    sections: dict[str, Any] = field(default_factory=dict)  # stage name -> its config dataclass

    def stage_config(self, stage: str):
        return self.sections.get(stage) or STAGE_CONFIGS[stage]()


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Light type check/coercion of YAML values against dataclass field types."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"list": list, "dict": dict})  # noqa: S307 - our own annotations
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if not isinstance(value, list):
            value = [v.strip() for v in str(value).split(",") if v.strip()]
        return [_coerce(v, args[0], where) for v in value] if args else value
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1", "on"):
                    return True
                if value.lower() in ("false", "no", "0", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if annotation in (int, float, str):
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return annotation(value)
    except (TypeError, ValueError) as exc:
        raise IgdrecError(f"{where}: expected {annotation.__name__}, got {value!r}") from exc
    return value


def build(cls: type, values: dict[str, Any], where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise IgdrecError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})


def override(config, **options):
    """Return a copy of `config` with every option that is not None applied (CLI flags win over YAML)."""
    changes = {k: v for k, v in options.items() if v is not None}
    return dataclasses.replace(config, **changes)


def load_pipeline(path: str | Path) -> PipelineConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise IgdrecError(f"{path}: config file not found") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise IgdrecError(f"{path}:{line} is not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    if not isinstance(raw, dict):
        raise IgdrecError(f"{path}: top level must be a mapping of stage sections")
    stages = raw.pop("stages", list(STAGE_ORDER))
    for stage in stages:
        if stage not in STAGE_CONFIGS:
            raise IgdrecError(f"{path}: unknown stage {stage!r} in `stages`; known: {', '.join(STAGE_ORDER)}")
    run_dir = raw.pop("run_dir", None)
    sections = {}
    for key, values in raw.items():
        stage = key.replace("_", "-")
        if stage not in STAGE_CONFIGS:
            raise IgdrecError(f"{path}: unknown section {key!r}; known: {', '.join(STAGE_ORDER)}, run_dir, stages")
        sections[stage] = build(STAGE_CONFIGS[stage], values or {}, f"{path}:{key}")
    return PipelineConfig(run_dir=run_dir, stages=list(stages), sections=sections)


def load_stage_config(stage: str, path: str | Path | None):
    if path is None:
        return STAGE_CONFIGS[stage]()
    return load_pipeline(path).stage_config(stage)

