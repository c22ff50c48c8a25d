"""The stage configs: one dataclass per stage, every field declared once with `options.option()`.

A config's docstring is the help of its stage's command; its fields are the command's options, the keys of
its YAML section and (key=True fields) its cache key, all derived by the option machinery (`options.py`).
`check_fields` holds a config's rules that involve several fields.

A YAML config has one section per stage plus `run_dir` and `stages` (the stages `igdrec run` executes,
in order; default: those with a section, in pipeline order). A stage command loads its section (from
`--config`, if given) and then applies the options the user passed explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from igdrec.errors import IgdrecError
from igdrec.options import build, option, read_yaml, suggestion

EMBEDDED_MODEL = "smollm2-135m"


# ---------------------------------------------------------------------------------------------------
# Stage configs. A docstring is the help of the stage's command. `check_fields` (optional) holds the
# rules that involve several fields (or more than `option()` can say); `options.check` runs it.

# The word lists of the options, written here only: the libraries import them from this module (which
# stays free of torch and polars, so `igdrec --help` loads neither); tests/repo/test_written_once.py.
SOURCES = ("ml-100k", "recbole", "amazon2018", "amazon2023", "d3-csv", "interactions")  # module igdrec.sources.<name without '-'>
WEIGHTINGS = ("plain", "pos", "cft", "igd", "msl", "msl-igd")
# MSL (docs/method.md §5.1): the softmax of every target position over its trie-valid next tokens only;
# msl-igd adds IGD's β on the zero-IG tokens. Both need the IG index (its trie), as IGD does.
MSL_WEIGHTINGS = ("msl", "msl-igd")
PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16")
LR_SCHEDULES = ("cosine", "linear")
BASELINE_MODELS = ("sasrec", "gru4rec", "pop")
# --report-to backends (igdrec.tracking). MLflow is not offered: no environment here has it to test against.
TRACKERS = ("none", "tensorboard", "wandb")
_AMAZON = {"source": ("amazon2018", "amazon2023")}
_RECBOLE = {"source": "recbole"}
_D3 = {"source": "d3-csv"}
_INTERACTIONS = {"source": "interactions"}
# metrics' long-tail cut: results cached before --head-share existed were keyed without it, so the key holds
# it only when it differs from this default (and such a result shows the popularity numbers as missing)
HEAD_SHARE = 0.2
_OWN_IDS = {"source": ("interactions", "recbole")}  # sources that read the user's own id and title files
# Seeds reach numpy, Python's random and torch; numpy's legacy seeding, the narrowest, takes [0, 2**32 - 1].
SEED_MAX = 2**32 - 1
# Where a stage runs; whether the machine has it is checked when the device is opened (modeling.pick_device).
DEVICES, CUDA_INDEX = ("auto", "cpu", "cuda", "mps"), (r"cuda:\d+", "cuda:N")


def _device_option(help: str = "auto, cpu, cuda, cuda:N or mps."):
    return option("auto", help, key=False, choices=DEVICES, pattern=CUDA_INDEX)


def _report_to_option():
    return option(factory=lambda: ["none"], key=False, choices=TRACKERS, as_set=True, help=(
        "Experiment tracking: log the curves and results to tensorboard and/or wandb (comma-separated or repeated; "
        "logs under <run>/tracking/STAGE-NAME/), or none."))


def _check_report_to(backends: list[str]) -> None:
    if "none" in backends and len(backends) > 1:
        raise IgdrecError(f"--report-to {','.join(backends)}: none means no tracking; give it alone or drop it")


@dataclass
class PreprocessConfig:
    """Turn a dataset into items.parquet and temporally split train/valid/test windows (<run>/data)."""

    source: str = option("ml-100k", "Dataset format.", choices=SOURCES)
    history_len: int = option(10, "Most recent items in a history.", min=1, only=lambda c: c.source != "d3-csv")
    category_word: str | None = option(None, "Word for the items in the prompt (default per dataset, e.g. movies).")
    # Refuses, never alters, so the artifacts of a run that passes do not depend on it: not in the key.
    max_title_chars: int = option(
        500, "Refuse item titles longer than this many characters (a title is both a prompt part and a decoding target).",
        key=False, min=1,
    )
    # recbole: RecBole's own field names (USER_ID_FIELD, ITEM_ID_FIELD, TIME_FIELD defaults) and those of its
    # MovieLens files (ml-100k, ml-1m, ml-10m, ml-20m), so that its most used data sets need no field option
    dataset_dir: str | None = option(None, "RecBole dataset folder with the atomic files NAME.inter and NAME.item.", input=True, only=_RECBOLE)
    dataset_name: str | None = option(None, "RecBole dataset name NAME (default: the folder's name).", input=True, only=_RECBOLE)
    user_field: str = option("user_id", "User id field of the .inter file.", only=_RECBOLE)
    item_field: str = option("item_id", "Item id field of the .inter and .item files.", only=_RECBOLE)
    time_field: str = option("timestamp", "Timestamp field of the .inter file.", only=_RECBOLE)
    title_field: str = option("movie_title", "Title field of the .item file (e.g. title for RecBole's Amazon sets).", only=_RECBOLE)
    year_field: str | None = option(
        "release_year", "Field of the .item file whose 4-digit year is appended as 'Title (1995)'; none: no year.", only=_RECBOLE,
    )
    # amazon2018, amazon2023
    reviews: str | None = option(None, "Reviews JSON lines ({Category}.json[.gz]; 2023: {Category}.jsonl[.gz]).", input=True, only=_AMAZON)
    meta: str | None = option(None, "Metadata JSON lines (meta_{Category}.json[.gz]; 2023: .jsonl[.gz]).", input=True, only=_AMAZON)
    category: str | None = option(None, "Category name, e.g. Video_Games.", only=_AMAZON)
    start: str = option("2017-10-01", "Window start date (UTC, inclusive).", only=_AMAZON)
    end: str = option("2018-11-01", "Window end date (UTC, inclusive).", only=_AMAZON)
    k_core: int = option(5, "Iterative K-core on users and items.", min=1, only=_AMAZON)
    min_items: int = option(10000, "Extend the window a year back while fewer items remain.", min=0, only=_AMAZON)
    earliest_year: int = option(1996, "Extend the window back no further than this year.", min=1970, only=_AMAZON)
    seed: int = option(42, "Item-id shuffle seed.", min=0, max=SEED_MAX, only=_AMAZON)
    # d3-csv
    train: str | None = option(None, "Train CSV.", input=True, only=_D3)
    valid: str | None = option(None, "Valid CSV.", input=True, only=_D3)
    test: str | None = option(None, "Test CSV.", input=True, only=_D3)
    info: str | None = option(None, "Info file (title<TAB>id per line).", input=True, only=_D3)
    # interactions
    interactions: str | None = option(None, "CSV or Parquet of user, item, timestamp.", input=True, only=_INTERACTIONS)
    items: str | None = option(None, "CSV or Parquet of item, title.", input=True, only=_INTERACTIONS)
    user_col: str = option("user_id", "User column.", only=_INTERACTIONS)
    item_col: str = option("item_id", "Item column.", only=_INTERACTIONS)
    time_col: str = option("timestamp", "Timestamp column.", only=_INTERACTIONS)
    title_col: str = option("title", "Title column.", only=_INTERACTIONS)
    drop_unknown: bool = option(False, "Drop interactions whose item has no title (default: error).", only=_OWN_IDS)
    drop_missing: bool = option(
        False, "Drop interactions and items whose user or item id is missing: empty, null or NaN (default: error); "
        "the statistics count them.", only=_OWN_IDS,
    )


@dataclass
class IGIndexConfig:
    """Build the catalog trie with entropy and information gain per token (<run>/ig)."""

    model: str = option(EMBEDDED_MODEL, "Model whose tokenizer defines the item tokens (only the tokenizer is used).")
    reference: str = option("train", "Reference distribution: train (target frequencies) or uniform.", choices=("train", "uniform"))
    smoothing: float = option(0.0, "Additive smoothing of the reference counts.", min=0.0)
    catalog: str = option("all", "Catalog: all items, or train (items seen as a training target).", choices=("all", "train"))


@dataclass
class SFTConfig:
    """Fine-tune the LLM on next-item titles with plain, Pos, CFT, IGD or MSL objectives (<run>/sft/NAME)."""

    weighting: str = option("igd", "Token weighting and loss (docs/method.md §5): plain, pos, cft, igd; msl = the "
                                   "masked softmax loss (trie-valid tokens only, adaptive temperature; §5.1), msl-igd "
                                   "= msl with igd's β on zero-IG tokens.", choices=WEIGHTINGS)
    beta: float = option(0.1, "Means two things by --weighting: igd, msl-igd = the weight of zero-IG target tokens "
                              "(w_t, docs/method.md §5); pos and cft = the weight of the last target token.",
                         min=0.0, max=1.0, only=lambda c: c.weighting not in ("plain", "msl"))
    # Named apart from decode's --alpha (IGD's decoding calibration); cached results key it as "alpha".
    cft_alpha: float = option(0.0, "CFT: weight α of the causal loss term (docs/method.md §5); not decode's --alpha.",
                              min=0.0, only={"weighting": "cft"}, key_name="alpha", renamed_from="alpha")
    model: str = option(EMBEDDED_MODEL, "smollm2-135m, a Hugging Face id or a local directory.")
    name: str | None = option(None, "Name of this fine-tune (default from weighting and parameters).", key=False, artifact=True)
    sample: int | None = option(None, "Train on a seeded random subset of N training samples (default: all).", min=1)
    valid_sample: int | None = option(256, "Validate on a seeded subset of N valid samples (none: all, 0: no validation).", min=0)
    epochs: int = option(3, "Epochs.", min=1)
    max_steps: int | None = option(None, "Stop after N optimiser steps.", min=1)
    lr: float = option(1e-4, "Peak learning rate.", gt=0.0)
    batch_size: int = option(128, "Effective batch size (samples per optimiser step).", min=1)
    micro_batch_size: int = option(4, "Samples per forward pass.", min=1)
    cutoff_len: int = option(512, "Most tokens of prompt + target.", min=1)
    warmup_steps: int = option(20, "Linear warm-up steps, capped at a tenth of the planned steps.", min=0)
    # cosine stays the default so that earlier fine-tunes (and the demo's loss curve) are unchanged; the paper's
    # configs run linear, the schedule the reference's Trainer used (docs/method.md §5).
    lr_schedule: str = option(
        "cosine", "After the warm-up: cosine decay to --min-lr-ratio × lr, or linear decay to 0 (the HF Trainer "
        "default, as the reference ran).", choices=LR_SCHEDULES)
    min_lr_ratio: float = option(0.1, "Floor of the cosine decay, as a share of the peak learning rate.", min=0.0, max=1.0,
                                 only={"lr_schedule": "cosine"})
    weight_decay: float = option(0.0, "AdamW weight decay.", min=0.0)
    max_grad_norm: float = option(1.0, "Gradient clipping norm, as the reference (HF Trainer default); 0 = off.", min=0.0)
    seed: int = option(42, "Seed of the sample subsets, the data order and the LoRA initialisation.", min=0, max=SEED_MAX)
    lora: bool = option(True, "LoRA adapters, or full fine-tuning.", flags="--lora/--full")
    lora_r: int = option(8, "LoRA rank.", min=1, only={"lora": True})
    lora_alpha: int = option(16, "LoRA alpha.", min=1, only={"lora": True})
    # p = 1 would zero every adapter input: the adapters would never move from their initialisation.
    lora_dropout: float = option(0.05, "LoRA dropout.", min=0.0, lt=1.0, only={"lora": True})
    lora_target_modules: list[str] = option(
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        help="Comma-separated LoRA target modules (default: all linear layers).", only={"lora": True},
    )
    patience: int = option(1, "Early stopping: validations without improvement before stopping.", min=1)
    log_every: int = option(1, "Optimiser steps between training-log rows.", min=1, key=False)
    save_every: int = option(50, "Optimiser steps between resumable checkpoints (0 = none).", min=0, key=False)
    resume: bool = option(False, "Continue from the last checkpoint of an interrupted run.", key=False)
    device: str = _device_option()
    ig_group_threshold: float | None = option(
        None, "IG above which a positive-IG target token counts as high IG in the CE-by-group logs "
        "(default: the median positive IG of the training targets used; docs/method.md §5).", gt=0.0)
    precision: str = option(
        "auto", "auto = fp32 weights under bf16 autocast on CUDA (fp16 without bf16 support), fp32 on CPU; "
        "bf16 = pure bf16 weights and optimiser state, as the reference trains.", choices=PRECISIONS)
    length_grouping: bool = option(
        True, "Sort each effective batch by length before splitting it into micro-batches (less padding; "
        "the same gradient up to float rounding, but LoRA dropout masks fall on other rows).",
        flags="--grouping/--no-grouping")
    share_prefix: bool = option(
        True, "Compute the prompt prefix common to a micro-batch once (exact; used only when no dropout is active).",
        key=False)
    compile: bool = option(False, "torch.compile the decoder blocks (pays off on GPU for long runs).", key=False)
    report_to: list[str] = _report_to_option()

    def check_fields(self) -> None:
        _check_report_to(self.report_to)
        if self.cft_alpha != 0.0 and self.weighting != "cft":
            raise IgdrecError(f"--cft-alpha {self.cft_alpha}: only the cft weighting has a causal loss (use --weighting cft)")


@dataclass
class DecodeConfig:
    """Constrained, IG-calibrated beam search over the catalog (<run>/decode/NAME)."""

    sft: str | None = option(None, "Name of a fine-tune in this run directory.", artifact=True)
    model: str | None = option(None, "Decode with an un-fine-tuned model instead of --sft.")
    name: str | None = option(None, "Name of this decode (default from the model and parameters).", key=False, artifact=True)
    split: str = option("test", "Split to decode.", choices=("test", "valid"))
    limit: int | None = option(None, "Decode only the first N samples in sample_id order.", min=1)
    num_beams: int = option(10, "Beams = items returned per sample.", min=1)
    # At most 10: L^lp stays finite in float32 for hypotheses of up to 7,079 tokens (docs/method.md §6.2).
    length_penalty: float = option(1.0, "Final score S / L^lp: 1.0 = BIGRec, 0.0 = D3 (docs/method.md §6.2).", min=0.0, max=10.0)
    alpha: float = option(0.0, "IGD decoding calibration w_d = 1 - alpha * IG~ (0 = off); must stay in [0, 1] so "
                               "step scores stay ≤ 0 (docs/method.md §6).", min=0.0, max=1.0)
    batch_size: str | int = option(
        "auto", "Samples per batch (each with num_beams beams), or auto: 8 on CPU (measured fastest on 2 cores), "
        "on CUDA the most that fit into free memory.", key=False,
    )
    shard_size: int = option(64, "Samples per resumable shard.", min=1)
    jump_forward: bool = option(True, "Feed forced token chains in one forward pass (same results; CPU decodes, "
                                      "whose passes change shape: docs/method.md §6.1).", key=False)
    jump_fill: float = option(1.0, "Least share of real (not pad) tokens in a jump-forward pass.",
                              gt=0.0, max=1.0, key=False)
    cutoff_len: int = option(512, "Most prompt tokens (the oldest history items are cut first).", min=1)
    device: str = _device_option()
    compile: bool = option(False, "torch.compile the model for the search's steps (static shapes; same results; "
                                  "pays a compilation up front, for long decodes on a GPU).", key=False)
    constrained: bool = option(True, "Constrain beams to catalog titles, or generate freely (then rerank --grounding).",
                               flags="--constrained/--unconstrained")
    max_new_tokens: int | None = option(None, "Unconstrained: most tokens generated (default: the longest catalog title).", min=1)
    # Off: the step log-probabilities are normalised over the whole vocabulary, as `generate` with a masking
    # processor does; inert (out of the key) when off, so earlier decodes stay cached.
    constrained_softmax: bool = option(
        False, "Normalise each step's probabilities over the allowed trie children before scoring, the softmax an MSL "
        "fine-tune was trained with (docs/method.md §6.8).", only=lambda c: c.constrained_softmax)
    tfa: str | None = option(None, "D3 text-free assistant inside the search: a baseline of this run (<run>/baseline/NAME); "
                                   "docs/method.md §6.4.", artifact=True)
    tfa_guidance: float = option(
        0.5, "D3 guidance g in g * (llm - tfa) + tfa = g * llm + (1 - g) * tfa: 0 = the assistant alone; 1 would "
        "cancel the assistant, so it is refused (docs/method.md §6.4).", min=0.0, max=1.0,
        only=lambda c: c.tfa is not None)

    def check_fields(self) -> None:
        parse_batch_size(self.batch_size)
        if self.constrained_softmax and not self.constrained:
            raise IgdrecError("--constrained-softmax normalises over the trie's children: it needs a constrained search "
                              "(drop --unconstrained)")
        if self.tfa is not None and not self.constrained:
            raise IgdrecError("--tfa scores catalog items: it needs a constrained search (drop --unconstrained)")
        if self.tfa is not None and self.tfa_guidance == 1.0:
            raise IgdrecError(f"--tfa-guidance 1 with --tfa {self.tfa}: g * (llm - tfa) + tfa = llm, the assistant would "
                              "change nothing; choose g in [0, 1)")


@dataclass
class SearchErrorsConfig:
    """Search errors of a decode: its ground truths scored teacher-forced with the decode's own step scores, each
    sample a hit, a search error or a model error (docs/method.md §6.8; <run>/search-errors/DECODE)."""

    decode: str | None = option(None, "Name of a (constrained) decode in this run directory.", artifact=True)
    batch_size: str | int = option("auto", "Sequences per forward pass (about two per sample), or auto as decode's.", key=False)
    device: str = _device_option()

    def check_fields(self) -> None:
        parse_batch_size(self.batch_size)


@dataclass
class RerankConfig:
    """Turn beams into the final deduplicated top-K per sample (<run>/rerank/NAME)."""

    decode: str | None = option(None, "Name of a decode in this run directory.", artifact=True)
    name: str | None = option(None, "Name of this rerank (default: the decode's name + options).", key=False, artifact=True)
    top_k: int = option(20, "Items kept per sample.", min=1)
    grounding: bool = option(
        False,
        "BIGRec grounding: embed each sample's top-1 generation and rank every catalog title by L2 distance "
        "(for unconstrained decodes; docs/method.md §6.5).",
    )
    grounding_model: str | None = option(
        None, "Model that embeds texts for --grounding (default: the fine-tune's base model, or the decode's --model).",
        only={"grounding": True},
    )
    grounding_batch_size: int = option(32, "Texts per forward pass when embedding for --grounding.", key=False, min=1)
    device: str = _device_option("The grounding model's device: auto, cpu, cuda, cuda:N or mps.")

    def check_fields(self) -> None:
        if self.grounding_model and not self.grounding:
            raise IgdrecError(f"--grounding-model {self.grounding_model}: only used with --grounding")


@dataclass
class BaselineConfig:
    """Train a traditional sequential recommender on the same windows and rank all items (<run>/baseline/NAME)."""

    model: str = option("sasrec", "Traditional recommender (pop = most popular training target; docs/method.md §7.4).",
                        choices=BASELINE_MODELS)
    name: str | None = option(None, "Name of the result under <run>/baseline/ (default: the model).", key=False, artifact=True)
    epochs: int = option(300, "Most training epochs (early stopping usually ends sooner).", min=1)
    lr: float = option(1e-3, "Adam learning rate.", gt=0.0)
    batch_size: int = option(2048, "Training windows per optimiser step.", min=1)
    patience: int = option(10, "Stop after this many more epochs without a better valid NDCG@10 (RecBole's stopping_step).", min=0)
    hidden_size: int = option(64, "SASRec: hidden size (= item embedding size); GRU4Rec: item embedding size.", min=1)
    n_layers: int | None = option(None, "Transformer layers (SASRec, default 2) or GRU layers (GRU4Rec, default 1).", min=1)
    n_heads: int = option(2, "SASRec: attention heads.", min=1)
    inner_size: int = option(256, "SASRec: feed-forward inner size.", min=1)
    dropout: float | None = option(None, "Hidden dropout (SASRec, default 0.5) or dropout on the item embeddings (GRU4Rec, default 0.3).", min=0.0, max=0.99)
    attn_dropout: float = option(0.5, "SASRec: dropout on the attention probabilities.", min=0.0, max=0.99)
    gru_hidden_size: int = option(128, "GRU4Rec: GRU hidden size.", min=1)
    seed: int = option(42, "Seed of the initialisation, the batch order and dropout.", min=0, max=SEED_MAX)
    top_k: int = option(20, "Length of the ranked test lists in topk.parquet.", min=1)
    eval_batch_size: int = option(4096, "Windows per scoring batch (validation, test).", key=False, min=1)
    device: str = _device_option()
    report_to: list[str] = _report_to_option()

    def check_fields(self) -> None:
        _check_report_to(self.report_to)
        if self.model == "sasrec" and self.hidden_size % self.n_heads:
            raise IgdrecError(f"--hidden-size {self.hidden_size}: must be a multiple of --n-heads {self.n_heads}")


def parse_batch_size(value) -> int | None:
    """Decode's --batch-size as a number of samples, or None for "auto"."""
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise IgdrecError(f"--batch-size {value!r}: expected a positive integer or auto")


