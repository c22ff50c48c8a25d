"""Small synthetic run directories for the tests of downstream stages (no preprocessing needed)."""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl

from igdrec import schema
from igdrec.rundir import RunDir, StageWriter

# Titles chosen so the catalog trie has shared prefixes ("The ..."), a title that is a prefix of
# another ("Heat" / "Heat Wave"), and a duplicated title (two ids for "Fargo (1996)").
TITLES = [
    "Toy Story (1995)", "Toy Story 2 (1999)", "GoldenEye (1995)", "Four Rooms (1995)", "Get Shorty (1995)",
    "The Lion King (1994)", "The Usual Suspects (1995)", "The Godfather (1972)", "The Godfather: Part II (1974)",
    "Star Wars (1977)", "Return of the Jedi (1983)", "The Empire Strikes Back (1980)", "Fargo (1996)",
    "Heat", "Heat Wave", "Fargo (1996)", "Copycat (1995)", "Halo 3", "Lego Star Wars", "Super Mario Odyssey",
]


def synthetic_dataset(n_users: int = 40, seed: int = 0, titles: list[str] = TITLES, history_len: int = 10):
    """Items plus train/valid/test samples from random user sequences (skewed item popularity)."""
    rng = random.Random(seed)
    items = pl.DataFrame({"item_id": list(range(len(titles))), "title": titles})
    weights = [1.0 / (1 + i) ** 0.7 for i in range(len(titles))]
    windows = []
    clock = 0
    for user in range(n_users):
        seq = rng.choices(range(len(titles)), weights=weights, k=rng.randint(3, 9))
        for k in range(1, len(seq)):
            clock += rng.randint(0, 2)
            windows.append((str(user), seq[max(0, k - history_len):k], seq[k], clock))
    windows.sort(key=lambda w: w[3])
    n = len(windows)
    cut = [0, int(0.8 * n), int(0.9 * n), n]
    splits = {}
    for i, split in enumerate(("train", "valid", "test")):
        part = windows[cut[i]:cut[i + 1]]
        splits[split] = pl.DataFrame(
            {
                "sample_id": list(range(len(part))),
                "user_id": [w[0] for w in part],
                "history_item_ids": [w[1] for w in part],
                "item_id": [w[2] for w in part],
                "timestamp": [w[3] for w in part],
            }
        )
    return items, splits


def write_data_stage(run_dir: Path | str, items: pl.DataFrame, splits: dict, category_word: str = "movies") -> RunDir:
    """Publish `items` and `splits` as if `igdrec preprocess` had written them."""
    run = RunDir(run_dir)
    with StageWriter(run, "data", stage="preprocess", params={"source": "fixture"}, inputs={"n": str(items.height)}, force=True) as out:
        schema.conform(items, "items").write_parquet(out.path("items.parquet"))
        out.rows["items"] = items.height
        for split, df in splits.items():
            schema.conform(df, "samples").write_parquet(out.path(f"{split}.parquet"))
            out.rows[split] = df.height
        out.stats = {"source": "fixture", "category_word": category_word}
    return run


def synthetic_run(run_dir: Path | str, **kwargs) -> RunDir:
    items, splits = synthetic_dataset(**kwargs)
    return write_data_stage(run_dir, items, splits)
