"""Bad values inside well-formed files (issue 18): missing ids, timestamps no clock can show, list columns,
and a history length beyond every sequence. Each refusal is one exact line naming the file, the record
and the value, and publishes nothing."""

from __future__ import annotations

import json
import math
import time

import polars as pl
import pytest
from preprocess_inputs import GOOD, amazon_args, d3_args, fail, interactions_files
from windows_reference import brute_force, interactions as interaction_frame
from typer.testing import CliRunner

from igdrec import schema
from igdrec.cli import app
from igdrec.sources.windows import build_windows

ITEMS = {"item_id": ["a", "b"], "title": ["Alpha", "Beta"]}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IGDREC_CACHE", str(tmp_path / "cache"))


def good_rows(**overrides) -> dict:
    """GOOD as columns (six windows: u and v with four interactions each); `overrides` replace columns."""
    rows = [line.split(",") for line in GOOD.strip().splitlines()[1:]]
    columns = {"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows], "timestamp": [int(r[2]) for r in rows]}
    return columns | overrides


def parquet_args(tmp_path, interactions: dict, items: dict = ITEMS) -> list[str]:
    pl.DataFrame(interactions).write_parquet(tmp_path / "inter.parquet")
    pl.DataFrame(items).write_parquet(tmp_path / "items.parquet")
    return ["--source", "interactions", "--interactions", str(tmp_path / "inter.parquet"), "--items", str(tmp_path / "items.parquet")]


def succeed(tmp_path, *args) -> tuple[dict, str]:
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["preprocess", "--run-dir", str(run_dir), *args])
    assert result.exit_code == 0, result.output
    return json.loads((run_dir / "data" / "stage.json").read_text()), result.output


# ---------------------------------------------------------------- case 1: missing (NaN, null, empty) ids


def test_nan_user_ids_in_parquet_are_refused_or_dropped_and_counted(tmp_path):
    nan = float("nan")
    users = [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, nan, nan, nan]
    columns = {"user_id": users, "item_id": list("ababababbab"), "timestamp": list(range(11))}
    args = parquet_args(tmp_path, columns)
    assert fail(tmp_path, *args) == (
        f"error: {tmp_path / 'inter.parquet'}: row 9: missing user_id ('NaN'); 3 rows of this file lack user_id or "
        "item_id (empty, null or NaN); --drop-missing drops them"
    )
    manifest, output = succeed(tmp_path, *args, "--drop-missing")
    stats = manifest["stats"]
    assert stats["dropped_missing_id_interactions"] == 3 and stats["dropped_missing_id_items"] == 0
    assert stats["users"] == 2 and stats["interactions"] == 8
    printed = {cells[1].strip(): cells[2].strip() for cells in (line.split("│") for line in output.splitlines()) if len(cells) == 4}
    assert printed["dropped_missing_id_interactions"] == "3" and printed["dropped_missing_id_items"] == "0"
    users_written = pl.concat([schema.read(tmp_path / "run" / "data" / f"{s}.parquet", "samples") for s in ("train", "valid", "test")])
    assert sorted(users_written["user_id"].unique()) == ["1.0", "2.0"]


def test_nan_item_id_in_both_files_is_no_item(tmp_path):
    nan = float("nan")
    columns = good_rows(item_id=[1.0, 2.0, 1.0, 2.0, 1.0, 2.0, nan, 2.0])
    columns = {k: v + extra for (k, v), extra in zip(columns.items(), (["w", "w"], [1.0, 2.0], [9, 10]))}  # six windows left
    args = parquet_args(tmp_path, columns, {"item_id": [1.0, 2.0, nan], "title": ["Alpha", "Beta", "Ghost"]})
    assert fail(tmp_path, *args) == (
        f"error: {tmp_path / 'inter.parquet'}: row 7: missing item_id ('NaN'); 1 row of this file lacks user_id or "
        "item_id (empty, null or NaN); --drop-missing drops them"
    )
    manifest, _ = succeed(tmp_path, *args, "--drop-missing")
    assert manifest["stats"]["dropped_missing_id_interactions"] == 1 and manifest["stats"]["dropped_missing_id_items"] == 1
    items = schema.read(tmp_path / "run" / "data" / "items.parquet", "items")
    assert items["title"].to_list() == ["Alpha", "Beta"]