@dataclass
class MetricsConfig:
    """NDCG@K, HR@K, diversity, popularity and per-step entropy of a rerank (<run>/metrics/NAME.json).

    `igdrec metrics --compare A B` compares two results with paired-bootstrap 95% intervals.
    """

    rerank: str | None = option(None, "Name of a rerank in this run directory.", artifact=True)
    baseline: str | None = option(None, "Score a traditional baseline (<run>/baseline/NAME) instead of a rerank.", artifact=True)
    name: str | None = option(None, "Name of the metrics result (default: the rerank's or baseline's name).", key=False, artifact=True)
    ks: list[int] = option(factory=lambda: [1, 3, 5, 10, 20], help="Comma-separated cut-offs K (sorted, repeats dropped; "
                           "those beyond the list length are dropped too).", min=1, as_set=True)
    diversity_k: int = option(10, "List length the diversity, popularity and entropy statistics look at.", min=1)
    head_share: float = option(HEAD_SHARE, "Share of the catalog's items, the most frequent as training "
                               "targets, that form the head; the others are the long tail (docs/method.md §7.2).", min=0.0, max=1.0,
                               only=lambda c: c.head_share != HEAD_SHARE)
    limit: int | None = option(None, "Score only the first N samples of the split in sample_id order (e.g. a baseline "
                                     "beside a --limit'ed decode, so both are scored on the same samples).", min=1)
    bootstrap: int = option(1000, "Paired bootstrap resamples of --compare.", min=1, key=False)
    seed: int = option(0, "Seed of the --compare bootstrap.", key=False, min=0, max=SEED_MAX)
    report_to: list[str] = _report_to_option()

    def check_fields(self) -> None:
        _check_report_to(self.report_to)
        if self.rerank is not None and self.baseline is not None:
            raise IgdrecError(f"--rerank {self.rerank} and --baseline {self.baseline}: score one of them at a time")


