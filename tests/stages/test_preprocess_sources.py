"""Each preprocess source on small files written here in the real formats."""

import os
import random
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest
from preprocess_inputs import D3_TITLES, write_d3_inputs, write_json_lines, write_reference_csv

from igdrec import assets, schema
from igdrec.config import PreprocessConfig
from igdrec.rundir import RunDir
from igdrec.sources.amazon2018 import k_core, read_titles
from igdrec.stages import preprocess


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Input fingerprints are memoised in the cache: keep the tests' out of the user's."""
    monkeypatch.setenv("IGDREC_CACHE", str(tmp_path / "cache"))

# ---------------------------------------------------------------- input writers (shared ones: tests/helpers/preprocess_inputs.py)


def write_recbole(directory: Path, ratings, movies) -> dict:
    inter = directory / "ml-100k.inter"
    item = directory / "ml-100k.item"
    inter.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(f"{u}\t{i}\t3\t{t}\n" for u, i, t in ratings))
    item.write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(f"{i}\t{title}\t{year}\tDrama\n" for i, title, year in movies)
    )
    return {"recbole/dataset_example/ml-100k/ml-100k.inter": inter, "recbole/dataset_example/ml-100k/ml-100k.item": item}


def day(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp())


def run_stage(tmp_path: Path, **options) -> tuple[dict, RunDir]:
    run = RunDir(tmp_path / "run")
    manifest = preprocess.run(PreprocessConfig(**options), run)
    return manifest, run


def read_outputs(run: RunDir):
    items = schema.read(run.artifact("data", "items.parquet"), "items")
    splits = {s: schema.read(run.artifact("data", f"{s}.parquet"), "samples") for s in ("train", "valid", "test")}
    return items, splits


# ---------------------------------------------------------------- ml-100k (RecBole atomic files)


def test_ml100k_atomic_files(tmp_path, monkeypatch):
    # user 99 only brings the windows to six, the fewest whose 80/10/10 split leaves no split empty
    ratings = [(7, 10, 5), (7, 30, 1), (8, 10, 2), (7, 20, 3), (8, 20, 9), (9, 30, 4), (9, 10, 6), (99, 10, 100), (99, 20, 101), (99, 30, 102)]
    movies = [(10, "Toy Story", 1995), (20, "Heat", "unkonwn"), (30, "Se7en, \"the\" film", 1995), (40, "Never Rated", 1999)]
    files = write_recbole(tmp_path, ratings, movies)
    monkeypatch.setattr(assets, "fetch", lambda asset: files)
    manifest, run = run_stage(tmp_path)
    items, splits = read_outputs(run)
    # ids in item-file order, items nobody rated are left out, a non-year release_year is omitted
    assert items.rows() == [(0, "Toy Story (1995)"), (1, "Heat"), (2, 'Se7en, "the" film (1995)')]
    stats = manifest["stats"]
    assert stats["source"] == "ml-100k" and stats["category_word"] == "movies"
    assert (stats["users"], stats["interactions"], stats["windows"], stats["items_without_interactions"]) == (4, 10, 6, 1)
    # user 7: 30@1, 20@3, 10@5 ; user 8: 10@2, 20@9 ; user 9: 30@4, 10@6 ; user 99: 10@100, 20@101, 30@102
    # (ids: 10->0, 20->1, 30->2)
    windows = [(r[1], r[2], r[3], r[4]) for s in ("train", "valid", "test") for r in splits[s].rows()]
    assert windows == [("7", [2], 1, 3), ("7", [2, 1], 0, 5), ("9", [2], 0, 6), ("8", [0], 1, 9), ("99", [0], 1, 101), ("99", [0, 1], 2, 102)]


# ---------------------------------------------------------------- amazon2018


def test_amazon_title_filter(tmp_path):
    meta = [
        {"asin": "A1", "title": "  &quot;Quoted&quot; &amp; Co  "},
        {"asin": "A2"},  # no title
        {"asin": "A3", "title": '<span id="x">Bad</span>'},
        {"asin": "A4", "title": "X"},  # one character
        {"asin": "A5", "title": " ".join(["w"] * 21)},  # 21 words
        {"asin": "A6", "title": " ".join(["w"] * 20), "price": "$1"},
        {"asin": "A7", "title": "Listed twice"},
        {"asin": "A7", "title": "Y"},  # a failing second listing drops the item
        {"asin": "A8", "title": "Old title"},
        {"asin": "A8", "title": "New title"},  # the last good listing wins
    ]
    titles, stats = read_titles(write_json_lines(tmp_path / "meta.json.gz", meta))
    assert dict(titles.rows()) == {"A1": 'Quoted" & Co', "A6": " ".join(["w"] * 20), "A8": "New title"}
    assert stats == {"meta_records": 10, "items_with_title": 3}


def brute_k_core(reviews, k):
    while True:
        users, items = {}, {}
        for user, item in reviews:
            users[user] = users.get(user, 0) + 1
            items[item] = items.get(item, 0) + 1
        kept = [(u, i) for u, i in reviews if users[u] >= k and items[i] >= k]
        if kept == reviews:
            return kept
        reviews = kept


def test_k_core_cascades_until_stable():
    # C has one review -> gone; then u3 has one review -> gone; A and B keep two each.
    reviews = pl.DataFrame({"user": ["u1", "u1", "u2", "u2", "u3", "u3"], "asin": ["A", "B", "A", "B", "A", "C"], "time": [0] * 6})
    kept, iterations = k_core(reviews, 2)
    assert list(zip(kept["user"], kept["asin"])) == [("u1", "A"), ("u1", "B"), ("u2", "A"), ("u2", "B")]
    assert iterations == 3

    rng = random.Random(3)
    pairs = [(f"u{rng.randint(0, 40)}", f"i{rng.randint(0, 25)}") for _ in range(600)]
    frame = pl.DataFrame({"user": [u for u, _ in pairs], "asin": [i for _, i in pairs], "time": [0] * len(pairs)})
    kept, _ = k_core(frame, 5)
    assert list(zip(kept["user"], kept["asin"])) == brute_k_core(pairs, 5)


def amazon_inputs(tmp_path):
    """Two items in the default window; two more only when the window starts a year earlier."""
    meta = [{"asin": a, "title": f"Game {a}"} for a in ("A", "B", "C", "D")] + [{"asin": "E"}]
    reviews = []
    # six users of A and B: enough windows for an 80/10/10 split with no empty part, even in the narrow window
    for user in ("u1", "u2", "u6", "u7", "u8", "u9"):
        reviews += [{"reviewerID": user, "asin": a, "unixReviewTime": day(d), "overall": 5.0, "reviewText": "ok, \"fine\""}
                    for a, d in (("A", "2018-01-05"), ("B", "2018-02-05"))]
    for user in ("u3", "u4"):
        reviews += [{"reviewerID": user, "asin": a, "unixReviewTime": day(d)} for a, d in (("C", "2017-03-01"), ("D", "2017-04-01"))]
    reviews += [
        {"reviewerID": "u1", "asin": "E", "unixReviewTime": day("2018-03-01")},  # untitled item
        {"reviewerID": "u1", "asin": "C", "unixReviewTime": day("2019-01-01")},  # after the window
        {"reviewerID": "u5", "asin": "A", "unixReviewTime": day("2018-11-01")},  # the end day counts; u5 has 1 review
    ]
    return {
        "reviews": str(write_json_lines(tmp_path / "Video_Games.json.gz", reviews)),
        "meta": str(write_json_lines(tmp_path / "meta_Video_Games.json", meta, compress=False)),
        "category": "Video_Games",
    }


def test_amazon_year_extension_and_ids(tmp_path):
    files = amazon_inputs(tmp_path)
    manifest, run = run_stage(tmp_path, source="amazon2018", k_core=2, min_items=3, **files)
    stats = manifest["stats"]
    assert stats["window"] == "2016-10-01 .. 2018-11-01" and stats["window_years_extended"] == 1
    assert stats["category_word"] == "video games" and stats["items"] == 4 and stats["interactions"] == 16
    items, splits = read_outputs(run)
    first_seen = ["A", "B", "C", "D"]
    random.Random(42).shuffle(first_seen)  # the reference numbering: first-review order, seeded shuffle
    assert items["title"].to_list() == [f"Game {a}" for a in first_seen]

    narrow, _ = run_stage(tmp_path / "narrow", source="amazon2018", k_core=2, min_items=2, **files)
    assert narrow["stats"]["window_years_extended"] == 0 and narrow["stats"]["items"] == 2

    never_enough, _ = run_stage(tmp_path / "floor", source="amazon2018", k_core=2, min_items=99, earliest_year=2015, **files)
    assert never_enough["stats"]["window"] == "2015-10-01 .. 2018-11-01" and never_enough["stats"]["items"] == 4


def test_amazon_is_deterministic_and_seed_changes_ids(tmp_path):
    files = amazon_inputs(tmp_path)
    ids = []
    for name, seed in (("a", 42), ("b", 42), ("c", 1)):
        _, run = run_stage(tmp_path / name, source="amazon2018", k_core=2, min_items=3, seed=seed, **files)
        ids.append(read_outputs(run)[0]["title"].to_list())
    assert ids[0] == ids[1] and sorted(ids[0]) == sorted(ids[2])


# ---------------------------------------------------------------- d3-csv


@pytest.mark.parametrize("extra_column", [False, True])
def test_d3_csv_keeps_the_given_splits(tmp_path, extra_column):
    files = write_d3_inputs(tmp_path, extra_column=extra_column)
    manifest, run = run_stage(tmp_path, source="d3-csv", category="Video_Games", **files)
    items, splits = read_outputs(run)
    assert items.rows() == sorted(D3_TITLES.items())  # dense ids already: unchanged
    assert [r[1:] for r in splits["train"].rows()] == [("u1", [0], 1, 100), ("u1", [0, 1], 2, 200), ("u2", [3], 0, 150)]
    assert [r[1:] for r in splits["test"].rows()] == [("u1", [0, 1, 2], 3, 400)]
    assert manifest["stats"]["windows"] == 5 and manifest["stats"]["category_word"] == "video games"


def test_d3_csv_renumbers_sparse_ids(tmp_path):
    info = tmp_path / "info.txt"
    info.write_text("Beta\t50\nAlpha\t7\n")
    rows = [("u", [50], 7, 1)]
    paths = {s: str(write_reference_csv(tmp_path / f"{s}.csv", rows, {7: "Alpha", 50: "Beta"})) for s in ("train", "valid", "test")}
    _, run = run_stage(tmp_path, source="d3-csv", info=str(info), **paths)
    items, splits = read_outputs(run)
    assert items.rows() == [(0, "Alpha"), (1, "Beta")]
    assert splits["valid"].rows() == [(0, "u", [1], 0, 1)]


# ---------------------------------------------------------------- interactions (CSV and Parquet)


# user z only brings the windows to six, the fewest whose 80/10/10 split leaves no split empty
INTERACTIONS = {"uid": ["x", "y", "x", "y", "x", "x", "z", "z", "z"], "iid": ["i2", "i1", "i1", "i2", "i3", "i1", "i1", "i2", "i3"],
                "when": [5, 1, 7, 3, 9, 9, 20, 21, 22]}
ITEMS = {"iid": ["i1", "i2", "i3", "i9"], "name": ["One, \"first\"", "Two", "Three", "Unused"]}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_interactions_csv_and_parquet(tmp_path, fmt):
    inter, items = tmp_path / f"inter.{fmt}", tmp_path / f"items.{fmt}"
    getattr(pl.DataFrame(INTERACTIONS), f"write_{fmt}")(inter)
    getattr(pl.DataFrame(ITEMS), f"write_{fmt}")(items)
    manifest, run = run_stage(tmp_path, source="interactions", interactions=str(inter), items=str(items),
                              user_col="uid", item_col="iid", time_col="when", title_col="name")
    items_out, splits = read_outputs(run)
    assert items_out.rows() == [(0, 'One, "first"'), (1, "Two"), (2, "Three")]
    windows = [r[1:] for s in ("train", "valid", "test") for r in splits[s].rows()]
    # x: i2@5, i1@7, i3@9, i1@9 (tie: input order) ; y: i1@1, i2@3 -- a duplicate (x, i1) is kept ; z: i1, i2, i3
    assert windows == [("y", [0], 1, 3), ("x", [1], 0, 7), ("x", [1, 0], 2, 9), ("x", [1, 0, 2], 0, 9), ("z", [0], 1, 21), ("z", [0, 1], 2, 22)]
    assert manifest["stats"]["items_without_interactions"] == 1


def test_interactions_drop_unknown_and_date_strings(tmp_path):
    inter = tmp_path / "inter.csv"
    # user w's five earlier windows make the split's parts non-empty; u's one window is the test split
    earlier = "".join(f"w,{'ab'[d % 2]},2019-01-0{d}\n" for d in range(1, 7))
    inter.write_text("user_id,item_id,timestamp\nu,a,2020-01-02\nu,zz,2020-01-03\nu,b,2020-01-01T12:00:00\n" + earlier)
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\na,Alpha\nb,Beta\n")
    manifest, run = run_stage(tmp_path, source="interactions", interactions=str(inter), items=str(items), drop_unknown=True)
    _, splits = read_outputs(run)
    assert manifest["stats"]["dropped_unknown_item_interactions"] == 1
    assert splits["test"].rows() == [(0, "u", [1], 0, day("2020-01-02"))]


def test_d3_csv_accepts_quoted_id_lists(tmp_path):
    files = write_d3_inputs(tmp_path)
    Path(files["valid"]).write_text("user_id,history_item_id,item_id\nu2,\"['3', '0']\",1\n")
    _, run = run_stage(tmp_path, source="d3-csv", **files)
    assert read_outputs(run)[1]["valid"]["history_item_ids"].to_list() == [[3, 0]]


def test_interactions_parquet_datetimes(tmp_path):
    stamps = [datetime(2021, 5, d, tzinfo=timezone.utc) for d in (3, 1, 2)]
    earlier = [datetime(2021, 4, d, tzinfo=timezone.utc) for d in range(1, 6)]  # user 2: four windows before user 1's
    pl.DataFrame({"user_id": [1, 1, 1] + [2] * 5, "item_id": [10, 11, 12] + [10, 11] * 2 + [12], "timestamp": stamps + earlier}).write_parquet(tmp_path / "i.parquet")
    pl.DataFrame({"item_id": [10, 11, 12], "title": ["A", "B", "C"]}).write_parquet(tmp_path / "t.parquet")
    _, run = run_stage(tmp_path, source="interactions", interactions=str(tmp_path / "i.parquet"), items=str(tmp_path / "t.parquet"))
    rows = [r[1:] for s in ("train", "valid", "test") for r in read_outputs(run)[1][s].rows()]
    assert rows[-2:] == [("1", [1], 2, day("2021-05-02")), ("1", [1, 2], 0, day("2021-05-03"))] and len(rows) == 6


def test_input_fingerprint_is_memoised_by_stat(tmp_path, monkeypatch):
    from igdrec.sources import tables

    path = tmp_path / "data.csv"
    path.write_text("a\n1\n")
    os.utime(path, (1e9, 1e9))  # old enough to be memoised
    first = tables.file_fingerprint(path)
    monkeypatch.setattr(tables, "fingerprint_file", lambda p: pytest.fail("re-hashed an unchanged file"))
    assert tables.file_fingerprint(path) == first
    monkeypatch.undo()
    monkeypatch.setenv("IGDREC_CACHE", str(tmp_path / "cache"))
    path.write_text("a\n2\n")  # same size, new content and mtime
    assert tables.file_fingerprint(path) != first
