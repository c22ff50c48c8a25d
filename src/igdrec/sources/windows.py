"""Sliding windows over user sequences and the global temporal 80/10/10 split (docs/method.md §2.1)."""

from __future__ import annotations

import polars as pl

from igdrec import schema
from igdrec.errors import IgdrecError

SPLITS = ("train", "valid", "test")
TRAIN_SHARE = 0.8
TRAIN_VALID_SHARE = 0.9


def build_windows(interactions: pl.DataFrame, history_len: int) -> pl.DataFrame:
    """One window per interaction after a user's first: the ≤ `history_len` items before it, oldest first.

    `interactions` has user_id, item_id, timestamp, in input order. Within a user, interactions are
    ordered by timestamp with ties in input order. The result is sorted by target timestamp; windows
    with equal timestamps keep the order users first appear in the input, then their position — i.e.
    a stable sort of the per-user window lists, as the reference pipeline does. A `history_len` longer
    than every user's sequence keeps whole pasts.
    """
    history_len = min(history_len, max(interactions.height, 1))  # no history is longer; keeps offsets in range
    ordered = (
        interactions.select("user_id", "item_id", "timestamp")
        .with_row_index("input_row")
        .with_columns(pl.col("input_row").min().over("user_id").alias("user_rank"))
        .sort("user_rank", "timestamp", "input_row")
        .with_row_index("order")
        .with_columns(pl.col("order").cast(pl.Int64), pl.int_range(pl.len()).over("user_rank").alias("position"))
    )
    # A user's rows are consecutive in `order`, so the history of row t is the user's rows t-L .. t-1: a
    # rolling window, whose cost is the size of the histories it returns, whatever history_len is.
    histories = ordered.rolling(
        "order", period=f"{history_len}i", offset=f"-{history_len + 1}i", closed="right", group_by="user_rank"
    ).agg(pl.col("item_id").alias("history_item_ids"))
    return (
        ordered.join(histories, on=["user_rank", "order"], how="left", maintain_order="left")
        .filter(pl.col("position") >= 1)
        .sort("timestamp", "user_rank", "position")
        .select("user_id", "history_item_ids", "item_id", "timestamp")
    )


def temporal_split(windows: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Train = the first int(0.8·N) windows in time order, valid = up to int(0.9·N), test = the rest."""
    n = windows.height
    bounds = _bounds(n)
    return {split: number_samples(windows.slice(bounds[i], bounds[i + 1] - bounds[i])) for i, split in enumerate(SPLITS)}


def smallest_splittable() -> int:
    """The fewest samples whose temporal split leaves no split empty."""
    n = 1
    while any(b - a < 1 for a, b in zip(_bounds(n), _bounds(n)[1:])):
        n += 1
    return n


def require_nonempty_splits(splits: dict[str, pl.DataFrame], origin: str, given: bool) -> None:
    """Refuse splits with an empty member now: an empty valid set would only fail at `sft`, two stages on.

    `origin` names the input (source or file); `given` says the splits came ready-made (d3-csv) rather
    than from the temporal split of windows.
    """
    empty = [split for split in SPLITS if splits[split].height == 0]
    if not empty:
        return
    if given:
        raise IgdrecError(f"{origin}: {' and '.join(f'--{split}' for split in empty)} holds no samples; every split needs at least one")
    total = sum(splits[split].height for split in SPLITS)
    raise IgdrecError(
        f"{origin}: the temporal 80/10/10 split of {total} sample(s) leaves {' and '.join(empty)} empty; "
        f"at least {smallest_splittable()} are needed (one per interaction after a user's first)"
    )


def _bounds(n: int) -> list[int]:
    return [0, int(n * TRAIN_SHARE), int(n * TRAIN_VALID_SHARE), n]


def number_samples(samples: pl.DataFrame) -> pl.DataFrame:
    """Give a split its sample_id 0..len-1 in row order and the samples schema."""
    return schema.conform(samples.with_row_index("sample_id").with_columns(pl.col("sample_id").cast(pl.Int64)), "samples")