STAGE_CONFIGS: dict[str, type] = {
    "preprocess": PreprocessConfig,
    "build-ig-index": IGIndexConfig,
    "baseline": BaselineConfig,
    "sft": SFTConfig,
    "decode": DecodeConfig,
    "search-errors": SearchErrorsConfig,
    "rerank": RerankConfig,
    "metrics": MetricsConfig,
}
STAGE_ORDER = tuple(STAGE_CONFIGS)  # pipeline order

# ---------------------------------------------------------------------------------------------------
# YAML


@dataclass
class PipelineConfig:
    run_dir: str | None = None
    stages: list[str] = field(default_factory=list)  # what `igdrec run` executes, in order
    sections: dict[str, Any] = field(default_factory=dict)  # stage name -> its config dataclass

    def stage_config(self, stage: str):
        return self.sections.get(stage) or STAGE_CONFIGS[stage]()


def load_pipeline(path: str | Path) -> PipelineConfig:
    path = Path(path)
    raw = read_yaml(path)
    if raw is None or raw == {}:
        raise IgdrecError(f"{path}: empty config; give a section per stage (e.g. `sft:`) and/or `stages: [...]`")
    if not isinstance(raw, dict):
        raise IgdrecError(f"{path}: top level must be a mapping of stage sections, got {type(raw).__name__}")
    raw = dict(raw)
    run_dir = raw.pop("run_dir", None)
    if run_dir is not None and not isinstance(run_dir, str):
        raise IgdrecError(f"{path}:run_dir: expected a path, got {run_dir!r}")
    stages_value = raw.pop("stages", None)
    sections = {}
    for key, values in raw.items():
        stage = str(key).replace("_", "-")
        if stage not in STAGE_CONFIGS:
            known = [*STAGE_CONFIGS, "run_dir", "stages"]
            raise IgdrecError(f"{path}: unknown section {key!r}{suggestion(stage, known) or '; known: ' + ', '.join(known)}")
        if values is not None and not isinstance(values, dict):
            raise IgdrecError(f"{path}:{key}: expected a mapping of {stage} options (`key: value` lines), got {values!r}")
        sections[stage] = build(STAGE_CONFIGS[stage], values or {}, f"{path}:{key}")
    if stages_value is None:
        stages = [stage for stage in STAGE_CONFIGS if stage in sections]
    else:
        stages = _stage_list(stages_value, path)
    return PipelineConfig(run_dir=run_dir, stages=stages, sections=sections)


def _stage_list(value: Any, path: Path) -> list[str]:
    if isinstance(value, str):  # `stages: preprocess` or `stages: preprocess, sft`
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise IgdrecError(f"{path}:stages: expected a list of stage names, got {value!r}")
    for stage in value:
        if stage.replace("_", "-") not in STAGE_CONFIGS:
            hint = suggestion(stage, STAGE_CONFIGS) or "; known: " + ", ".join(STAGE_CONFIGS)
            raise IgdrecError(f"{path}: unknown stage {stage!r} in `stages`{hint}")
    stages = [stage.replace("_", "-") for stage in value]
    repeated = sorted({s for s in stages if stages.count(s) > 1})
    if repeated:
        raise IgdrecError(f"{path}:stages: {', '.join(repeated)} listed more than once")
    return stages


def load_stage_config(stage: str, path: str | Path | None):
    if path is None:
        return STAGE_CONFIGS[stage]()
    return load_pipeline(path).stage_config(stage)
