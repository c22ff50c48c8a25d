"""Source `amazon2023`: Amazon Reviews 2023 JSON lines on small files written here in that layout; the same
rules as `amazon2018` (shown by running the 2018 source on the same data in the 2018 layout) and the same
refusals for bad files."""

import json
import random
from datetime import datetime, timezone
from pathlib import Path

import pytest
from preprocess_inputs import fail, write_json_lines

from igdrec import options, schema
from igdrec.config import PreprocessConfig
from igdrec.rundir import RunDir
from igdrec.stages import preprocess


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Input fingerprints are memoised in the cache: keep the tests' out of the user's."""
    monkeypatch.setenv("IGDREC_CACHE", str(tmp_path / "cache"))


def ms(text: str) -> int:
    """Milliseconds since 1970 (UTC) of an ISO time, the 2023 dump's clock."""
    return round(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp() * 1000)


def review(user: str, asin: str, parent: str, time: int) -> dict:
    return {"rating": 5.0, "title": "Great", "text": "ok, \"fine\"", "images": [], "asin": asin, "parent_asin": parent,
            "user_id": user, "timestamp": time, "helpful_vote": 0, "verified_purchase": True}


META = [
    {"main_category": "Video Games", "title": "Game P1", "parent_asin": "P1", "features": [], "details": {"Brand": "X"}},
    {"main_category": "Video Games", "title": "Game P2", "parent_asin": "P2", "price": None},
    {"main_category": "Video Games", "title": "Game P3", "parent_asin": "P3"},
    {"main_category": "Video Games", "title": "Game P4", "parent_asin": "P4"},
    {"main_category": "Video Games", "title": None, "parent_asin": "P5"},  # untitled: its reviews go
    {"main_category": "Video Games", "title": "  &quot;Quoted&quot; &amp; Co  ", "parent_asin": "P6"},
]


def reviews_2023() -> list[dict]:
    reviews = []
    for k, user in enumerate(("u1", "u2", "u3", "u4", "u5", "u6"), start=1):
        second = ms(f"2018-01-0{k}T12:00:00")
        first, then = review(user, "P1-red" if k % 2 else "P1-blue", "P1", second + 300), review(user, "P2", "P2", second + 700)
        # u1's two reviews of one second are listed latest first: the millisecond clock orders them
        reviews += [then, first] if user == "u1" else [first, then]
        reviews.append(review(user, "P6", "P6", second + 5 * 86_400_000))
    reviews += [
        review("u1", "P1-red", "P1", ms("2018-11-01T00:00:00.999")),  # the end second counts to its last millisecond
        review("u2", "P2", "P2", ms("2018-11-01T00:00:01")),  # after it
        review("u3", "P4", "P4", ms("2019-01-01T00:00:00")),  # after the window
        review("u4", "P5", "P5", ms("2018-03-01T00:00:00")),  # untitled item
        review("u7", "P3", "P3", ms("2018-03-01T00:00:00")),  # u7 and P3 have one review each: the 2-core drops them
    ]
    return reviews


