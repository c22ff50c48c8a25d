"""Source `recbole`: RecBole atomic files, on the real ml-100k files of the recbole wheel and on small
files written here in the atomic format, with the refusals for bad files."""

from pathlib import Path

import polars as pl
import pytest
from preprocess_inputs import fail
from windows_reference import as_tuples, brute_force

from igdrec import assets, options, schema
from igdrec.config import PreprocessConfig
from igdrec.rundir import RunDir
from igdrec.sources import ml100k
from igdrec.stages import preprocess

USER_CACHE = assets.cache_root()  # where the fetched wheel's files are (read before the fixture below moves the cache)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Input fingerprints are memoised in the cache: keep the tests' out of the user's."""
    monkeypatch.setenv("IGDREC_CACHE", str(tmp_path / "cache"))


def run(tmp_path: Path, name: str, **options) -> tuple[dict, pl.DataFrame, dict]:
    run_dir = RunDir(tmp_path / name)
    manifest = preprocess.run(PreprocessConfig(**options), run_dir)
    items = schema.read(run_dir.artifact("data", "items.parquet"), "items")
    splits = {s: schema.read(run_dir.artifact("data", f"{s}.parquet"), "samples") for s in ("train", "valid", "test")}
    return manifest, items, splits


@pytest.mark.network
def test_recbole_source_on_the_wheels_ml100k_equals_the_ml100k_source(tmp_path, monkeypatch):
    monkeypatch.setenv("IGDREC_CACHE", str(USER_CACHE))
    files = assets.fetch(assets.ML100K)  # downloads the pinned wheel only if the cache lacks it
    folder = Path(files[ml100k.INTER_MEMBER]).parent
    assert folder.name == "ml-100k" and Path(files[ml100k.ITEM_MEMBER]).parent == folder
    monkeypatch.setenv("IGDREC_CACHE", str(tmp_path / "cache"))

    embedded, items, splits = run(tmp_path, "embedded", source="ml-100k")
    atomic, atomic_items, atomic_splits = run(tmp_path, "atomic", source="recbole", dataset_dir=str(folder))  # every field option at its default
    assert atomic_items.equals(items)
    for split in splits:
        assert atomic_splits[split].equals(splits[split]), split
    # ...and both are MovieLens-100K as documented (docs/method.md §2.2), not the same mistake twice
    assert (items.height, sum(s.height for s in splits.values())) == (1682, 99_057)
    assert [splits[s].height for s in ("train", "valid", "test")] == [79_245, 9_906, 9_906]
    assert items["title"][0] == "Toy Story (1995)" and items["title"][266] == "unkonwn"
    assert atomic["stats"]["category_word"] == embedded["stats"]["category_word"] == "movies"
    same = {k: v for k, v in embedded["stats"].items() if k != "source"}
    assert {k: v for k, v in atomic["stats"].items() if k != "source"} == same


# ---------------------------------------------------------------- small atomic files

INTER_HEADER = "review_id:token\tuser_id:token\tbusiness_id:token\tstars:float\tdate:float\ttags:token_seq\tvec:float_seq\n"
ITEM_HEADER = "business_id:token\tname:token_seq\tcity:token\n"
BUSINESSES = [("b1", 'Joe\'s "Best"  Pizza', "Austin"), ("b2", "Taco Place", ""), ("b3", "Never Visited", "Reno")]


