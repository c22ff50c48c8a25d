"""Stage `sft`: fine-tune the LLM to write the next item's title, with plain, Pos, CFT, IGD or MSL objectives.

Reads <run>/data (items, train, valid) and, when present, <run>/ig (per-sample zero-IG flags and IG values:
the flags are required by IGD, and MSL masks with the index's catalog trie; every scheme uses both to log the
CE of zero-, low- and high-IG target tokens, split at `ig_group_threshold`, by default the median positive IG
of the training targets used). Writes <run>/sft/<name>/: `model/` (Hugging Face format: full weights, or the
LoRA adapter naming its base model, plus the tokenizer), `train_log.parquet` and `stage.json`. Under
`torchrun --nproc_per_node=N` it trains data-parallel; only rank 0 writes.

Early stopping validates on the weighted objective of the scheme (for CFT including the causal term), the
loss the model is trained on. The cache key holds the IG index's fingerprint whenever the index is used,
for the logs of plain/Pos/CFT runs too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import torch
from rich.progress import TextColumn

from igdrec import checkpoints, distributed, flops, options, schema, tracking, training
from igdrec.config import MSL_WEIGHTINGS, SFTConfig
from igdrec.console import console, err_console, print_table, progress_bar
from igdrec.dropout import use_gap_dropout
from igdrec.errors import IgdrecError
from igdrec.fused_lora import use_fused_lora
from igdrec.ig import CatalogTrie
from igdrec.modeling import load_model, load_tokenizer, require_same_tokenizer, resolve_model_path
from igdrec.precision import Precision, resolve_precision
from igdrec.prompt import item_token_sequences
from igdrec.rundir import RunDir, StageWriter
from igdrec.runner import StagePlan, run_stage
from igdrec.sft_data import SFTExamples

def default_name(config: SFTConfig) -> str:
    if config.weighting in ("plain", "msl"):
        name = config.weighting
    elif config.weighting == "cft":
        name = f"cft-b{config.beta:g}-a{config.cft_alpha:g}"
    else:
        name = f"{config.weighting}-b{config.beta:g}"
    if config.sample is not None:
        name += f"-s{config.sample}"
    return name


def select_rows(n: int, size: int | None, seed: int) -> np.ndarray:
    """A seeded random subset (kept in sample_id order), or everything."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def needs_ig_index(config: SFTConfig) -> bool:
    """IGD weighs by the index's zero-IG flags; MSL masks with its trie."""
    return config.weighting == "igd" or config.weighting in MSL_WEIGHTINGS


def ig_index_usable(run: RunDir, config: SFTConfig, tokenizer) -> dict | None:
    """The IG manifest if it was built with our tokenizer; IGD and MSL refuse a mismatch, other schemes skip the IG logs."""
    needed = needs_ig_index(config)
    manifest = run.require("ig", hint="igdrec build-ig-index") if needed else run.manifest("ig")
    if manifest is None:
        return None
    try:
        require_same_tokenizer(manifest.get("params", {}).get("tokenizer", {}), tokenizer, str(run.stage_dir("ig") / "stage.json"))
    except IgdrecError as exc:
        if needed:
            raise
        err_console.print(f"[yellow]note:[/] {exc}; zero-IG/positive-IG losses will not be logged")
        return None
    return manifest