@pytest.mark.parametrize("spelling", ["", "NaN", " nan "])
def test_missing_ids_in_csv_are_refused_or_dropped_and_counted(tmp_path, spelling):
    inter = GOOD.replace("v,a,7", f"{spelling},a,7") + "w,a,9\nw,b,10\n"  # six windows without the dropped row
    args = interactions_files(tmp_path, inter, "item_id,title\na,Alpha\nb,Beta\n" + f"{spelling},Ghost\n")
    shown = None if spelling == "" else spelling
    assert fail(tmp_path, *args) == (
        f"error: {tmp_path / 'inter.csv'}:8: missing user_id ({shown!r}); 1 row of this file lacks user_id or item_id "
        "(empty, null or NaN); --drop-missing drops them"
    )
    manifest, _ = succeed(tmp_path, *args, "--drop-missing")
    assert manifest["stats"]["dropped_missing_id_interactions"] == 1 and manifest["stats"]["dropped_missing_id_items"] == 1
    assert manifest["stats"]["interactions"] == 9


def test_rows_are_named_in_the_file_after_dropped_ones(tmp_path):
    """Errors after a drop still name the row of the file, not of the table left."""
    inter = "user_id,item_id,timestamp\n,a,1\n,b,2\n" + GOOD.split("\n", 1)[1] + "v,zz,9\n"
    message = fail(tmp_path, *interactions_files(tmp_path, inter), "--drop-missing")
    assert message.startswith(f"error: {tmp_path / 'inter.csv'}:12: item 'zz' is not in"), message
    inter = "user_id,item_id,timestamp\n,a,1\nu,b,soon\n"
    message = fail(tmp_path, *interactions_files(tmp_path, inter), "--drop-missing")
    assert message == f"error: {tmp_path / 'inter.csv'}:3: timestamp 'soon' is not a number or a date"


# ---------------------------------------------------------------- case 2: timestamps and list columns

SECONDS = "timestamps are UTC seconds since 1970-01-01"


@pytest.mark.parametrize(
    "value, why",
    [
        (float("nan"), f"is not a finite number; {SECONDS}"),
        (math.inf, f"is not a finite number; {SECONDS}"),
        (-math.inf, f"is not a finite number; {SECONDS}"),
        (1e23, f"is after the year 2100; {SECONDS}, at most 4102444800"),
        (1.6e18, "is after the year 2100 as seconds since 1970; it looks like nanoseconds: divide the column by 1000000000"),
    ],
)
def test_bad_parquet_timestamps_name_the_row(tmp_path, value, why):
    stamps = [float(t) for t in good_rows()["timestamp"]]
    stamps[5] = value
    message = fail(tmp_path, *parquet_args(tmp_path, good_rows(timestamp=stamps)))
    assert message == f"error: {tmp_path / 'inter.parquet'}: row 6: timestamp {value!r} {why}"


@pytest.mark.parametrize(
    "text, why",
    [
        ("nan", f"is not a finite number; {SECONDS}"),
        ("inf", f"is not a finite number; {SECONDS}"),
        ("-Infinity", f"is not a finite number; {SECONDS}"),
        ("1e23", f"is after the year 2100; {SECONDS}, at most 4102444800"),
    ],
)
def test_bad_text_timestamps_name_the_line(tmp_path, text, why):
    message = fail(tmp_path, *interactions_files(tmp_path, GOOD.replace("v,a,7", f"v,a,{text}")))
    assert message == f"error: {tmp_path / 'inter.csv'}:8: timestamp {text!r} {why}"


def test_bad_d3_timestamp_names_the_line(tmp_path):
    args = d3_args(tmp_path)
    test_csv = tmp_path / "test.csv"
    test_csv.write_text(test_csv.read_text().replace(",400", ",1e23"))
    assert fail(tmp_path, *args) == f"error: {test_csv}:2: timestamp '1e23' is after the year 2100; {SECONDS}, at most 4102444800"


@pytest.mark.parametrize("value, shown", [("Infinity", "inf"), ("1e23", "1e+23")])
def test_bad_amazon_review_time_names_the_line(tmp_path, value, shown):
    reviews = [{"reviewerID": "u", "asin": "A", "unixReviewTime": 1}, '{"reviewerID": "u", "asin": "A", "unixReviewTime": %s}' % value]
    message = fail(tmp_path, *amazon_args(tmp_path, reviews))
    path = tmp_path / "reviews.json.gz"
    if value == "Infinity":
        assert message == f"error: {path}:2: field 'unixReviewTime' is inf, expected an integer"
    else:
        assert message == f"error: {path}:2: field 'unixReviewTime' is {shown}, beyond the 64-bit integer range"


def test_list_typed_title_column_is_refused(tmp_path):
    items = {"item_id": ["a", "b"], "title": [["Alpha", "Prime"], ["Beta"]]}
    assert fail(tmp_path, *parquet_args(tmp_path, good_rows(), items)) == (
        f"error: {tmp_path / 'items.parquet'}: row 1: column 'title' holds List(String) values (['Alpha', 'Prime']), not text or numbers"
    )


