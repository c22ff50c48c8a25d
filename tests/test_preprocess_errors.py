"""Bad input: a one-line error naming the file (and line or row), a non-zero exit, and no artifacts."""

import gzip
import json

import pytest
from typer.testing import CliRunner

from igdrec.cli import app
from igdrec.errors import IgdrecError
from igdrec.sources.amazon2018 import REVIEW_FIELDS
from igdrec.sources.tables import iter_json_lines
from test_preprocess_sources import write_d3_inputs, write_json_lines


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Input fingerprints are memoised in the cache: keep the tests' out of the user's."""
    monkeypatch.setenv("IGDREC_CACHE", str(tmp_path / "cache"))


def fail(tmp_path, *args):
    """Run `igdrec preprocess ARGS`, check it failed cleanly, return its one-line message."""
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["preprocess", "--run-dir", str(run_dir), *args])
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert not list(run_dir.rglob("stage.json")) and not (run_dir / "data").exists()
    return lines[0]


def interactions_files(tmp_path, inter_text, items_text="item_id,title\na,Alpha\nb,Beta\n"):
    inter, items = tmp_path / "inter.csv", tmp_path / "items.csv"
    inter.write_bytes(inter_text.encode() if isinstance(inter_text, str) else inter_text)
    items.write_bytes(items_text.encode() if isinstance(items_text, str) else items_text)
    return ["--source", "interactions", "--interactions", str(inter), "--items", str(items)]


GOOD = "user_id,item_id,timestamp\nu,a,1\nu,b,2\nv,a,3\nv,b,4\n"


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
    assert "inter.csv:6: item 'zz' is not in" in message and "2 interactions" in message and "--drop-unknown" in message


def test_bad_timestamp(tmp_path):
    assert "inter.csv:3: timestamp 'soon'" in fail(tmp_path, *interactions_files(tmp_path, "user_id,item_id,timestamp\nu,a,1\nu,b,soon\n"))


def test_non_utf8_csv(tmp_path):
    message = fail(tmp_path, *interactions_files(tmp_path, GOOD, b"item_id,title\na,Alpha\nb,B\xffta\n"))
    assert "items.csv:3: not valid UTF-8" in message


def test_run_dir_not_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(app, ["preprocess", "--run-dir", str(blocker / "run"), *interactions_files(tmp_path, GOOD)])
    assert result.exit_code != 0 and "is not writable" in result.output and len(result.output.strip().splitlines()) == 1


def amazon_args(tmp_path, reviews, meta=({"asin": "A", "title": "Game A"},)):
    return ["--source", "amazon2018", "--category", "Video_Games",
            "--reviews", str(write_json_lines(tmp_path / "reviews.json.gz", reviews)),
            "--meta", str(write_json_lines(tmp_path / "meta.json.gz", list(meta)))]


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


def d3_args(tmp_path, **overrides):
    files = write_d3_inputs(tmp_path)
    for name, text in overrides.items():
        (tmp_path / name).write_text(text)
    return ["--source", "d3-csv", *[a for split in ("train", "valid", "test", "info") for a in (f"--{split}", files[split])]]


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