def write_atomic(folder: Path, name: str, inter_rows, item_rows=BUSINESSES, newline="\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    inter = INTER_HEADER + "".join(f"r{k}\t{u}\t{b}\t4\t{t}\tgood food\t0.5 1.5\n" for k, (u, b, t) in enumerate(inter_rows))
    items = ITEM_HEADER + "".join("\t".join(row) + "\n" for row in item_rows)
    (folder / f"{name}.inter").write_bytes(inter.replace("\n", newline).encode())
    (folder / f"{name}.item").write_bytes(items.replace("\n", newline).encode())
    return folder


# user u1: b2@30, b1@10 (the file is not in time order); u2: b1@20, b2@40, b1@50; u3: b2@60, b1@70; u4: three at 80
VISITS = [("u1", "b2", 30), ("u1", "b1", 10), ("u2", "b1", 20), ("u2", "b2", 40), ("u2", "b1", 50), ("u3", "b2", 60), ("u3", "b1", 70),
          ("u4", "b1", 80), ("u4", "b2", 80), ("u4", "b1", 80)]
WINDOWS = len(VISITS) - 4  # one per visit after a user's first: six, the fewest whose split leaves no part empty
YELP_FIELDS = {"item_field": "business_id", "time_field": "date", "title_field": "name", "year_field": None}


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_recbole_fields_from_options_and_windows_by_brute_force(tmp_path, newline):
    folder = write_atomic(tmp_path / "some-folder", "yelp-small", VISITS, newline=newline)
    manifest, items, splits = run(tmp_path, "run", source="recbole", dataset_dir=str(folder), dataset_name="yelp-small", **YELP_FIELDS)
    # ids in .item order, unvisited b3 left out; a token_seq title is its text as written, quotes and all
    assert items.rows() == [(0, 'Joe\'s "Best"  Pizza'), (1, "Taco Place")]
    dense = {"b1": 0, "b2": 1}
    expected = brute_force([(u, dense[b], t) for u, b, t in VISITS], history_len=10)
    assert [as_tuples(splits[s]) for s in ("train", "valid", "test")] == list(expected)
    assert manifest["stats"]["category_word"] == "items"  # "yelp-small" has no word of its own


def test_blank_lines_are_skipped_and_later_lines_keep_their_numbers(tmp_path):
    folder = write_atomic(tmp_path / "d", "d", VISITS)
    inter = folder / "d.inter"
    lines = inter.read_text().splitlines(keepends=True)
    inter.write_text("".join(lines[:3] + ["\n"] + lines[3:]) + "\n\n")
    _, items, splits = run(tmp_path, "blank", source="recbole", dataset_dir=str(folder), **YELP_FIELDS)
    assert sum(s.height for s in splits.values()) == WINDOWS

    lines[5] = lines[5].replace("\t50\t", "\tlater\t")  # u2's third visit, line 6 of the file; line 7 after the blank line
    inter.write_text("".join(lines[:3] + ["\n"] + lines[3:]))
    message = fail(tmp_path, "--source", "recbole", "--dataset-dir", str(folder), *yelp_flags())
    assert message == f"error: {inter}:7: timestamp 'later' is not a number or a date"


def yelp_flags() -> list[str]:
    return ["--item-field", "business_id", "--time-field", "date", "--title-field", "name", "--year-field", "none"]


def test_title_with_year_and_the_prompt_word_from_the_dataset_name(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ml-1m.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(f"{u}\t{i}\t5\t{t}\n" for u, i, t in VISITS)
    )
    (folder / "ml-1m.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tgenre:token_seq\n"
        "b1\tHeat \t1995\tAction Crime\nb2\tSolaris\t\tDrama\n"
    )
    manifest, items, _ = run(tmp_path, "run", source="recbole", dataset_dir=str(folder))
    assert items.rows() == [(0, "Heat (1995)"), (1, "Solaris")]  # an empty year is no year
    assert manifest["stats"]["category_word"] == "movies" and manifest["stats"]["items_without_year"] == 1


def test_key_holds_the_field_options_and_inputs_enter_by_content(tmp_path):
    config = PreprocessConfig(source="recbole", dataset_dir="/a/ml-1m")
    params = options.key_params(config)
    assert {"user_field", "item_field", "time_field", "title_field", "year_field"} <= set(params)
    assert "dataset_dir" not in params and "dataset_name" not in params
    for other in ("ml-100k", "amazon2018", "interactions"):  # inert for every other source
        assert not {"title_field", "year_field", "dataset_dir"} & set(options.key_params(PreprocessConfig(source=other)))
    assert "drop_unknown" in params and "drop_missing" in params


# ---------------------------------------------------------------- refusals


def recbole_args(folder: Path, *extra) -> list[str]:
    return ["--source", "recbole", "--dataset-dir", str(folder), *yelp_flags(), *extra]


def test_near_miss_field_name_gets_a_did_you_mean(tmp_path):
    folder = write_atomic(tmp_path / "d", "d", VISITS)
    message = fail(tmp_path, *recbole_args(folder, "--title-field", "nmae"))
    assert message == (
        f"error: {folder / 'd.item'}:1: no field 'nmae' (given as --title-field); the header has business_id, name, city "
        "(did you mean 'name'?)"
    )
    message = fail(tmp_path, "--source", "recbole", "--dataset-dir", str(folder), "--item-field", "business_id",
                   "--time-field", "date", "--title-field", "name")
    assert message.endswith("no field 'release_year' (given as --year-field); the header has business_id, name, city; "
                            "--year-field none appends no year")


@pytest.mark.parametrize("header, why", [
    ("review_id:token\tuser_id:token\tbusiness_id:token\tstars:flaot\tdate:float\ttags:token_seq\tvec:float_seq",
     "field 'stars' has type 'flaot'; RecBole's types are token, token_seq, float, float_seq (did you mean 'float'?)"),
    ("review_id:token\tuser_id\tbusiness_id:token\tstars:float\tdate:float\ttags:token_seq\tvec:float_seq",
     "header field 'user_id' is not name:type (RecBole atomic files type every field, e.g. user_id:token)"),
    ("review_id:token\tuser_id:token\tbusiness_id:token\tstars:float\tdate:float\ttags:token_seq\tdate:float_seq",
     "field 'date' appears twice in the header"),
    ("review_id:token\tuser_id:token\tbusiness_id:float\tstars:float\tdate:float\ttags:token_seq\tvec:float_seq",
     "field 'business_id' (--item-field) has type float; expected token"),
])
def test_bad_header(tmp_path, header, why):
    folder = write_atomic(tmp_path / "d", "d", VISITS)
    inter = folder / "d.inter"
    inter.write_text(header + "\n" + inter.read_text().split("\n", 1)[1])
    assert fail(tmp_path, *recbole_args(folder)) == f"error: {inter}:1: {why}"


@pytest.mark.parametrize("line, fields", [("r9\tu9\tb1\t4\t99\tgood\n", 6), ("r9\tu9\tb1\t4\t99\tgood\t1\t2\n", 8)])
def test_row_with_the_wrong_number_of_fields_names_its_line(tmp_path, line, fields):
    folder = write_atomic(tmp_path / "d", "d", VISITS)
    inter = folder / "d.inter"
    lines = inter.read_text().splitlines(keepends=True)
    inter.write_text("".join(lines[:4] + [line] + lines[4:]))
    assert fail(tmp_path, *recbole_args(folder)) == (
        f"error: {inter}:5: {fields} tab-separated fields, but the header has 7 (atomic files separate fields by tabs and do not quote)"
    )


def test_missing_dataset_file_names_what_the_folder_holds(tmp_path):
    folder = write_atomic(tmp_path / "data", "ml-1m", VISITS)
    message = fail(tmp_path, *recbole_args(folder, "--dataset-name", "ml-1n"))
    assert message == (
        f"error: {folder / 'ml-1n.inter'}: file not found (RecBole data set 'ml-1n' in --dataset-dir; it holds ml-1m.inter; "
        "--dataset-name picks one) (did you mean 'ml-1m'?)"
    )
    assert fail(tmp_path, *recbole_args(folder)).startswith(f"error: {folder / 'data.inter'}: file not found")
    assert fail(tmp_path, *recbole_args(folder, "--dataset-name", "../x")) == (
        "error: --dataset-name '../x': expected a file name stem such as ml-1m, not a path"
    )
    assert fail(tmp_path, "--source", "recbole") == "error: --dataset-dir is required for --source recbole (the folder with NAME.inter and NAME.item)"


def test_missing_ids_and_untitled_items_are_refused_or_dropped(tmp_path):
    visits = VISITS + [("", "b1", 99)]
    folder = write_atomic(tmp_path / "d", "d", visits)
    inter = folder / "d.inter"
    line = len(visits) + 1
    message = fail(tmp_path, *recbole_args(folder))
    assert message.startswith(f"error: {inter}:{line}: missing user_id (") and message.endswith("--drop-missing drops them")
    inter.write_text(inter.read_text().replace("r2\tu2", "\nr2\tu2") + "\n")  # a blank line before it, one after
    assert fail(tmp_path, *recbole_args(folder)).startswith(f"error: {inter}:{line + 1}: missing user_id (")
    manifest, _, splits = run(tmp_path, "dropped", source="recbole", dataset_dir=str(folder), drop_missing=True, **YELP_FIELDS)
    assert sum(s.height for s in splits.values()) == WINDOWS and manifest["stats"]["dropped_missing_id_interactions"] == 1

    visits = VISITS + [("u3", "b4", 99)]  # b4 has an empty title
    folder = write_atomic(tmp_path / "e", "e", visits, item_rows=BUSINESSES + [("b4", "", "Reno")])
    assert fail(tmp_path, *recbole_args(folder)) == f"error: {folder / 'e.item'}:5: empty title ('title')"

    manifest, items, splits = run(tmp_path, "untitled", source="recbole", dataset_dir=str(folder), drop_unknown=True, **YELP_FIELDS)
    assert items["title"].to_list() == ['Joe\'s "Best"  Pizza', "Taco Place"] and sum(s.height for s in splits.values()) == WINDOWS
    assert manifest["stats"]["dropped_untitled_items"] == 1 and manifest["stats"]["dropped_unknown_item_interactions"] == 1


def test_non_utf8_line_is_named(tmp_path):
    folder = write_atomic(tmp_path / "d", "d", VISITS)
    item = folder / "d.item"
    item.write_bytes(item.read_bytes().replace(b"Taco", b"T\xe1co"))
    assert fail(tmp_path, *recbole_args(folder)) == f"error: {item}:3: not valid UTF-8 (byte 5 of the line)"