def load_sample_ig(path: Path, sample_ids: np.ndarray, item_ids: np.ndarray, lengths: np.ndarray, allow_outside: bool) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
    """Zero-IG flags and IG values of the given samples' target tokens, checked against their target item
    and its token count.

    The index has null lists for targets outside its catalog (`--catalog train`); with `allow_outside`
    (validation) such a sample gets None (unknown flags), otherwise it is an error.
    """
    if not path.exists():
        raise IgdrecError(f"{path}: missing from the IG index; rebuild it with `igdrec build-ig-index --force`")
    ig = schema.read(path, "sample_ig").select("sample_id", pl.col("item_id").alias("ig_item_id"), "zero_ig", "ig")
    wanted = pl.DataFrame({"sample_id": sample_ids, "item_id": item_ids, "n": lengths[item_ids]})
    joined = wanted.join(ig, on="sample_id", how="left", maintain_order="left")
    missing = joined.filter(pl.col("ig_item_id").is_null())
    if missing.height:
        raise IgdrecError(f"{path}: sample_id {missing['sample_id'][0]}: no IG entry ({missing.height} samples lack one)")
    wrong_item = joined.filter(pl.col("ig_item_id") != pl.col("item_id"))
    if wrong_item.height:
        r = wrong_item.row(0, named=True)
        raise IgdrecError(f"{path}: sample_id {r['sample_id']}: IG entry is for item {r['ig_item_id']}, the sample's target is {r['item_id']}")
    outside = joined.filter(pl.col("zero_ig").is_null())
    if outside.height and not allow_outside:
        raise IgdrecError(
            f"{path}: sample_id {outside['sample_id'][0]}: target item {outside['item_id'][0]} is outside the IG catalog "
            f"({outside.height} samples); rebuild the index with `--catalog all`"
        )
    wrong_len = joined.filter(pl.col("zero_ig").list.len() != pl.col("n"))
    if wrong_len.height:
        r = wrong_len.row(0, named=True)
        raise IgdrecError(
            f"{path}: sample_id {r['sample_id']}: {len(r['zero_ig'])} IG values for a target of {r['n']} tokens; "
            "the index was built with another tokenization"
        )
    flags = [None if f is None else np.asarray(f, dtype=bool) for f in joined["zero_ig"].to_list()]
    values = [None if v is None else np.asarray(v, dtype=np.float64) for v in joined["ig"].to_list()]
    return flags, values


def median_positive_ig(zero_ig: list[np.ndarray | None], ig: list[np.ndarray | None]) -> float | None:
    """The default IG-group threshold: the median IG over all positive-IG target tokens of the samples."""
    positive = [v[~z] for z, v in zip(zero_ig, ig) if z is not None]
    values = np.concatenate(positive) if positive else np.empty(0)
    return float(np.median(values)) if values.size else None


def load_trie(run: RunDir, item_seqs) -> CatalogTrie:
    """MSL: the IG index's catalog trie, checked to spell every catalog item as the fine-tune tokenizes it."""
    nodes_path, items_path = run.artifact("ig", "trie_nodes.parquet"), run.artifact("ig", "item_paths.parquet")
    for path in (nodes_path, items_path):
        if not path.exists():
            raise IgdrecError(f"{path}: missing from the IG index; rebuild it with `igdrec build-ig-index --force`")
    trie = CatalogTrie.load(nodes_path, items_path)
    for row, item in enumerate(trie.item_ids.tolist()):
        spelled = trie.token[trie.item_path_nodes[trie.item_path_ptr[row]:trie.item_path_ptr[row + 1]]]
        if item >= len(item_seqs) or spelled.tolist() != list(item_seqs[item]):
            raise IgdrecError(f"{items_path}: item {item}: its trie path is not the item's tokenization here; "
                              "rebuild the index with `igdrec build-ig-index --force`")
    return trie


def target_nodes(trie: CatalogTrie, item_ids: np.ndarray) -> list[np.ndarray | None]:
    """The trie nodes after each target token of every sample (None for a target outside the catalog)."""
    rows = trie.item_index(item_ids)
    ptr = trie.item_path_ptr
    return [None if r < 0 else trie.item_path_nodes[ptr[r]:ptr[r + 1]] for r in rows.tolist()]


