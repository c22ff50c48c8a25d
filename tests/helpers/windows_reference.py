"""The brute-force reference for windowing and the temporal split (docs/method.md §2.1): the reference
pipeline's loops, for tests/unit/test_windows.py, test_assets.py and the preprocess stage tests."""

import polars as pl


def interactions(rows):
    return pl.DataFrame(rows, schema={"user_id": pl.String, "item_id": pl.Int64, "timestamp": pl.Int64}, orient="row")


def as_tuples(df):
    return list(zip(df["user_id"], df["history_item_ids"].to_list(), df["item_id"], df["timestamp"]))


def brute_force(rows, history_len):
    """The reference pipeline's loops: per user (first-seen order) a stable time sort, then a stable global sort."""
    per_user = {}
    for user, item, ts in rows:
        per_user.setdefault(user, []).append((item, ts))
    windows = []
    for user, seq in per_user.items():
        seq = sorted(seq, key=lambda x: x[1])
        for k in range(1, len(seq)):
            windows.append((user, [i for i, _ in seq[max(0, k - history_len):k]], seq[k][0], seq[k][1]))
    windows.sort(key=lambda w: w[3])
    n = len(windows)
    return windows[: int(n * 0.8)], windows[int(n * 0.8): int(n * 0.9)], windows[int(n * 0.9):]
