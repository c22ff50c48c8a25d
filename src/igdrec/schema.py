"""Every Parquet artifact's schema, in one place. Stages write through `conform` and read through `read`."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from igdrec.errors import IgdrecError

ITEMS = {"item_id": pl.Int64, "title": pl.String}
SAMPLES = {
    "sample_id": pl.Int64,
    "user_id": pl.String,
    "history_item_ids": pl.List(pl.Int64),
    "item_id": pl.Int64,
    "timestamp": pl.Int64,
}
# IG index (build-ig-index): the catalog trie as flat arrays. Node 0 is the root; the children of a node
# are the contiguous node ids [child_start, child_start + child_count), sorted by token.
TRIE_NODES = {
    "node_id": pl.Int64,
    "parent": pl.Int64,  # -1 for the root
    "token": pl.Int64,  # token on the incoming edge, -1 for the root
    "depth": pl.Int32,  # 0 for the root; a node at depth d follows d generated tokens
    "child_start": pl.Int64,
    "child_count": pl.Int32,
    "mass": pl.Float64,  # reference probability mass of the items under the node
    "entropy": pl.Float64,  # H(node) = -sum p log p over items under it (not renormalised)
    "ig": pl.Float64,  # IG of the incoming edge: H(parent) - H(node)
    "ig_norm": pl.Float64,  # IG~: ig min-max normalised among siblings (all equal -> 0; zero-mass branches 0)
    "zero_ig": pl.Boolean,  # the incoming token is forced for every reference item under the parent
}
ITEM_PATHS = {
    "item_id": pl.Int64,
    "leaf": pl.Int64,  # node id reached after the item's EOS
    "tokens": pl.List(pl.Int64),  # item_token_sequence(title)
    "title_group": pl.Int64,  # items sharing a title share a leaf and a title_group (smallest item_id)
    "reference_count": pl.Float64,  # training-target frequency (after smoothing) behind p_r
}
SAMPLE_IG = {
    "sample_id": pl.Int64,
    "item_id": pl.Int64,
    "ig": pl.List(pl.Float64),  # one value per target token = per SFT label position, in order
    "zero_ig": pl.List(pl.Boolean),
}
BEAMS = {
    "sample_id": pl.Int64,
    "rank": pl.Int32,  # 0-based beam order
    "item_id": pl.Int64,  # smallest item id carrying the generated title
    "title": pl.String,
    "score": pl.Float64,  # final beam score S / L^lp
    "tokens": pl.List(pl.Int64),
    "step_logprobs": pl.List(pl.Float64),  # model log p of each generated token
    "prefix_entropy": pl.List(pl.Float64),  # H(prefix) of the trie node after each token
}
TOPK = {"sample_id": pl.Int64, "rank": pl.Int32, "item_id": pl.Int64, "score": pl.Float64}
TRAIN_LOG = {
    "step": pl.Int64,
    "epoch": pl.Float64,
    "split": pl.String,  # train | valid
    "loss": pl.Float64,
    "lr": pl.Float64,
    # mean CE of the target tokens in each IG group (null: no such token in the interval); low and high split
    # the positive-IG tokens at the run's `ig_group_threshold` (stage.json stats): low ≤ threshold < high
    "ce_zero_ig": pl.Float64,
    "ce_low_ig": pl.Float64,
    "ce_high_ig": pl.Float64,
    "ce_positive_ig": pl.Float64,  # low and high together
    "tokens": pl.Int64,  # target tokens (of every group, and of samples whose IG is unknown)
    "tokens_zero_ig": pl.Int64,
    "tokens_low_ig": pl.Int64,
    "tokens_high_ig": pl.Int64,
    "seconds": pl.Float64,
}
# rerank --grounding: every distinct catalog title (carried by its smallest item id) and its embedding by
# the grounding model (last-layer hidden state of the last token), cached per model under <run>/grounding/
GROUNDING_EMBEDDINGS = {"item_id": pl.Int64, "title": pl.String, "embedding": pl.List(pl.Float32)}
# metrics: per evaluated sample, the rank of the first title match (null: none), then NDCG@K / HR@K columns and
# the list's metrics.POPULARITY values (Float64, null for an empty list; absent from results made before them)
PER_SAMPLE_METRICS = {"sample_id": pl.Int64, "match_rank": pl.Int32}
# search-errors: per decoded sample, its class (hit | search_error | model_error | unreachable) and the
# teacher-forced scores S / L^lp of its ground truth (null for a hit or unreachable one) and of the K-th
# returned hypothesis (null when fewer than K came back), and the K-th's score as the decode reported it
SEARCH_ERRORS = {"sample_id": pl.Int64, "class": pl.String, "gt_score": pl.Float64, "kth_score": pl.Float64,
                 "kth_reported_score": pl.Float64}

SCHEMAS = {
    "items": ITEMS,
    "samples": SAMPLES,
    "trie_nodes": TRIE_NODES,
    "item_paths": ITEM_PATHS,
    "sample_ig": SAMPLE_IG,
    "beams": BEAMS,
    "topk": TOPK,
    "train_log": TRAIN_LOG,
    "grounding_embeddings": GROUNDING_EMBEDDINGS,
    "per_sample_metrics": PER_SAMPLE_METRICS,
    "search_errors": SEARCH_ERRORS,
}


def conform(df: pl.DataFrame, kind: str) -> pl.DataFrame:
    """Select and cast the schema's columns in order (extra columns after them are kept)."""
    schema = SCHEMAS[kind]
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise ValueError(f"{kind} frame lacks columns {missing}")
    extra = [c for c in df.columns if c not in schema]
    return df.select([pl.col(c).cast(t) for c, t in schema.items()] + extra)


def read(path: Path, kind: str, columns: list[str] | None = None) -> pl.DataFrame:
    """Read an artifact (or only `columns` of it) and check it against its schema; a mismatch names the file."""
    expected = {c: t for c, t in SCHEMAS[kind].items() if columns is None or c in columns}
    try:
        if columns is not None:
            missing = [c for c in columns if c not in pl.read_parquet_schema(path)]
            if missing:
                raise IgdrecError(f"{path}: missing column {missing[0]!r} of the {kind} schema")
        df = pl.read_parquet(path, columns=columns)
    except IgdrecError:
        raise
    except Exception as exc:  # polars raises several types for unreadable files
        raise IgdrecError(f"{path}: cannot read Parquet artifact ({exc.__class__.__name__})") from exc
    for column, dtype in expected.items():
        if column not in df.columns:
            raise IgdrecError(f"{path}: missing column {column!r} of the {kind} schema")
        if df.schema[column] != dtype:
            raise IgdrecError(f"{path}: column {column!r} is {df.schema[column]}, expected {dtype}")
    return df
