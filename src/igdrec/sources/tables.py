"""Reading and checking raw input files: the one place that turns bad bytes into a one-line error.

Every error names the file and the line (text files) or row (Parquet) of the first bad record, so a
user can fix the input without a traceback.
"""

from __future__ import annotations

import gzip
import io
import json
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


def record_label(path: Path, index: int) -> str:
    """`file:line` for a 0-based data row of a CSV with a header, `file: row N` for Parquet."""
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


def require_values(df: pl.DataFrame, column: str, path: Path, what: str) -> None:
    """Error at the first row whose `column` is null or blank."""
    series = df[column]
    blank = series.is_null()
    if series.dtype == pl.String:
        blank = blank | (series.str.strip_chars() == "")
    bad = first_true(blank)
    if bad is not None:
        raise IgdrecError(f"{record_label(path, bad)}: empty {what} ({column!r})")


def clean_titles(titles: pl.Expr) -> pl.Expr:
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


def parse_timestamps(series: pl.Series, path: Path) -> pl.Series:
    """Integer timestamps from integers, floats, numeric strings, dates or datetimes (UTC seconds)."""
    if series.dtype.is_integer():
        parsed = series.cast(pl.Int64)
    elif series.dtype.is_float():
        parsed = series.floor().cast(pl.Int64)
    elif isinstance(series.dtype, pl.Datetime):
        parsed = series.dt.epoch("s")  # an absolute instant: the same with or without a time zone
    elif series.dtype == pl.Date:
        parsed = series.cast(pl.Datetime("us")).dt.epoch("s")
    else:
        text = series.cast(pl.String).str.strip_chars()
        parsed = text.cast(pl.Float64, strict=False).floor().cast(pl.Int64)
        if parsed.null_count():
            parsed = parsed.fill_null(_parse_dates(text.zip_with(parsed.is_null(), pl.Series([None], dtype=pl.String))))
    bad = first_true(parsed.is_null())
    if bad is not None:
        raise IgdrecError(f"{record_label(path, bad)}: timestamp {series[bad]!r} is not a number or a date")
    bad = first_true(parsed < 0)
    if bad is not None:
        raise IgdrecError(
            f"{record_label(path, bad)}: timestamp {series[bad]!r} is before 1970; timestamps are UTC seconds since 1970-01-01"
        )
    bad = first_true(parsed > LATEST_TIMESTAMP_S)
    if bad is not None:
        raise IgdrecError(
            f"{record_label(path, bad)}: timestamp {series[bad]!r} is after the year 2100 as seconds since 1970; "
            "it looks like milliseconds: divide the column by 1000"
        )
    return parsed.rename(series.name)


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
                except (TypeError, ValueError) as exc:
                    raise IgdrecError(f"{path}:{line_no}: field {column!r} is {value!r}, expected an integer") from exc
            elif not isinstance(value, str):
                value = json.dumps(value) if not isinstance(value, (int, float)) else str(value)
            rows[column].append(value)
    return pl.DataFrame(rows, schema=columns)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
