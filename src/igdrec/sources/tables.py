"""Reading and checking raw input files: the one place that turns bad bytes into a one-line error.

Every error names the file and the line (text files) or row (Parquet) of the first bad record, so a
user can fix the input without a traceback.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import operator
import os
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import polars as pl

from igdrec.assets import cache_root
from igdrec.errors import IgdrecError
from igdrec.rundir import fingerprint_file, write_json_atomic

PARQUET_MAGIC = b"PAR1"
GZIP_MAGIC = b"\x1f\x8b"
PARQUET_SUFFIXES = (".parquet", ".pq")
RECENT_S = 5.0  # files modified this recently are hashed every time, never memoised
# Timestamps are UTC seconds since 1970. Anything past 2100 is no plausible interaction time in
# seconds, but is what milliseconds look like (1.6e12 ms is 2020; as seconds it is year 52,000).
LATEST_TIMESTAMP_S = 4_102_444_800  # 2100-01-01T00:00:00Z


def require_file(path: str | None, option: str) -> Path:
    """The path of a required input file, or an error naming the option that should point at it."""
    if not path:
        raise IgdrecError(f"{option} is required for this source")
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise IgdrecError(f"{resolved}: file not found (given as {option})")
    return resolved


def file_fingerprint(path: Path) -> str:
    """Content hash of an input file, remembered by (size, mtime, inode) so a cached rerun skips reading it.

    Multi-gigabyte review dumps would otherwise cost a full read on every `igdrec preprocess`. Files
    changed in the last few seconds are always hashed, as git does, since a rewrite within the file
    system's timestamp resolution would keep the same stamp.
    """
    stat = path.stat()
    memo_path = cache_root() / "file-fingerprints.json"
    key = str(path.resolve())
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry["fingerprint"]
    fingerprint = fingerprint_file(path)
    if time.time() - stat.st_mtime < RECENT_S:
        return fingerprint  # could still be rewritten within the file system's mtime resolution
    memo = {k: v for k, v in memo.items() if os.path.exists(k)}  # forget deleted files (e.g. test inputs)
    memo[key] = {"stamp": stamp, "fingerprint": fingerprint}
    try:
        write_json_atomic(memo_path, memo)
    except OSError:
        pass  # an unwritable cache only costs re-hashing next time
    return fingerprint


def is_parquet(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == PARQUET_MAGIC


def record_label(path: Path, index: int, rows: pl.Series | None = None) -> str:
    """`file:line` for a 0-based data row of a CSV with a header, `file: row N` for Parquet.

    `rows`: the file row of each index, for a table that has lost rows (dropped records) since reading.
    """
    if rows is not None:
        index = int(rows[index])
    if path.suffix.lower() in (".parquet", ".pq") or is_parquet(path):
        return f"{path}: row {index + 1}"
    return f"{path}:{index + 2}"


def first_true(mask: pl.Series) -> int | None:
    hits = mask.fill_null(True).arg_true()
    return int(hits[0]) if len(hits) else None


def check_utf8(path: Path) -> None:
    """Raise naming the first line that is not UTF-8 (called after a reader has failed, to explain why)."""
    with gzip_errors(path), open_binary(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise IgdrecError(f"{path}:{line_no}: not valid UTF-8 (byte {exc.start + 1} of the line)") from exc


def open_binary(path: Path):
    """Open a plain or gzip-compressed file for binary reading (decided by its magic bytes).

    Read it inside `gzip_errors(path)`: a truncated or damaged .gz fails only while being read.
    """
    with open(path, "rb") as handle:
        compressed = handle.read(2) == GZIP_MAGIC
    return gzip.open(path, "rb") if compressed else open(path, "rb")


@contextmanager
def gzip_errors(path: Path):
    """Turn a truncated or corrupt gzip stream into one line naming the file.

    gzip raises EOFError at a truncated end, which Click would otherwise report as a bare "Aborted.".
    """
    try:
        yield
    except EOFError as exc:
        raise IgdrecError(f"{path}: truncated gzip file (it ends before the compressed data does); download it again") from exc
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise IgdrecError(f"{path}: corrupt gzip file ({_first_line(exc)})") from exc


def read_table(path: Path, columns: list[str], role: str) -> pl.DataFrame:
    """A CSV (all columns as strings, so ids keep their exact spelling) or Parquet file with `columns`."""
    if is_parquet(path):
        try:
            df = pl.read_parquet(path)
        except Exception as exc:  # polars raises several types for damaged files
            raise IgdrecError(f"{path}: cannot read Parquet ({_first_line(exc)})") from exc
    elif path.suffix.lower() in PARQUET_SUFFIXES:
        # Reading it as CSV anyway would only surface later as a baffling "lacks column(s)" error.
        with open(path, "rb") as handle:
            head = handle.read(4)
        raise IgdrecError(
            f"{path}: named {path.suffix} but is not a Parquet file (it starts with {head!r}, not {PARQUET_MAGIC!r}); "
            "rename a CSV file to .csv"
        )
    else:
        df = read_csv_strings(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise IgdrecError(
            f"{path}: {role} file lacks column(s) {', '.join(missing)}; it has {', '.join(df.columns) or 'none'}"
        )
    return df


def read_csv_strings(path: Path, **options) -> pl.DataFrame:
    try:
        return pl.read_csv(path, infer_schema=False, **options)
    except pl.exceptions.NoDataError as exc:
        raise IgdrecError(f"{path}: file is empty") from exc
    except Exception as exc:  # ComputeError for bad bytes, ragged rows or a damaged .gz
        check_utf8(path)  # names the line of a non-UTF-8 byte, or the truncated/corrupt gzip stream
        raise IgdrecError(f"{path}: cannot parse as CSV ({_first_line(exc)})") from exc


def require_values(df: pl.DataFrame, column: str, path: Path, what: str, rows: pl.Series | None = None) -> None:
    """Error at the first row whose `column` is null or blank."""
    series = df[column]
    blank = series.is_null()
    if series.dtype == pl.String:
        blank = blank | (series.str.strip_chars() == "")
    bad = first_true(blank)
    if bad is not None:
        raise IgdrecError(f"{record_label(path, bad, rows)}: empty {what} ({column!r})")


def text_values(series: pl.Series, path: Path, rows: pl.Series | None = None) -> pl.Series:
    """A column of one text or number per row, as text; a list, struct or non-UTF-8 column is refused by row."""
    dtype = series.dtype
    if dtype.is_nested() or dtype == pl.Object:
        bad = first_true(series.is_not_null())
        shown = "" if bad is None else f" ({_short_repr(series.slice(bad, 1).to_list()[0])})"
        label = path if bad is None else record_label(path, bad, rows)
        raise IgdrecError(f"{label}: column {series.name!r} holds {dtype} values{shown}, not text or numbers")
    if dtype == pl.Binary:
        for index, value in enumerate(series.to_list()):
            try:
                if value is not None:
                    value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise IgdrecError(
                    f"{record_label(path, index, rows)}: column {series.name!r} holds bytes that are not UTF-8 ({_short_repr(value)})"
                ) from exc
    return series.cast(pl.String)


def missing_ids(ids: pl.Series) -> pl.Series:
    """True where an id (as text) is missing: null, blank or NaN.

    A float column's NaN becomes the text "NaN", and CSV writers spell a missing float so too: kept as an
    id, every such row would be one user (or item) called "NaN".
    """
    text = ids.str.strip_chars()
    return (ids.is_null() | (text == "") | (text.str.to_lowercase() == "nan")).fill_null(True)


def clean_titles(titles: pl.Expr | pl.Series) -> pl.Expr | pl.Series:
    """One line, no surrounding whitespace: a newline inside a title would end its token sequence early."""
    return titles.str.replace_all(r"[\r\n\t]+", " ").str.strip_chars()


def require_title_lengths(items: pl.DataFrame, max_chars: int, origin: str) -> None:
    """Refuse the first item (item_id, title) whose title is longer than `max_chars` characters.

    An absurd title would be a prompt part and a decoding target of thousands of tokens; refusing it
    here names the item, where a later stage could only fail on a sample.
    """
    if max_chars < 1:
        raise IgdrecError(f"--max-title-chars must be at least 1, got {max_chars}")
    bad = first_true(items["title"].str.len_chars() > max_chars)
    if bad is not None:
        title = items["title"][bad]
        raise IgdrecError(
            f"{origin}: item {items['item_id'][bad]} has a title of {len(title):,} characters ({title[:40]!r}{'…' if len(title) > 40 else ''}), "
            f"over the limit of {max_chars} (max_title_chars / --max-title-chars)"
        )


def drop_missing_ids(
    table: pl.DataFrame, columns: list[str], path: Path, drop: bool, rows: pl.Series | None = None
) -> tuple[pl.DataFrame, pl.Series, int]:
    """`table` less the rows whose id in one of `columns` (text) is missing (`missing_ids`), the file row of
    each row kept (for `record_label`), and the number dropped. Unless `drop`, the first such row is refused.
    `rows`: the file row of each row of `table`, where it has lost rows since reading (see `record_label`)."""
    masks = [missing_ids(table[column]) for column in columns]
    missing = functools.reduce(operator.or_, masks)
    n_missing = int(missing.sum())
    if n_missing and not drop:
        first = first_true(missing)
        column = next(column for column, mask in zip(columns, masks) if mask[first])
        rows_lack = f"{n_missing:,} rows of this file lack" if n_missing > 1 else "1 row of this file lacks"
        raise IgdrecError(
            f"{record_label(path, first, rows)}: missing {column} ({table[column][first]!r}); {rows_lack} {' or '.join(columns)} "
            "(empty, null or NaN); --drop-missing drops them"
        )
    kept = (~missing).arg_true()
    return table.filter(~missing), kept if rows is None else rows.gather(kept), n_missing


def parse_timestamps(series: pl.Series, path: Path, rows: pl.Series | None = None) -> pl.Series:
    """Integer timestamps from integers, floats, numeric strings, dates or datetimes (UTC seconds).

    The first value that is no finite number or date, or lies outside 1970 .. 2100, is refused by row
    (`rows`: see `record_label`). The checks run on floats, before the cast to integers, which NaN,
    infinities and values past 2^63 would fail with no row named.
    """
    if series.dtype.is_numeric():
        seconds = series.cast(pl.Float64)
        is_number = pl.repeat(True, series.len(), eager=True)
    elif isinstance(series.dtype, pl.Datetime):
        seconds = series.dt.epoch("s").cast(pl.Float64)  # an absolute instant: the same with or without a time zone
        is_number = pl.repeat(False, series.len(), eager=True)
    elif series.dtype == pl.Date:
        seconds = series.cast(pl.Datetime("us")).dt.epoch("s").cast(pl.Float64)
        is_number = pl.repeat(False, series.len(), eager=True)
    else:
        text = text_values(series, path, rows).str.strip_chars()
        seconds = text.cast(pl.Float64, strict=False)
        is_number = seconds.is_not_null()
        if not is_number.all():
            dates = _parse_dates(text.zip_with(~is_number, pl.Series([None], dtype=pl.String)))
            seconds = seconds.fill_null(dates.cast(pl.Float64))

    def refuse(mask: pl.Series, why: str) -> None:
        bad = first_true(mask)
        if bad is not None:
            raise IgdrecError(f"{record_label(path, bad, rows)}: timestamp {series[bad]!r} {why}")

    refuse(seconds.is_null(), "is not a number or a date")
    refuse(~seconds.is_finite(), "is not a finite number; timestamps are UTC seconds since 1970-01-01")
    refuse(seconds < 0, "is before 1970; timestamps are UTC seconds since 1970-01-01")
    late = seconds > LATEST_TIMESTAMP_S
    first = first_true(late)
    if first is not None and is_number[first]:
        # A number in a finer unit than seconds: name the unit whose division brings it before 2100.
        for factor, unit in ((10**3, "milliseconds"), (10**6, "microseconds"), (10**9, "nanoseconds")):
            if seconds[first] / factor <= LATEST_TIMESTAMP_S:
                refuse(late, f"is after the year 2100 as seconds since 1970; it looks like {unit}: divide the column by {factor}")
    refuse(late, f"is after the year 2100; timestamps are UTC seconds since 1970-01-01, at most {LATEST_TIMESTAMP_S}")
    return seconds.floor().cast(pl.Int64).rename(series.name)


def _parse_dates(text: pl.Series) -> pl.Series:
    """Seconds since the epoch (UTC) for date/datetime strings; null where the text is no date."""
    try:
        dates = text.str.to_datetime(strict=False, time_unit="us")
    except pl.exceptions.ComputeError:  # no date format fits the first value
        return pl.Series([None] * text.len(), dtype=pl.Int64)
    if dates.dtype.time_zone:
        dates = dates.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    return dates.dt.epoch("s")


def iter_json_lines(path: Path, columns: dict[str, pl.DataType], required: tuple[str, ...], chunk_bytes: int = 64 << 20) -> Iterator[tuple[pl.DataFrame, int]]:
    """Stream a (gzipped) JSON-lines file as DataFrames of `columns`, with progress in raw bytes.

    Yields (chunk, raw bytes consumed so far). polars parses each chunk; if it rejects
    one, the chunk is re-read line by line so the error can name the exact line.
    """
    with open(path, "rb") as raw:
        compressed = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        first_line = 1
        while True:
            with gzip_errors(path):
                block = stream.read(chunk_bytes)
                if block and not block.endswith(b"\n"):
                    block += stream.readline()
            if not block:
                break
            try:
                chunk = pl.read_ndjson(io.BytesIO(block), schema=columns)
                _check_required(chunk, required)
            except Exception:
                chunk = _parse_lines_strictly(path, block, first_line, columns, required)
            yield chunk, raw.tell()
            first_line += block.count(b"\n")


def _check_required(chunk: pl.DataFrame, required: tuple[str, ...]) -> None:
    if any(chunk[c].null_count() for c in required):
        raise ValueError("a required field is missing")


def _parse_lines_strictly(path: Path, block: bytes, first_line: int, columns: dict[str, pl.DataType], required: tuple[str, ...]) -> pl.DataFrame:
    rows: dict[str, list] = {c: [] for c in columns}
    for offset, line in enumerate(block.split(b"\n")):
        line_no = first_line + offset
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise IgdrecError(f"{path}:{line_no}: not valid UTF-8 (byte {exc.start + 1} of the line)") from exc
        except json.JSONDecodeError as exc:
            raise IgdrecError(f"{path}:{line_no}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise IgdrecError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
        for column, dtype in columns.items():
            value = record.get(column)
            if value is None:
                if column in required:
                    raise IgdrecError(f"{path}:{line_no}: missing field {column!r}")
            elif dtype == pl.Int64:
                try:
                    value = int(value)
                except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: Infinity
                    raise IgdrecError(f"{path}:{line_no}: field {column!r} is {value!r}, expected an integer") from exc
                if not -(2**63) <= value < 2**63:
                    raise IgdrecError(f"{path}:{line_no}: field {column!r} is {record[column]!r}, beyond the 64-bit integer range")
            elif not isinstance(value, str):
                value = json.dumps(value) if not isinstance(value, (int, float)) else str(value)
            rows[column].append(value)
    return pl.DataFrame(rows, schema=columns)


def _short_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
