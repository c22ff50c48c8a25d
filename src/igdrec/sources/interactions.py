"""Source `interactions`: a user's own interactions file and items file (CSV or Parquet).

Also the shared assembly for every source that starts from raw interactions and a titled item list
(ml-100k uses it too): validation, unknown items, dense item ids.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from igdrec.errors import IgdrecError
from igdrec.sources import Dataset
from igdrec.sources.tables import (
    clean_titles,
    drop_missing_ids,
    file_fingerprint,
    first_true,
    parse_timestamps,
    read_table,
    record_label,
    require_file,
    require_values,
    text_values,
)


def input_files(config) -> dict[str, str]:
    return {
        "interactions": file_fingerprint(require_file(config.interactions, "--interactions")),
        "items": file_fingerprint(require_file(config.items, "--items")),
    }


def load(config) -> Dataset:
    interactions_path = require_file(config.interactions, "--interactions")
    items_path = require_file(config.items, "--items")
    user, item, time, title = config.user_col, config.item_col, config.time_col, config.title_col
    if len({user, item, time}) < 3 or item == title:
        raise IgdrecError(
            f"--user-col {user!r}, --item-col {item!r} and --time-col {time!r} must name three different columns, "
            f"and --title-col {title!r} another than --item-col"
        )
    raw = read_table(interactions_path, [user, item, time], "interactions")
    raw = raw.select(text_values(raw[user], interactions_path), text_values(raw[item], interactions_path), time)
    raw, rows, missing_interactions = drop_missing_ids(raw, [user, item], interactions_path, config.drop_missing)
    require_values(raw, time, interactions_path, "timestamp", rows)
    interactions = pl.DataFrame(
        {"user_id": raw[user], "item_key": raw[item], "timestamp": parse_timestamps(raw[time], interactions_path, rows)}
    )
    raw_items = read_table(items_path, [item, title], "items")
    raw_items = raw_items.select(text_values(raw_items[item], items_path), text_values(raw_items[title], items_path))
    raw_items, item_rows, missing_items = drop_missing_ids(raw_items, [item], items_path, config.drop_missing)
    items = pl.DataFrame({"item_key": raw_items[item], "title": raw_items[title]})
    dataset = assemble(interactions, items, interactions_path, items_path, config.drop_unknown, rows, item_rows)
    dataset.stats |= {"dropped_missing_id_interactions": missing_interactions, "dropped_missing_id_items": missing_items}
    return dataset


def assemble(
    interactions: pl.DataFrame,
    items: pl.DataFrame,
    interactions_path: Path,
    items_path: Path,
    drop_unknown: bool,
    interaction_rows: pl.Series | None = None,
    item_rows: pl.Series | None = None,
) -> Dataset:
    """Dense ids for the items that occur in `interactions`, numbered in items-file order.

    interactions: user_id, item_key, timestamp (input order is kept: it breaks timestamp ties).
    items: item_key, title, in file order. Items nobody interacted with are left out of the catalog.
    `interaction_rows`/`item_rows`: the file row of each row, where rows were dropped (see `record_label`).
    """
    require_values(items, "item_key", items_path, "item id", item_rows)
    items = items.with_columns(clean_titles(pl.col("title")))
    require_values(items, "title", items_path, "title", item_rows)
    items = _unique_items(items, items_path)

    unknown = ~interactions["item_key"].is_in(items["item_key"].implode())
    n_unknown = int(unknown.sum())
    if n_unknown and not drop_unknown:
        first = first_true(unknown)
        raise IgdrecError(
            f"{record_label(interactions_path, first, interaction_rows)}: item {interactions['item_key'][first]!r} is not in {items_path} "
            f"({n_unknown:,} interactions refer to unknown items; --drop-unknown drops them)"
        )
    interactions = interactions.filter(~unknown)
    if interactions.height == 0:
        raise IgdrecError(f"{interactions_path}: no interactions left to build samples from")

    used = items.filter(pl.col("item_key").is_in(interactions["item_key"].implode()))
    catalog = used.with_row_index("item_id").with_columns(pl.col("item_id").cast(pl.Int64))
    mapped = interactions.select(
        "user_id",
        pl.col("item_key").replace_strict(catalog["item_key"], catalog["item_id"], return_dtype=pl.Int64).alias("item_id"),
        "timestamp",
    )
    stats = {"dropped_unknown_item_interactions": n_unknown, "items_without_interactions": items.height - used.height}
    return Dataset(items=catalog.select("item_id", "title"), interactions=mapped, stats=stats)


def _unique_items(items: pl.DataFrame, items_path: Path) -> pl.DataFrame:
    """Identical repeated rows collapse to one; the same id with two different titles is an error."""
    items = items.unique(maintain_order=True)
    repeated = items["item_key"].is_duplicated()
    if repeated.any():
        key = items["item_key"][first_true(repeated)]
        titles = items.filter(pl.col("item_key") == key)["title"].to_list()
        raise IgdrecError(f"{items_path}: item {key!r} has {len(titles)} different titles: {titles[:2]!r}")
    return items
