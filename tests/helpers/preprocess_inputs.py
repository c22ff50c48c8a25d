"""Preprocess inputs written in the real formats, and `fail`: run `igdrec preprocess` and expect a clean refusal.

Shared by the preprocess stage tests (tests/stages/test_preprocess_*.py)."""

import csv
import gzip
import json
from pathlib import Path

from typer.testing import CliRunner

from igdrec.cli import app


def write_json_lines(path: Path, records, compress: bool = True) -> Path:
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


REFERENCE_HEADER = ["user_id", "item_asins", "item_asin", "history_item_id", "item_id", "history_item_title", "item_title",
                    "history_rating", "rating", "history_timestamp", "timestamp"]


def write_reference_csv(path: Path, rows, titles) -> Path:
    """A split CSV as the reference code writes it: Python lists through csv.writer."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(REFERENCE_HEADER)
        for user, history, target, ts in rows:
            writer.writerow([user, [f"A{i}" for i in history], f"A{target}", history, target, [titles[i] for i in history],
                             titles[target], [5.0] * len(history), 5.0, [ts - 1] * len(history), ts])
    return path


D3_TITLES = {0: 'Bob\'s "Great", Game', 1: "Halo 3", 2: "Zelda, Link's [Awakening]", 3: "Mario"}


def write_d3_inputs(directory: Path, extra_column: bool = False) -> dict:
    info = directory / "info.txt"
    order = [2, 0, 3, 1]  # the reference writes ids in shuffled order
    info.write_text("".join((f"sid{i}\t" if extra_column else "") + f"{D3_TITLES[i]}\t{i}\n" for i in order))
    splits = {
        "train": [("u1", [0], 1, 100), ("u1", [0, 1], 2, 200), ("u2", [3], 0, 150)],
        "valid": [("u2", [3, 0], 1, 300)],
        "test": [("u1", [0, 1, 2], 3, 400)],
    }
    paths = {split: write_reference_csv(directory / f"{split}.csv", rows, D3_TITLES) for split, rows in splits.items()}
    return {"info": str(info), **{k: str(v) for k, v in paths.items()}}


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


GOOD = "user_id,item_id,timestamp\nu,a,1\nu,b,2\nu,a,3\nu,b,4\nv,a,5\nv,b,6\nv,a,7\nv,b,8\n"


def amazon_args(tmp_path, reviews, meta=({"asin": "A", "title": "Game A"},)):
    return ["--source", "amazon2018", "--category", "Video_Games",
            "--reviews", str(write_json_lines(tmp_path / "reviews.json.gz", reviews)),
            "--meta", str(write_json_lines(tmp_path / "meta.json.gz", list(meta)))]


def d3_args(tmp_path, **overrides):
    files = write_d3_inputs(tmp_path)
    for name, text in overrides.items():
        (tmp_path / name).write_text(text)
    return ["--source", "d3-csv", *[a for split in ("train", "valid", "test", "info") for a in (f"--{split}", files[split])]]