def split_examples(run: RunDir, split: str, size: int | None, config: SFTConfig, tokenizer, titles, item_seqs, category, ig_manifest,
                   ig_group_threshold: float | None = None, trie: CatalogTrie | None = None) -> SFTExamples:
    """A seeded subset of `size` samples of the split (all if None), ready for collation. The IG-group
    threshold defaults to `config.ig_group_threshold`, else to the median positive IG of these samples."""
    samples = schema.read(run.artifact("data", f"{split}.parquet"), "samples").sort("sample_id")
    samples = samples[select_rows(samples.height, size, config.seed)]
    bad = samples.filter((pl.col("item_id") < 0) | (pl.col("item_id") >= len(titles)))
    if bad.height:
        raise IgdrecError(f"{run.artifact('data', f'{split}.parquet')}: sample_id {bad['sample_id'][0]}: target item {bad['item_id'][0]} is not in items.parquet")
    zero_ig = ig = None
    if ig_manifest is not None:
        lengths = np.array([len(s) for s in item_seqs])
        zero_ig, ig = load_sample_ig(
            run.artifact("ig", f"sample_ig_{split}.parquet"), samples["sample_id"].to_numpy(), samples["item_id"].to_numpy(),
            lengths, allow_outside=split != "train",
        )
        if ig_group_threshold is None:
            ig_group_threshold = config.ig_group_threshold if config.ig_group_threshold is not None else median_positive_ig(zero_ig, ig)
    return SFTExamples(
        tokenizer,
        histories=samples["history_item_ids"].to_list(),
        targets=samples["item_id"].to_list(),
        titles=titles,
        item_sequences=item_seqs,
        category=category,
        scheme=config.weighting,
        beta=config.beta,
        cutoff_len=config.cutoff_len,
        zero_ig=zero_ig,
        with_reference=config.weighting == "cft" and config.cft_alpha != 0.0,
        ig=ig,
        ig_group_threshold=ig_group_threshold,
        sample_ids=samples["sample_id"].to_list(),
        trie=trie,
        target_nodes=None if trie is None else target_nodes(trie, samples["item_id"].to_numpy()),
    )


def prepare_model(config: SFTConfig, device, precision: Precision | None = None):
    """The model to fine-tune, its weights (LoRA adapters included) in the precision's parameter dtype."""
    base_path = resolve_model_path(config.model)
    if (Path(base_path) / "adapter_config.json").exists():
        raise IgdrecError(f"{base_path}: is a LoRA adapter; merge it into its base model before fine-tuning it again")
    model = load_model(config.model, device)
    if config.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_target_modules), task_type="CAUSAL_LM",
        )
        torch.manual_seed(config.seed)  # LoRA's initial A matrices are random
        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:
            raise IgdrecError(f"--lora-target-modules {','.join(config.lora_target_modules)}: {exc}") from exc
        # The adapter must name the checkpoint it was trained on, so `load_model(<sft>/model)` finds it.
        model.peft_config["default"].base_model_name_or_path = base_path
        if torch.device(device).type == "cpu":
            use_gap_dropout(model)  # same dropout distribution, a fraction of the random draws (igdrec.dropout)
            use_fused_lora(model)  # same function, fewer passes over activations (igdrec.fused_lora)
    if precision is not None and precision.param_dtype != torch.float32:
        model = model.to(precision.param_dtype)
    return model


def run(config: SFTConfig, run_dir: RunDir, force: bool = False) -> dict:
    return run_stage("sft", config, run_dir, force)


def plan(config: SFTConfig, run_dir: RunDir) -> StagePlan:
    data_manifest = run_dir.require("data", hint="igdrec preprocess")
    tokenizer = load_tokenizer(config.model)
    ig_manifest = ig_index_usable(run_dir, config, tokenizer)

    name = config.name or default_name(config)
    inputs = {"data": data_manifest["fingerprint"]}
    if ig_manifest is not None:
        inputs["ig"] = ig_manifest["fingerprint"]
    context = {"name": name, "data_manifest": data_manifest, "tokenizer": tokenizer, "ig_manifest": ig_manifest}
    return StagePlan("sft", run_dir, f"sft/{name}", config, options.key_params(config), inputs, resumable=True, context=context)


