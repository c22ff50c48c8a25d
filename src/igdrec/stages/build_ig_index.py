"""Stage `build-ig-index`: the catalog trie with entropy and information gain per token (<run>/ig).

Writes the trie as flat node arrays, each item's token path, and for every sample of every split the IG
of each target token aligned with the SFT labels, so training and decoding never walk a trie in Python.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import polars as pl

from igdrec import ig, options, schema
from igdrec.config import IGIndexConfig
from igdrec.console import print_table, progress_bar
from igdrec.errors import IgdrecError
from igdrec.modeling import load_tokenizer, tokenizer_identity
from igdrec.prompt import item_token_sequences
from igdrec.rundir import RunDir, StageWriter
from igdrec.runner import StagePlan, run_stage

STAGE_DIR = "ig"
IG_RULE = "zero-mass-branches-unboosted"
SPLITS = ("train", "valid", "test")
TOKENIZE_CHUNK = 20_000  # titles per tokenizer call: big enough to batch, small enough to show progress


def run(config: IGIndexConfig, run_dir: RunDir, force: bool = False) -> dict:
    return run_stage("build-ig-index", config, run_dir, force)


def plan(config: IGIndexConfig, run_dir: RunDir) -> StagePlan:
    data = run_dir.require("data", hint="igdrec preprocess")
    tokenizer = load_tokenizer(config.model)
    # The tokenizer's identity, not only the model's name: a changed tokenizer changes every item token.
    # `ig_rule` names the normalisation rule (docs/method.md §4.1): an index built under an older rule
    # would silently calibrate decoding differently, so a rule change must miss the cache.
    params = options.key_params(config) | {"tokenizer": tokenizer_identity(tokenizer), "ig_rule": IG_RULE}
    return StagePlan("build-ig-index", run_dir, STAGE_DIR, config, params, {"data": data["fingerprint"]},
                     context={"tokenizer": tokenizer})


def compute(plan: StagePlan, out: StageWriter) -> None:
    config, run_dir, tokenizer = plan.config, plan.run, plan.context["tokenizer"]
    items_path = run_dir.artifact("data", "items.parquet")
    items = _read_items(items_path)
    targets = {split: _read_targets(run_dir.artifact("data", f"{split}.parquet"), items) for split in SPLITS}

    train_frequency = np.bincount(targets["train"]["row"].to_numpy(), minlength=items.height)
    in_catalog = np.ones(items.height, bool) if config.catalog == "all" else train_frequency > 0
    if not in_catalog.any():
        raise IgdrecError(f"{run_dir.artifact('data', 'train.parquet')}: no training targets, so --catalog train is empty")
    catalog = items.filter(pl.Series(in_catalog))
    counts = (train_frequency if config.reference == "train" else np.ones(items.height))[in_catalog] + config.smoothing
    if counts.sum() <= 0:
        raise IgdrecError(
            f"{run_dir.artifact('data', 'train.parquet')}: no training targets to take reference frequencies from; "
            "use --reference uniform or --smoothing > 0"
        )

    with progress_bar() as progress:
        flat, lengths = _tokenize_catalog(tokenizer, catalog, items_path, progress)
        steps = progress.add_task("building index", total=2 + len(SPLITS))
        trie = ig.build_catalog_trie_flat(catalog["item_id"].to_numpy(), flat, lengths, counts)
        del flat, lengths
        progress.advance(steps)
        trie.save(out.path("trie_nodes.parquet"), out.path("item_paths.parquet"))
        values = ig.item_token_values(trie)
        progress.advance(steps)
        outside = {}
        for split in SPLITS:
            frame = ig.sample_ig(values, targets[split])
            frame.write_parquet(out.path(f"sample_ig_{split}.parquet"))
            out.rows[f"sample_ig_{split}"] = frame.height
            outside[split] = int(frame["ig"].null_count())
            del frame
            progress.advance(steps)
    out.rows["trie_nodes"] = trie.num_nodes
    out.rows["item_paths"] = len(trie.item_ids)

    stats = {
        "items": items.height,
        **{split: targets[split].height for split in SPLITS},
        **ig.token_stats(trie, targets["train"]["item_id"].to_numpy()),
        "catalog_items": len(trie.item_ids),
        "nodes": trie.num_nodes,
        "depth": trie.max_depth,
        "root_entropy": float(trie.entropy[0]),
        "valid_outside_catalog": outside["valid"],
        "test_outside_catalog": outside["test"],
    }
    out.path("stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    out.stats = stats


def report(plan: StagePlan, manifest: dict, cached: bool) -> None:
    print_stats(manifest["stats"])


def _read_items(path) -> pl.DataFrame:
    items = schema.read(path, "items", columns=["item_id", "title"]).sort("item_id")
    nulls = items.filter(pl.col("item_id").is_null() | pl.col("title").is_null())
    if nulls.height:
        raise IgdrecError(f"{path}: item {nulls['item_id'][0]} has no title (or no id)")
    duplicated = items.filter(pl.col("item_id").is_duplicated())
    if duplicated.height:
        raise IgdrecError(f"{path}: item_id {duplicated['item_id'][0]} appears more than once")
    if items.height == 0:
        raise IgdrecError(f"{path}: no items")
    return items


def _read_targets(path, items: pl.DataFrame) -> pl.DataFrame:
    """sample_id, item_id and the target's row in `items` (sorted by item_id) of one split."""
    samples = schema.read(path, "samples", columns=["sample_id", "item_id"])
    ids = items["item_id"].to_numpy()
    targets = samples["item_id"].to_numpy()
    row = np.searchsorted(ids, targets)
    known = (row < len(ids)) & (ids[np.minimum(row, len(ids) - 1)] == targets)
    if samples["item_id"].null_count() or not known.all():
        bad = samples.filter(pl.col("item_id").is_null() | pl.Series(~known)).row(0, named=True)  # Expr first: polars 1.28 cannot OR a Series with an Expr
        raise IgdrecError(f"{path}: sample {bad['sample_id']}: target item {bad['item_id']} is not in items.parquet")
    return samples.with_columns(row=pl.Series(row, dtype=pl.Int64))


