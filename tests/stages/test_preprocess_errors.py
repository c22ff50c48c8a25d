"""Bad input: a one-line error naming the file (and line or row), a non-zero exit, and no artifacts."""

import gzip
import json

import pytest
from preprocess_inputs import GOOD, amazon_args, d3_args, fail, interactions_files, write_json_lines
from typer.testing import CliRunner

from igdrec.cli import app
from igdrec.errors import IgdrecError
from igdrec.sources.amazon2018 import REVIEW_FIELDS
from igdrec.sources.tables import iter_json_lines


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Input fingerprints are memoised in the cache: keep the tests' out of the user's."""
    monkeypatch.setenv("IGDREC_CACHE", str(tmp_path / "cache"))


# Six windows: the fewest whose 80/10/10 split leaves no split empty.
def test_missing_file(tmp_path):
    args = interactions_files(tmp_path, GOOD)
    args[args.index("--items") + 1] = str(tmp_path / "nope.csv")
    assert "nope.csv: file not found" in fail(tmp_path, *args)


def test_missing_column(tmp_path):
    message = fail(tmp_path, *interactions_files(tmp_path, "user_id,item_id\nu,a\n"))
    assert "inter.csv" in message and "timestamp" in message


def test_empty_title_names_the_line(tmp_path):
    assert "items.csv:3: empty title" in fail(tmp_path, *interactions_files(tmp_path, GOOD, "item_id,title\na,Alpha\nb,  \n"))


def test_unknown_item_is_counted_unless_dropped(tmp_path):
    message = fail(tmp_path, *interactions_files(tmp_path, GOOD + "v,zz,5\nu,zz,6\n"))
    assert "inter.csv:10: item 'zz' is not in" in message and "2 interactions" in message and "--drop-unknown" in message


def test_bad_timestamp(tmp_path):
    assert "inter.csv:3: timestamp 'soon'" in fail(tmp_path, *interactions_files(tmp_path, "user_id,item_id,timestamp\nu,a,1\nu,b,soon\n"))


def test_non_utf8_csv(tmp_path):
    message = fail(tmp_path, *interactions_files(tmp_path, GOOD, b"item_id,title\na,Alpha\nb,B\xffta\n"))
    assert "items.csv:3: not valid UTF-8" in message


def test_run_dir_not_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(app, ["preprocess", "--run-dir", str(blocker / "run"), *interactions_files(tmp_path, GOOD)])
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1
    assert f"run directory {blocker / 'run'} cannot be created: {blocker} is a file" in result.output.replace("\n", "")
    result = CliRunner().invoke(app, ["preprocess", "--run-dir", str(blocker), *interactions_files(tmp_path, GOOD)])
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1
    assert f"run directory {blocker} is a file, not a directory" in result.output.replace("\n", "")


def test_malformed_json_line(tmp_path):
    reviews = [{"reviewerID": "u", "asin": "A", "unixReviewTime": 1}, '{"reviewerID": "u", "asin": "A", unixReviewTime: 2}']
    assert "reviews.json.gz:2: malformed JSON" in fail(tmp_path, *amazon_args(tmp_path, reviews))


def test_missing_json_field(tmp_path):
    reviews = [{"reviewerID": "u", "asin": "A", "unixReviewTime": 1}, {"asin": "A", "unixReviewTime": 2}]
    assert "reviews.json.gz:2: missing field 'reviewerID'" in fail(tmp_path, *amazon_args(tmp_path, reviews))


def test_non_utf8_json_line(tmp_path):
    reviews = [{"reviewerID": "u", "asin": "A", "unixReviewTime": 1}]
    args = amazon_args(tmp_path, reviews)
    meta = tmp_path / "meta.json.gz"
    meta.write_bytes(gzip.compress(b'{"asin": "A", "title": "ok"}\n{"asin": "B", "title": "caf\xe9"}\n'))
    assert "meta.json.gz:2: not valid UTF-8" in fail(tmp_path, *args)


def test_json_errors_name_the_right_line_across_chunks(tmp_path):
    lines = [json.dumps({"reviewerID": f"u{i}", "asin": "A", "unixReviewTime": i}) for i in range(40)]
    lines[33] = lines[33][:-1]  # cut the closing brace
    path = write_json_lines(tmp_path / "r.json.gz", lines)
    with pytest.raises(IgdrecError, match=r"r\.json\.gz:34: malformed JSON"):
        for _ in iter_json_lines(path, REVIEW_FIELDS, required=tuple(REVIEW_FIELDS), chunk_bytes=100):
            pass
    good = write_json_lines(tmp_path / "ok.json", lines[:33], compress=False)
    chunks = [chunk for chunk, _ in iter_json_lines(good, REVIEW_FIELDS, required=(), chunk_bytes=100)]
    assert len(chunks) > 3 and sum(c.height for c in chunks) == 33
    assert [t for c in chunks for t in c["unixReviewTime"]] == list(range(33))


def test_d3_unparseable_list(tmp_path):
    train = "user_id,history_item_id,item_id\nu,[0],1\nu,\"[0, two]\",2\n"
    assert "train.csv:3: history_item_id '[0, two]' is not a list" in fail(tmp_path, *d3_args(tmp_path, **{"train.csv": train}))


def test_d3_id_not_in_info(tmp_path):
    assert "valid.csv:2: item id(s) not in" in fail(tmp_path, *d3_args(tmp_path, **{"valid.csv": "user_id,history_item_id,item_id\nu,[0],9\n"}))


def test_d3_title_mismatch(tmp_path):
    test = "user_id,history_item_id,item_id,item_title\nu,[0],1,Halo 4\n"
    assert "test.csv:2: item_title 'Halo 4' differs" in fail(tmp_path, *d3_args(tmp_path, **{"test.csv": test}))


def test_d3_info_empty_title(tmp_path):
    assert "info.txt:2: empty title" in fail(tmp_path, *d3_args(tmp_path, **{"info.txt": "A\t0\n \t1\n"}))


def test_failed_rerun_keeps_the_previous_artifact(tmp_path):
    args = interactions_files(tmp_path, GOOD)
    run_dir = tmp_path / "run"
    assert CliRunner().invoke(app, ["preprocess", "--run-dir", str(run_dir), *args]).exit_code == 0
    before = (run_dir / "data" / "stage.json").read_text()
    (tmp_path / "items.csv").write_text("item_id,title\na,\nb,Beta\n")
    result = CliRunner().invoke(app, ["preprocess", "--run-dir", str(run_dir), *args])
    assert result.exit_code != 0 and "items.csv:2: empty title" in result.output
    assert (run_dir / "data" / "stage.json").read_text() == before
    assert not list((run_dir / ".partial").iterdir())


# ---------------------------------------------------------------- damaged or implausible input (issue 8)


def truncated_gzip(text: str) -> bytes:
    # Enough incompressible-ish rows that half the stream ends mid-block, not inside the trailer.
    data = gzip.compress(text.encode())
    return data[: len(data) // 2]


def test_truncated_gzip_interactions_csv(tmp_path):
    rows = "".join(f"u{i % 97},{'ab'[i % 2]},{i}\n" for i in range(20000))
    args = interactions_files(tmp_path, truncated_gzip("user_id,item_id,timestamp\n" + rows))
    assert "inter.csv: truncated gzip file" in fail(tmp_path, *args)


def test_truncated_gzip_amazon_reviews(tmp_path):
    args = amazon_args(tmp_path, [{"reviewerID": "u", "asin": "A", "unixReviewTime": 1}])
    reviews = "".join(json.dumps({"reviewerID": f"u{i}", "asin": "A", "unixReviewTime": 1500000000 + i}) + "\n" for i in range(5000))
    (tmp_path / "reviews.json.gz").write_bytes(truncated_gzip(reviews))
    assert "reviews.json.gz: truncated gzip file" in fail(tmp_path, *args)


def test_corrupt_gzip_meta(tmp_path):
    args = amazon_args(tmp_path, [{"reviewerID": "u", "asin": "A", "unixReviewTime": 1}])
    data = bytearray(gzip.compress(b"".join(b'{"asin": "A%d", "title": "Game"}\n' % i for i in range(3000))))
    data[len(data) // 2] ^= 0xFF  # one damaged byte in the deflate stream
    (tmp_path / "meta.json.gz").write_bytes(bytes(data))
    message = fail(tmp_path, *args)
    assert "meta.json.gz: corrupt gzip file" in message, message


def test_millisecond_timestamps_are_refused_with_the_fix(tmp_path):
    inter = "user_id,item_id,timestamp\n" + "".join(f"u,{'ab'[i % 2]},{1588888888000 + i}\n" for i in range(8))
    message = fail(tmp_path, *interactions_files(tmp_path, inter))
    assert "inter.csv:2: timestamp '1588888888000' is after the year 2100" in message and "milliseconds: divide the column by 1000" in message


def test_negative_timestamp_is_refused(tmp_path):
    inter = GOOD.replace("v,a,7", "v,a,-7")
    assert "inter.csv:8: timestamp '-7' is before 1970" in fail(tmp_path, *interactions_files(tmp_path, inter))


def test_timestamp_range_edges_are_accepted(tmp_path):
    """0 (1970-01-01) and 2100-01-01 itself are fine; one second later is not."""
    import polars as pl

    from igdrec.sources.tables import LATEST_TIMESTAMP_S, parse_timestamps

    path = tmp_path / "x.csv"
    path.write_text("t\n")
    assert parse_timestamps(pl.Series("t", ["0", str(LATEST_TIMESTAMP_S)]), path).to_list() == [0, LATEST_TIMESTAMP_S]
    with pytest.raises(IgdrecError, match=r"x\.csv:3: timestamp .* after the year 2100"):
        parse_timestamps(pl.Series("t", ["0", str(LATEST_TIMESTAMP_S + 1)]), path)
    with pytest.raises(IgdrecError, match=r"x\.csv:2: timestamp .* before 1970"):
        parse_timestamps(pl.Series("t", ["1960-05-01"]), path)


def test_text_file_named_parquet_is_not_read_as_csv(tmp_path):
    args = interactions_files(tmp_path, GOOD)
    fake = tmp_path / "inter.parquet"
    fake.write_text(GOOD)
    args[args.index("--interactions") + 1] = str(fake)
    assert "inter.parquet: named .parquet but is not a Parquet file (it starts with b'user'" in fail(tmp_path, *args)


@pytest.mark.parametrize("windows, empty", [(1, "train and valid"), (2, "valid"), (5, "valid")])
def test_too_few_windows_for_a_split_are_refused(tmp_path, windows, empty):
    inter = "user_id,item_id,timestamp\n" + "".join(f"u,{'ab'[i % 2]},{i}\n" for i in range(windows + 1))
    message = fail(tmp_path, *interactions_files(tmp_path, inter))
    assert f"interactions: the temporal 80/10/10 split of {windows} sample(s) leaves {empty} empty; at least 6 are needed" in message


def test_smallest_splittable_count_is_the_first_that_fills_every_split():
    import polars as pl

    from igdrec.sources.windows import smallest_splittable, temporal_split

    def sizes(n):
        windows = pl.DataFrame({"user_id": ["u"] * n, "history_item_ids": [[0]] * n, "item_id": [1] * n, "timestamp": list(range(n))})
        return [part.height for part in temporal_split(windows).values()]

    fills = [n for n in range(1, 40) if min(sizes(n)) > 0]
    assert fills == list(range(smallest_splittable(), 40))


def test_d3_empty_given_split_is_refused(tmp_path):
    args = d3_args(tmp_path, **{"valid.csv": "user_id,history_item_id,item_id\n"})
    assert "d3-csv: --valid holds no samples" in fail(tmp_path, *args)


def test_absurdly_long_title_is_refused(tmp_path):
    message = fail(tmp_path, *interactions_files(tmp_path, GOOD, "item_id,title\na,Alpha\nb," + "B" * 200_000 + "\n"))
    assert "interactions: item 1 has a title of 200,000 characters ('BBBB" in message
    assert "over the limit of 500 (max_title_chars / --max-title-chars)" in message


def test_title_limit_is_an_option_and_inclusive(tmp_path):
    from igdrec.config import PreprocessConfig
    from igdrec.rundir import RunDir
    from igdrec.stages import preprocess

    interactions_files(tmp_path, GOOD, "item_id,title\na,Alpha\nb,Bet\n")
    config = dict(source="interactions", interactions=str(tmp_path / "inter.csv"), items=str(tmp_path / "items.csv"))
    assert preprocess.run(PreprocessConfig(**config, max_title_chars=5), RunDir(tmp_path / "ok"))["stats"]["title_chars_max"] == 5
    with pytest.raises(IgdrecError, match=r"item 0 has a title of 5 characters \('Alpha'\), over the limit of 4"):
        preprocess.run(PreprocessConfig(**config, max_title_chars=4), RunDir(tmp_path / "short"))
    assert not (tmp_path / "short" / "data").exists()