def prepare(plan: StagePlan, writer: StageWriter) -> distributed.World:
    """Everything before the stage directory opens: the process group, the data, the model."""
    config, run_dir, force = plan.config, plan.run, writer.force
    name, data_manifest, tokenizer, ig_manifest = (plan.context[k] for k in ("name", "data_manifest", "tokenizer", "ig_manifest"))
    world, device = distributed.init_distributed(config.device)
    try:
        precision = resolve_precision(config.precision, device)
    except ValueError as exc:
        raise IgdrecError(f"--precision {config.precision}: {exc}") from exc
    category = data_manifest["stats"]["category_word"]
    checkpoint_dir = writer.partial_dir / "checkpoint"
    found = checkpoints.checkpoint_step(checkpoint_dir) if not force else None
    if found is not None and not config.resume:
        raise IgdrecError(
            f"{checkpoint_dir}: an interrupted run of sft/{name} left a checkpoint at step {found}; "
            "pass --resume to continue it or --force to start over"
        )
    if config.resume and world.is_main:
        console.print(f"sft/{name}: " + (f"resuming from the checkpoint at step {found}" if found is not None else "no checkpoint of these settings to resume; starting from step 0"))

    items = schema.read(run_dir.artifact("data", "items.parquet"), "items").sort("item_id")
    if items["item_id"].to_list() != list(range(items.height)):
        raise IgdrecError(f"{run_dir.artifact('data', 'items.parquet')}: item ids must be dense 0..n-1")
    titles = items["title"].to_list()
    item_seqs = item_token_sequences(tokenizer, titles)
    trie = load_trie(run_dir, item_seqs) if config.weighting in MSL_WEIGHTINGS else None
    train_data = split_examples(run_dir, "train", config.sample, config, tokenizer, titles, item_seqs, category, ig_manifest, trie=trie)
    if len(train_data) == 0:
        raise IgdrecError(f"{run_dir.artifact('data', 'train.parquet')}: no training samples")
    valid_data = None
    if config.valid_sample != 0 and run_dir.artifact("data", "valid.parquet").exists():
        # validation groups its tokens at the training threshold, so both splits' curves are comparable
        valid_data = split_examples(run_dir, "valid", config.valid_sample, config, tokenizer, titles, item_seqs, category, ig_manifest,
                                    ig_group_threshold=train_data.ig_group_threshold, trie=trie)

    model = prepare_model(config, device, precision)
    if config.compile:
        training.compile_blocks(model)
    plan.context |= {"world": world, "device": device, "precision": precision, "checkpoint_dir": checkpoint_dir,
                     "train_data": train_data, "valid_data": valid_data, "model": model}
    return world


def compute(plan: StagePlan, out: StageWriter) -> None:
    """Train on every rank (data-parallel under torchrun); rank 0 writes the model, the log and the stats."""
    config = plan.config
    name, tokenizer, ig_manifest, world, device, precision, checkpoint_dir, train_data, valid_data, model = (
        plan.context[k] for k in ("name", "tokenizer", "ig_manifest", "world", "device", "precision", "checkpoint_dir",
                                  "train_data", "valid_data", "model"))
    tracked = None  # the scalars of --report-to, on rank 0
    if world.is_main and config.report_to != [tracking.NONE]:
        tracked = training.TrackedScalars(model, world.size, flops.measure_peak_flops(device))
    with plan.tracker(main=world.is_main) as tracker, progress_bar(TextColumn("{task.fields[info]}")) as progress:
        task = progress.add_task(f"sft {name}", total=None, info="", visible=world.is_main)

        def on_step(done: training.StepDone) -> None:
            row = next((r for r in done.rows if r["split"] == "train"), None)
            info = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}" if row else progress.tasks[task].fields["info"]
            progress.update(task, completed=done.step, total=done.total_steps, info=info)
            if tracked is not None:
                tracker.log(tracked(done), done.step)

        result = training.train(model, train_data, valid_data, config, precision, device, world, checkpoint_dir, on_step=on_step)
        if world.is_main:
            save_final_model(model, tokenizer, out.path("model"))
            log = pl.DataFrame(result.log, schema_overrides={k: v for k, v in schema.TRAIN_LOG.items()}, strict=False)
            schema.conform(log, "train_log").write_parquet(out.path("train_log.parquet"))
            out.rows["train_log"] = len(result.log)
            out.stats = summary(config, result, len(train_data), 0 if valid_data is None else len(valid_data), world, device)
            out.stats["zero_ig_logged"] = ig_manifest is not None
            out.stats["ig_group_threshold"] = train_data.ig_group_threshold
            out.stats["ig_group_threshold_source"] = None if train_data.ig_group_threshold is None else ("config" if config.ig_group_threshold is not None else "median positive IG of the training targets")
            out.stats["precision"] = precision.name
            if result.msl_tau is not None:
                out.stats["msl_temperature"] = round(result.msl_tau, 6)
            out.stats.update(utilisation(model, result, device, world))
            tracker.summary(tracking.scalars(out.stats))
            shutil.rmtree(checkpoint_dir, ignore_errors=True)


