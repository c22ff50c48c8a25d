"""Windowing and the temporal split (docs/method.md §2.1) on hand-built data and against a brute-force reference."""

import random

import polars as pl
from windows_reference import as_tuples, brute_force, interactions

from igdrec.sources.windows import build_windows, temporal_split


def test_windows_by_hand_with_timestamp_ties():
    # user a: items 1@10, 2@30, 3@20 -> time order 1, 3, 2. user b: 4@20, 5@20 (tie keeps input order: 4 then 5),
    # 6@5. so b's order is 6, 4, 5. user c has a single interaction and yields no window.
    rows = [("a", 1, 10), ("b", 4, 20), ("a", 2, 30), ("b", 5, 20), ("a", 3, 20), ("b", 6, 5), ("c", 7, 1)]
    windows = build_windows(interactions(rows), history_len=10)
    # target-time ties at 20: a's window comes first (a appears first in the input), then b's.
    assert as_tuples(windows) == [
        ("a", [1], 3, 20),
        ("b", [6], 4, 20),
        ("b", [6, 4], 5, 20),
        ("a", [1, 3], 2, 30),
    ]


def test_history_keeps_only_the_most_recent_items():
    rows = [("u", item, item * 10) for item in range(6)]
    windows = build_windows(interactions(rows), history_len=3)
    assert windows["history_item_ids"].to_list() == [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4]]
    assert windows["item_id"].to_list() == [1, 2, 3, 4, 5]


def test_split_sizes_and_sample_ids():
    rows = [("u", i, i) for i in range(12)]  # 11 windows: int(8.8)=8 train, int(9.9)=9 -> 1 valid, 2 test
    splits = temporal_split(build_windows(interactions(rows), history_len=10))
    assert [splits[s].height for s in ("train", "valid", "test")] == [8, 1, 2]
    assert splits["valid"]["item_id"].to_list() == [9]
    assert splits["test"]["item_id"].to_list() == [10, 11]
    for df in splits.values():
        assert df["sample_id"].to_list() == list(range(df.height))
        assert df.schema["history_item_ids"] == pl.List(pl.Int64)


def test_matches_brute_force_on_random_data_with_many_ties():
    rng = random.Random(7)
    rows = [(f"u{rng.randint(0, 30)}", rng.randint(0, 50), rng.randint(0, 40)) for _ in range(900)]
    splits = temporal_split(build_windows(interactions(rows), history_len=4))
    expected = brute_force(rows, history_len=4)
    for split, want in zip(("train", "valid", "test"), expected):
        assert as_tuples(splits[split]) == want