def as_2018(reviews: list[dict], meta: list[dict]) -> tuple[list[dict], list[dict]]:
    """The same data in the 2018 layout: seconds, in millisecond order, items keyed by the parent."""
    ordered = sorted(reviews, key=lambda r: r["timestamp"])
    return (
        [{"reviewerID": r["user_id"], "asin": r["parent_asin"], "unixReviewTime": r["timestamp"] // 1000} for r in ordered],
        [{"asin": m["parent_asin"], "title": m["title"]} for m in meta],
    )


def run(tmp_path: Path, name: str, **options):
    run_dir = RunDir(tmp_path / name)
    manifest = preprocess.run(PreprocessConfig(category="Video_Games", k_core=2, min_items=2, **options), run_dir)
    items = schema.read(run_dir.artifact("data", "items.parquet"), "items")
    splits = {s: schema.read(run_dir.artifact("data", f"{s}.parquet"), "samples") for s in ("train", "valid", "test")}
    return manifest, items, splits


@pytest.mark.parametrize("compress", [True, False])
def test_amazon2023_is_the_2018_filter_on_the_2023_layout(tmp_path, compress):
    suffix = ".jsonl.gz" if compress else ".jsonl"
    reviews = write_json_lines(tmp_path / f"Video_Games{suffix}", reviews_2023(), compress)
    meta = write_json_lines(tmp_path / f"meta_Video_Games{suffix}", META, compress)
    manifest, items, splits = run(tmp_path, "2023", source="amazon2023", reviews=str(reviews), meta=str(meta))

    # items are parents (both P1 variants are one item); P3 (2-core), P4 (after the window), P5 (untitled) are gone
    first_reviewed = ["P1", "P2", "P6"]
    random.Random(42).shuffle(first_reviewed)  # the 2018 numbering: first-review order, seeded shuffle
    titles = {"P1": "Game P1", "P2": "Game P2", "P6": 'Quoted" & Co'}
    assert items.rows() == [(i, titles[p]) for i, p in enumerate(first_reviewed)]
    ids = {p: i for i, p in enumerate(first_reviewed)}
    samples = [row for s in ("train", "valid", "test") for row in splits[s].select("user_id", "history_item_ids", "item_id", "timestamp").rows()]
    u1 = [row for row in samples if row[0] == "u1"]
    assert u1[0] == ("u1", [ids["P1"]], ids["P2"], ms("2018-01-01T12:00:00") // 1000)  # P1 before P2 within their second
    assert u1[-1] == ("u1", [ids["P1"], ids["P2"], ids["P6"]], ids["P1"], ms("2018-11-01T00:00:00") // 1000)
    assert len(samples) == 3 + 5 * 2 and manifest["stats"]["category_word"] == "video games"

    # the 2018 source on the same data in its own layout: the same items, windows and statistics
    reviews_2018, meta_2018 = as_2018(reviews_2023(), META)
    reviews_2018 = write_json_lines(tmp_path / "Video_Games.json.gz", reviews_2018)
    meta_2018 = write_json_lines(tmp_path / "meta_Video_Games.json.gz", meta_2018)
    manifest_2018, items_2018, splits_2018 = run(tmp_path, "2018", source="amazon2018", reviews=str(reviews_2018), meta=str(meta_2018))
    assert items.equals(items_2018)
    for split in splits:
        assert splits[split].equals(splits_2018[split]), split
    assert {k: v for k, v in manifest["stats"].items() if k != "source"} == {k: v for k, v in manifest_2018["stats"].items() if k != "source"}


def test_amazon2023_shares_the_2018_options_and_key():
    params = options.key_params(PreprocessConfig(source="amazon2023", category="Toys"))
    same = options.key_params(PreprocessConfig(source="amazon2018", category="Toys"))
    assert params == same | {"source": "amazon2023"}
    assert {"k_core", "start", "end", "min_items", "earliest_year", "seed", "category"} <= set(params)


# ---------------------------------------------------------------- refusals


def args(tmp_path: Path, reviews, meta=META) -> list[str]:
    return ["--source", "amazon2023", "--category", "Video_Games",
            "--reviews", str(write_json_lines(tmp_path / "Video_Games.jsonl.gz", reviews)),
            "--meta", str(write_json_lines(tmp_path / "meta_Video_Games.jsonl.gz", meta))]


GOOD = review("u1", "P1", "P1", ms("2018-01-01T00:00:00"))


@pytest.mark.parametrize("line, why", [
    ('{"user_id": "u2", "parent_asin": "P1", "timestamp": 1514764800000', "malformed JSON (Expecting ',' delimiter at column 66)"),
    (json.dumps({"user_id": "u2", "asin": "P1", "timestamp": 1514764800000}), "missing field 'parent_asin'"),
    (json.dumps({"user_id": "u2", "parent_asin": "P1", "timestamp": "abc"}), "field 'timestamp' is 'abc', expected an integer"),
    (json.dumps({"user_id": "u2", "parent_asin": "P1", "timestamp": None}), "missing field 'timestamp'"),
])
def test_bad_review_line_is_named(tmp_path, line, why):
    assert fail(tmp_path, *args(tmp_path, [GOOD, line])) == f"error: {tmp_path / 'Video_Games.jsonl.gz'}:2: {why}"


def test_bad_meta_and_2018_files_are_named(tmp_path):
    message = fail(tmp_path, *args(tmp_path, [GOOD], meta=[{"title": "Game P1", "asin": "P1"}]))
    assert message == f"error: {tmp_path / 'meta_Video_Games.jsonl.gz'}:1: missing field 'parent_asin'"
    old_layout = {"reviewerID": "u1", "asin": "P1", "unixReviewTime": 1514764800}
    assert fail(tmp_path, *args(tmp_path, [old_layout])) == f"error: {tmp_path / 'Video_Games.jsonl.gz'}:1: missing field 'user_id'"
    assert fail(tmp_path, "--source", "amazon2023") == "error: --category is required for --source amazon2023 (e.g. Video_Games)"