def report(plan: StagePlan, manifest: dict, cached: bool) -> None:
    if not cached:
        print_table(f"sft/{plan.context['name']}", {k: v for k, v in manifest["stats"].items() if v is not None})


def save_final_model(model, tokenizer, directory: Path) -> None:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _mean(rows: list[dict], split: str, key: str) -> float | None:
    values = [r[key] for r in rows if r["split"] == split and r.get(key) is not None]
    return float(np.mean(values)) if values else None


IG_GROUP_COLUMNS = ("ce_zero_ig", "ce_low_ig", "ce_high_ig", "ce_positive_ig")


ROUNDING = {"computed_tokens_per_second": 1, "model_tflops_per_second": 2, "peak_bf16_tflops": 1, "mfu": 4}


def utilisation(model, result: training.TrainResult, device, world) -> dict:
    """Tokens the model computed per second and, on CUDA, model-FLOPs utilisation: the training FLOPs of
    `flops.model_flops` over the training seconds and the device's bf16 matmul rate (measured here)."""
    seconds = sum(r["seconds"] for r in result.log if r["split"] == "train")
    measured = flops.rates(model, result.computed_tokens, result.attention_flops, seconds, world.size, flops.measure_peak_flops(device))
    # ranks see equal shares
    return ({"computed_tokens": result.computed_tokens * world.size, "computed_tokens_per_second": None}
            | {k: round(v, ROUNDING[k]) for k, v in measured.items()})


def summary(config: SFTConfig, result: training.TrainResult, n_train: int, n_valid: int, world, device) -> dict:
    train_rows = [r for r in result.log if r["split"] == "train"]
    valid_rows = [r for r in result.log if r["split"] == "valid"]
    last_valid = valid_rows[-1] if valid_rows else {}
    seconds = sum(r["seconds"] for r in train_rows)
    return {
        "train_samples": n_train,
        "valid_samples": n_valid,
        "steps": result.steps,
        "planned_steps": result.total_steps,
        "stopped_early": result.stopped_early,
        "train_tokens": result.train_tokens,
        "train_seconds": round(seconds, 2),
        "target_tokens_per_second": round(result.train_tokens / seconds, 1) if seconds > 0 else None,
        "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
        # CE by IG group: the mean over the last tenth of the train rows, and the last validation
        **{f"train_{k}": _mean(train_rows[-max(1, len(train_rows) // 10):], "train", k) for k in IG_GROUP_COLUMNS},
        "best_valid_loss": result.best_valid_loss,
        "best_step": result.best_step,
        **{f"valid_{k}": last_valid.get(k) for k in IG_GROUP_COLUMNS},
        "world_size": world.size,
        "device": str(device),
        "save_every": config.save_every,
        "log_every": config.log_every,
    }