def test_list_typed_id_column_is_refused(tmp_path):
    columns = good_rows(user_id=[["u"]] * 8)
    assert fail(tmp_path, *parquet_args(tmp_path, columns)) == (
        f"error: {tmp_path / 'inter.parquet'}: row 1: column 'user_id' holds List(String) values (['u']), not text or numbers"
    )


# ---------------------------------------------------------------- case 3: a history length beyond every sequence


def test_huge_history_len_is_fast_and_equals_the_longest_sequence():
    import random

    rng = random.Random(3)
    rows = [(f"u{rng.randint(0, 40)}", rng.randint(0, 60), rng.randint(0, 300)) for _ in range(3000)]
    frame = interaction_frame(rows)
    longest = int(frame["user_id"].value_counts()["count"].max())
    start = time.perf_counter()
    huge = build_windows(frame, history_len=1_000_000)
    elapsed = time.perf_counter() - start
    assert huge.equals(build_windows(frame, history_len=longest))
    assert elapsed < 20, f"{elapsed:.1f} s"  # the former per-lag build grew with history_len: hours for 10^6
    expected = [w for split in brute_force(rows, history_len=longest) for w in split]
    assert list(zip(huge["user_id"], huge["history_item_ids"].to_list(), huge["item_id"], huge["timestamp"])) == expected


def test_huge_history_len_on_the_command_line(tmp_path):
    manifest, _ = succeed(tmp_path, *interactions_files(tmp_path, GOOD), "--history-len", "1000000")
    assert manifest["stats"]["history_len_max"] == 3


# ---------------------------------------------------------------- the same rules in the other sources and columns


def test_d3_missing_user_id_is_refused(tmp_path):
    args = d3_args(tmp_path)
    valid = tmp_path / "valid.csv"
    lines = valid.read_text().splitlines()
    lines[1] = "NaN" + lines[1][lines[1].index(","):]
    valid.write_text("\n".join(lines) + "\n")
    assert fail(tmp_path, *args) == f"error: {valid}:2: missing user_id ('NaN')"


def test_d3_parquet_split_with_list_histories_equals_the_csv(tmp_path):
    from preprocess_inputs import write_d3_inputs

    from igdrec.config import PreprocessConfig
    from igdrec.rundir import RunDir
    from igdrec.stages import preprocess

    files = write_d3_inputs(tmp_path)
    preprocess.run(PreprocessConfig(source="d3-csv", **files), RunDir(tmp_path / "csv"))
    for split in ("train", "valid", "test"):
        frame = pl.read_csv(files[split], infer_schema=False)
        histories = [json.loads(h) for h in frame["history_item_id"]]
        frame.with_columns(pl.Series("history_item_id", histories, dtype=pl.List(pl.Int64))).write_parquet(tmp_path / f"{split}.parquet")
        files[split] = str(tmp_path / f"{split}.parquet")
    preprocess.run(PreprocessConfig(source="d3-csv", **files), RunDir(tmp_path / "parquet"))
    for split in ("train", "valid", "test"):
        assert pl.read_parquet(tmp_path / "parquet" / "data" / f"{split}.parquet").equals(pl.read_parquet(tmp_path / "csv" / "data" / f"{split}.parquet"))


def test_non_utf8_binary_title_column_is_refused(tmp_path):
    items = pl.DataFrame({"item_id": ["a", "b"], "title": [b"Alpha", b"B\xffta"]})
    assert items.schema["title"] == pl.Binary
    args = parquet_args(tmp_path, good_rows(), items.to_dict(as_series=False))
    assert fail(tmp_path, *args) == f"error: {tmp_path / 'items.parquet'}: row 2: column 'title' holds bytes that are not UTF-8 (b'B\\xffta')"


def test_struct_timestamp_column_is_refused(tmp_path):
    columns = good_rows(timestamp=[{"s": t} for t in good_rows()["timestamp"]])
    assert fail(tmp_path, *parquet_args(tmp_path, columns)) == (
        f"error: {tmp_path / 'inter.parquet'}: row 1: column 'timestamp' holds Struct({{'s': Int64}}) values ({{'s': 1}}), not text or numbers"
    )


def test_one_column_for_two_roles_is_refused(tmp_path):
    assert fail(tmp_path, *interactions_files(tmp_path, GOOD), "--time-col", "user_id") == (
        "error: --user-col 'user_id', --item-col 'item_id' and --time-col 'user_id' must name three different columns, "
        "and --title-col 'title' another than --item-col"
    )
