"""Source `amazon2018`: Amazon Review Data 2018 with the reference filter (docs/method.md §2.2 steps 1-6).

1. titles: drop items without a title or with "<span id" in it; unescape &quot; and &amp;; strip
   spaces then surrounding quotes; keep titles of >1 character and ≤20 space-separated words. An
   item listed several times in the metadata is dropped if any listing fails, else keeps the last.
2. reviews in [start, end] (UTC, both ends inclusive) of items with a kept title.
3. iterative K-core on users and items until nothing changes.
4. fewer than `min_items` items left: start one year earlier and redo, down to `earliest_year`.
5. item ids: the kept items in order of first review, shuffled by Python's `random` with `seed`
   (the reference pipeline's numbering, so its info files line up with ours).
6. windows and split happen in the stage, as for every source.
Files are streamed (gzip or plain JSON lines), so multi-gigabyte dumps fit in memory.

The filter is written once, for a `Layout` (the dump's field names and clock): `amazon2023` runs it on
the Amazon Reviews 2023 layout.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import polars as pl

from igdrec.console import progress_bar
from igdrec.errors import IgdrecError
from igdrec.sources import Dataset
from igdrec.sources.tables import clean_titles, file_fingerprint, iter_json_lines, require_file

MAX_TITLE_WORDS = 20


@dataclass(frozen=True)
class Layout:
    """Where a dump keeps what the filter reads."""

    user: str  # reviewer id field of a review
    item: str  # item id field of a review and of a metadata record
    time: str  # review time field: an integer count of `ticks_per_second` since 1970 (UTC)
    ticks_per_second: int

    @property
    def review_fields(self) -> dict[str, pl.DataType]:
        return {self.user: pl.String, self.item: pl.String, self.time: pl.Int64}

    @property
    def meta_fields(self) -> dict[str, pl.DataType]:
        return {self.item: pl.String, "title": pl.String}


LAYOUT = Layout(user="reviewerID", item="asin", time="unixReviewTime", ticks_per_second=1)
REVIEW_FIELDS = LAYOUT.review_fields


def input_files(config) -> dict[str, str]:
    _check_options(config)
    return {
        "reviews": file_fingerprint(require_file(config.reviews, "--reviews")),
        "meta": file_fingerprint(require_file(config.meta, "--meta")),
    }


def load(config, layout: Layout = LAYOUT) -> Dataset:
    start, end = _check_options(config)
    meta_path = require_file(config.meta, "--meta")
    reviews_path = require_file(config.reviews, "--reviews")
    titles, meta_stats = read_titles(meta_path, layout)
    tick = layout.ticks_per_second
    earliest = _epoch(date(config.earliest_year, start.month, start.day))
    # [since, until] in the dump's ticks; the second `end` names is kept whole (to its last millisecond in 2023)
    since, until = min(earliest, _epoch(start)) * tick, _epoch(end) * tick + tick - 1
    reviews, reviews_read = read_reviews(reviews_path, titles, since, until, layout)
    if reviews.height == 0:
        raise IgdrecError(f"{reviews_path}: no reviews of titled items between {config.earliest_year} and {config.end}")

    for year in range(start.year, min(start.year, config.earliest_year) - 1, -1):
        window_start = date(year, start.month, start.day)
        may_widen = year > config.earliest_year
        in_window = reviews.filter(pl.col("time") >= _epoch(window_start) * tick)
        kept, iterations = k_core(in_window, config.k_core, stop_below=config.min_items if may_widen else 0)
        if kept["asin"].n_unique() >= config.min_items or not may_widen:
            break
    if kept.height == 0:
        raise IgdrecError(f"{reviews_path}: nothing survives the {config.k_core}-core filter from {window_start} to {config.end}")

    if tick > 1:
        # Order by the finer clock before rounding it to seconds, so reviews within one second keep their order.
        kept = kept.sort("time", maintain_order=True)
    catalog = shuffled_catalog(kept, titles, config.seed)
    interactions = kept.select(
        pl.col("user").cast(pl.String).alias("user_id"),
        pl.col("asin").cast(pl.String).replace_strict(catalog["asin"], catalog["item_id"], return_dtype=pl.Int64).alias("item_id"),
        (pl.col("time") // tick).alias("timestamp"),
    )
    stats = meta_stats | {
        "category": config.category,
        "reviews_read": reviews_read,
        "reviews_of_titled_items_since_earliest_year": reviews.height,
        "window": f"{window_start} .. {end}",
        "window_years_extended": start.year - year,
        "k_core_iterations": iterations,
    }
    return Dataset(items=catalog.select("item_id", "title"), interactions=interactions, stats=stats)


def read_titles(path: Path, layout: Layout = LAYOUT) -> tuple[pl.DataFrame, dict]:
    """asin -> cleaned title for the items whose every metadata record passes the title filter."""
    parts = []
    with progress_bar() as progress:
        task = progress.add_task(f"reading {path.name}", total=path.stat().st_size)
        for chunk, done in iter_json_lines(path, layout.meta_fields, required=(layout.item,)):
            parts.append(chunk.rename({layout.item: "asin"}))
            progress.update(task, completed=done)
    meta = pl.concat(parts) if parts else pl.DataFrame(schema={"asin": pl.String, "title": pl.String})
    title = (
        pl.col("title").str.replace_all("&quot;", '"', literal=True).str.replace_all("&amp;", "&", literal=True)
        .str.strip_chars(" ").str.strip_chars('"')
    )
    checked = meta.with_columns(title.alias("clean")).with_columns(
        (
            pl.col("title").is_not_null()
            & ~pl.col("title").str.contains("<span id", literal=True)
            & (pl.col("clean").str.len_chars() > 1)
            & (pl.col("clean").str.split(" ").list.len() <= MAX_TITLE_WORDS)
        ).fill_null(False).alias("ok")
    )
    titles = (
        checked.group_by("asin", maintain_order=True)
        .agg(pl.col("ok").all(), pl.col("clean").last())
        .filter("ok")
        .select("asin", clean_titles(pl.col("clean")).alias("title"))
        .filter(pl.col("title") != "")
    )
    return titles, {"meta_records": meta.height, "items_with_title": titles.height}


def read_reviews(path: Path, titles: pl.DataFrame, since: int, until: int, layout: Layout = LAYOUT) -> tuple[pl.DataFrame, int]:
    """(user, asin, time of the reviews of titled items in [since, until] ticks in file order, reviews read).

    Ids are categorical: tens of millions of reviews then cost a few bytes each instead of two strings.
    """
    parts, total = [], 0
    titled = titles["asin"].implode()
    with progress_bar() as progress:
        task = progress.add_task(f"reading {path.name}", total=path.stat().st_size)
        for chunk, done in iter_json_lines(path, layout.review_fields, required=tuple(layout.review_fields)):
            total += chunk.height
            parts.append(
                chunk.filter(pl.col(layout.time).is_between(since, until) & pl.col(layout.item).is_in(titled)).select(
                    pl.col(layout.user).cast(pl.Categorical).alias("user"),
                    pl.col(layout.item).cast(pl.Categorical).alias("asin"),
                    pl.col(layout.time).alias("time"),
                )
            )
            progress.update(task, completed=done)
    empty = pl.DataFrame(schema={"user": pl.Categorical, "asin": pl.Categorical, "time": pl.Int64})
    return (pl.concat(parts) if parts else empty), total


def k_core(reviews: pl.DataFrame, k: int, stop_below: int = 0) -> tuple[pl.DataFrame, int]:
    """Drop users and items with fewer than k reviews until none is left; (kept reviews, passes).

    Stops early once fewer than `stop_below` items remain, since the caller will widen the window
    anyway (the K-core only ever removes items).
    """
    iterations = 0
    while True:
        iterations += 1
        counted = reviews.with_columns(
            pl.len().over("user").alias("user_reviews"), pl.len().over("asin").alias("item_reviews")
        )
        keep = (pl.col("user_reviews") >= k) & (pl.col("item_reviews") >= k)
        if counted.select(keep.all()).item() or reviews["asin"].n_unique() < stop_below:
            return reviews, iterations
        reviews = counted.filter(keep).select(reviews.columns)


def shuffled_catalog(reviews: pl.DataFrame, titles: pl.DataFrame, seed: int) -> pl.DataFrame:
    asins = reviews["asin"].unique(maintain_order=True).cast(pl.String).to_list()
    random.Random(seed).shuffle(asins)
    order = pl.DataFrame({"asin": asins, "item_id": pl.int_range(len(asins), eager=True, dtype=pl.Int64)})
    return order.join(titles, on="asin", how="left").sort("item_id")


def _check_options(config) -> tuple[date, date]:
    if not config.category:
        raise IgdrecError(f"--category is required for --source {config.source} (e.g. Video_Games)")
    try:
        start, end = date.fromisoformat(config.start), date.fromisoformat(config.end)
    except ValueError as exc:
        raise IgdrecError(f"--start/--end must be dates like 2017-10-01 ({exc})") from exc
    if start > end:
        raise IgdrecError(f"--start {start} is after --end {end}")
    if config.k_core < 1:
        raise IgdrecError(f"--k-core must be at least 1, got {config.k_core}")
    return start, end


def _epoch(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp())
