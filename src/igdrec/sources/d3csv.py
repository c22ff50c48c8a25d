"""Source `d3-csv`: train/valid/test CSVs and the info file written by the D3/BIGRec reference code.

The splits are kept exactly as given (row order = sample order). CSV columns used: user_id,
history_item_id (a Python-literal list of ints), item_id, and timestamp and item_title when present.
The info file has one `title<TAB>id` per line, or `extra<TAB>title<TAB>id` in some variants; its ids
are renumbered densely in ascending order, which keeps them unchanged when they already are 0..n-1.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from igdrec.errors import IgdrecError
from igdrec.sources import Dataset
from igdrec.sources.tables import (
    clean_titles,
    file_fingerprint,
    first_true,
    gzip_errors,
    missing_ids,
    open_binary,
    parse_timestamps,
    read_table,
    record_label,
    require_file,
    require_values,
    text_values,
)
from igdrec.sources.windows import SPLITS, number_samples

# "[3, 17]" as Python writes a list of ints; some variants quote them: "['3', '17']".
LIST_ELEMENT = r"""\s*['"]?-?\d+['"]?\s*"""
INT_LIST = rf"^\s*\[({LIST_ELEMENT}(,{LIST_ELEMENT})*,?\s*)?\]\s*$"
REQUIRED_COLUMNS = ["user_id", "history_item_id", "item_id"]


def input_files(config) -> dict[str, str]:
    paths = {split: require_file(getattr(config, split), f"--{split}") for split in SPLITS}
    paths["info"] = require_file(config.info, "--info")
    return {role: file_fingerprint(path) for role, path in paths.items()}


def load(config) -> Dataset:
    info_path = require_file(config.info, "--info")
    info = read_info(info_path)
    catalog = info.sort("reference_id").with_row_index("item_id").with_columns(pl.col("item_id").cast(pl.Int64))
    splits = {}
    for split in SPLITS:
        splits[split] = read_split(require_file(getattr(config, split), f"--{split}"), catalog, info_path)
    return Dataset(items=catalog.select("item_id", "title"), interactions=None, splits=splits, stats={"info_lines": info.height})


def read_info(path: Path) -> pl.DataFrame:
    titles, ids = [], []
    seen: dict[int, int] = {}
    with gzip_errors(path), open_binary(path) as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise IgdrecError(f"{path}:{line_no}: not valid UTF-8 (byte {exc.start + 1} of the line)") from exc
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise IgdrecError(f"{path}:{line_no}: expected `title<TAB>id`, found no tab")
            title, reference = fields[-2], fields[-1].strip()
            try:
                reference_id = int(reference)
            except ValueError as exc:
                raise IgdrecError(f"{path}:{line_no}: item id {reference!r} is not an integer") from exc
            if reference_id in seen:
                raise IgdrecError(f"{path}:{line_no}: item id {reference_id} already given on line {seen[reference_id]}")
            if not title.strip():
                raise IgdrecError(f"{path}:{line_no}: empty title for item id {reference_id}")
            seen[reference_id] = line_no
            titles.append(title)
            ids.append(reference_id)
    if not ids:
        raise IgdrecError(f"{path}: no items")
    return pl.DataFrame({"reference_id": ids, "title": titles}, schema={"reference_id": pl.Int64, "title": pl.String}).with_columns(
        clean_titles(pl.col("title"))
    )


def read_split(path: Path, catalog: pl.DataFrame, info_path: Path) -> pl.DataFrame:
    df = read_table(path, REQUIRED_COLUMNS, "d3-csv split")
    for column in REQUIRED_COLUMNS:
        require_values(df, column, path, column)
    users = text_values(df["user_id"], path)
    bad = first_true(missing_ids(users))
    if bad is not None:
        raise IgdrecError(f"{record_label(path, bad)}: missing user_id ({users[bad]!r})")
    history_ids = read_histories(df["history_item_id"], path)
    bad = first_true(history_ids.list.len() == 0)
    if bad is not None:
        raise IgdrecError(f"{record_label(path, bad)}: empty history_item_id")
    targets = text_values(df["item_id"], path).str.strip_chars().cast(pl.Int64, strict=False)
    bad = first_true(targets.is_null())
    if bad is not None:
        raise IgdrecError(f"{record_label(path, bad)}: item_id {df['item_id'][bad]!r} is not an integer")

    known = catalog["reference_id"].implode()
    unknown_target = ~targets.is_in(known)
    unknown_history = ~history_ids.list.eval(pl.element().is_in(catalog["reference_id"].implode()).all()).list.first()
    bad = first_true(unknown_target | unknown_history)
    if bad is not None:
        raise IgdrecError(f"{record_label(path, bad)}: item id(s) not in {info_path}")

    to_dense = {"old": catalog["reference_id"], "new": catalog["item_id"], "return_dtype": pl.Int64}
    samples = pl.DataFrame(
        {
            "user_id": users,
            "history_item_ids": history_ids.list.eval(pl.element().replace_strict(**to_dense)),
            "item_id": targets.replace_strict(**to_dense),
            "timestamp": parse_timestamps(df["timestamp"], path) if "timestamp" in df.columns else pl.Series([None] * df.height, dtype=pl.Int64),
        }
    )
    if "item_title" in df.columns:
        given = clean_titles(text_values(df["item_title"], path))
        expected = samples.join(catalog, on="item_id", how="left", maintain_order="left")["title"]
        mismatch = given != expected
        bad = first_true(mismatch)
        if bad is not None:
            raise IgdrecError(
                f"{record_label(path, bad)}: item_title {df['item_title'][bad]!r} differs from {expected[bad]!r}, "
                f"the title of item {targets[bad]} in {info_path}"
            )
    return number_samples(samples)


def read_histories(column: pl.Series, path: Path) -> pl.Series:
    """history_item_id as lists of ints: a Parquet list column as it is, text as Python writes a list."""
    if isinstance(column.dtype, pl.List) and column.dtype.inner.is_integer():
        bad = first_true(column.list.drop_nulls().list.len() != column.list.len())
        if bad is not None:
            raise IgdrecError(f"{record_label(path, bad)}: history_item_id {column[bad].to_list()!r} holds a null")
        return column.cast(pl.List(pl.Int64))
    histories = text_values(column, path)
    bad = first_true(~histories.str.contains(INT_LIST))
    if bad is not None:
        raise IgdrecError(f"{record_label(path, bad)}: history_item_id {histories[bad]!r} is not a list of integers")
    return histories.str.strip_chars().str.strip_chars("[]").str.split(",").list.eval(
        pl.element().str.strip_chars(" '\"").filter(pl.element().str.strip_chars() != "").cast(pl.Int64)
    )