def _tokenize_catalog(tokenizer, catalog: pl.DataFrame, items_path, progress) -> tuple[np.ndarray, np.ndarray]:
    """Flat item token sequences (prompt.item_token_sequences, in batched chunks) and their lengths."""
    titles = catalog["title"].to_list()
    flat_chunks, length_chunks = [], []
    task = progress.add_task("tokenizing catalog", total=len(titles))
    for start in range(0, len(titles), TOKENIZE_CHUNK):
        chunk = titles[start : start + TOKENIZE_CHUNK]
        try:
            sequences = item_token_sequences(tokenizer, chunk)
        except ValueError as exc:
            raise IgdrecError(f"{items_path}: {exc}") from exc
        lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
        flat_chunks.append(np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum())))
        length_chunks.append(lengths)
        progress.advance(task, len(chunk))
    return np.concatenate(flat_chunks), np.concatenate(length_chunks)


def print_stats(stats: dict) -> None:
    """The paper's Table 4 columns plus the trie's shape, as a rich table."""
    rows = [(key, stats[key]) for key in ("items", "train", "valid", "test", "tokens", "zero_ig_tokens")]
    rows.append(("zero_ig_share", f"{100 * stats['zero_ig_share']:.2f}%"))
    rows += [(key, stats[key]) for key in ("catalog_items", "nodes", "depth", "root_entropy")]
    by_position = stats["zero_ig_share_by_position"]
    shown = ", ".join(f"{100 * s:.0f}%" if s is not None else "-" for s in by_position[:12])
    rows.append(("zero_ig_share by position", shown + (", …" if len(by_position) > 12 else "")))
    print_table("IG index (paper Table 4)", rows)
