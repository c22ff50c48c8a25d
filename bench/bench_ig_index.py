"""Benchmark of `igdrec build-ig-index`: wall time and peak RSS, each case in a fresh subprocess.

Cases (targets from issue 3, on a 2-core machine):
  ml-100k    the embedded tokenizer on MovieLens-100K (<= 10 s; the preprocess stage runs first if the
             run dir has no data stage; downloads and the one-time GGUF conversion are done beforehand)
  synthetic  1,000,000 titles of 5-20 Zipf-distributed vocabulary words, 5,000,000 training targets (+10% valid, +10% test)
             (<= 120 s and <= 4 GB peak RSS)

    .venv/bin/python bench/bench_ig_index.py [--case ml-100k|synthetic|all] [--items N] [--targets N]

Timed: the whole stage call (tokenizer load, catalog tokenization, trie, per-sample IG, Parquet writes).
Not timed: generating the synthetic data stage (its own subprocess) and preprocessing ml-100k.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"ml-100k": (10.0, None), "synthetic": (120.0, 4.0)}  # seconds, GB


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


def child_build(run_dir: str) -> None:
    """Runs in the fresh subprocess: one forced build, then timing and peak RSS as a JSON line."""
    from igdrec.config import IGIndexConfig
    from igdrec.rundir import RunDir
    from igdrec.stages import build_ig_index

    rss_before = peak_rss_gb()
    cpu_before = time.process_time()
    start = time.perf_counter()
    manifest = build_ig_index.run(IGIndexConfig(), RunDir(run_dir), force=True)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_before  # all threads; with a busy machine, wall > cpu / cores
    keys = ("items", "train", "tokens", "zero_ig_share", "nodes", "depth")
    print(json.dumps({"seconds": seconds, "cpu_s": cpu_seconds, "load_avg_1m": os.getloadavg()[0], "stage_wall_s": manifest["wall_time_s"], "peak_rss_gb": peak_rss_gb(),
                      "rss_after_imports_gb": rss_before, **{k: manifest["stats"][k] for k in keys}}))


def child_generate(run_dir: str, n_items: int, n_train: int, seed: int = 0) -> None:
    """Write a synthetic `data` stage: Zipf-popular pseudo-word titles and Zipf-popular targets."""
    import numpy as np
    import polars as pl

    from igdrec import schema
    from igdrec.rundir import RunDir, StageWriter

    from igdrec.modeling import load_tokenizer

    rng = np.random.default_rng(seed)
    # Words: the whole-word entries of the embedded vocabulary (real English words, mixed case), drawn
    # with Zipf frequencies (p ~ 1/rank, as in natural text), so titles share prefixes like real ones.
    vocab = load_tokenizer("smollm2-135m").get_vocab()
    words = np.array(sorted(w[1:] for w in vocab if re.fullmatch(r"\u0120[A-Za-z]{3,}", w)), dtype=object)
    words = words[rng.permutation(len(words))]
    lengths = rng.integers(5, 21, n_items)
    rank_p = 1.0 / np.arange(1, len(words) + 1)
    word_ids = rng.choice(len(words), size=int(lengths.sum()), p=rank_p / rank_p.sum())
    drawn = words[word_ids].tolist()
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    titles = [" ".join(drawn[bounds[i]:bounds[i + 1]]) for i in range(n_items)]
    items = pl.DataFrame({"item_id": np.arange(n_items), "title": titles})

    n_valid = n_test = n_train // 8
    total = n_train + n_valid + n_test
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    targets = rng.choice(n_items, size=total, p=popularity / popularity.sum())
    previous = rng.integers(0, n_items, total)
    frame = pl.DataFrame({"item_id": targets, "prev": previous, "timestamp": np.arange(total)}).with_columns(
        user_id=(pl.col("timestamp") % 100_000).cast(pl.String), history_item_ids=pl.concat_list("prev")
    )
    run = RunDir(run_dir)
    with StageWriter(run, "data", stage="preprocess", params={"source": "bench-synthetic", "items": n_items, "train": n_train},
                     inputs={}, force=True) as out:
        schema.conform(items, "items").write_parquet(out.path("items.parquet"))
        cuts = {"train": (0, n_train), "valid": (n_train, n_train + n_valid), "test": (n_train + n_valid, total)}
        for split, (a, b) in cuts.items():
            part = frame.slice(a, b - a).with_columns(sample_id=pl.int_range(pl.len(), dtype=pl.Int64))
            schema.conform(part, "samples").write_parquet(out.path(f"{split}.parquet"))
            out.rows[split] = b - a
        out.rows["items"] = n_items
        out.stats = {"source": "bench-synthetic", "category_word": "items"}


def run_child(*args: str) -> dict:
    env = dict(os.environ, IGDREC_NO_PROGRESS="1")
    proc = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}\n{proc.stdout[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def report(case: str, result: dict) -> None:
    max_s, max_gb = TARGETS[case]
    ok_time = result["seconds"] <= max_s
    ok_rss = max_gb is None or result["peak_rss_gb"] <= max_gb
    print(
        f"{case:10s} build {result['seconds']:7.1f} s (target <= {max_s:g} s: {'ok' if ok_time else 'MISSED'})  "
        f"peak RSS {result['peak_rss_gb']:.2f} GB" + (f" (target <= {max_gb:g} GB: {'ok' if ok_rss else 'MISSED'})" if max_gb else "")
    )
    print(f"{'':10s} " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["ml-100k", "synthetic", "all"], default="all")
    parser.add_argument("--ml100k-run-dir", default="runs/bench-ml100k")
    parser.add_argument("--synthetic-run-dir", default="runs/bench-synthetic")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--targets", type=int, default=5_000_000)
    args = parser.parse_args()

    from igdrec.modeling import resolve_model_path

    resolve_model_path("smollm2-135m")  # fetch + convert once, outside the timings
    if args.case in ("ml-100k", "all"):
        from igdrec.rundir import RunDir

        if RunDir(args.ml100k_run_dir).manifest("data") is None:
            from igdrec.config import PreprocessConfig
            from igdrec.stages import preprocess

            preprocess.run(PreprocessConfig(source="ml-100k"), RunDir(args.ml100k_run_dir))
        report("ml-100k", run_child("--child-build", args.ml100k_run_dir))
    if args.case in ("synthetic", "all"):
        started = time.perf_counter()
        run_child("--child-generate", args.synthetic_run_dir, str(args.items), str(args.targets))
        print(f"(synthetic data stage: {args.items:,} items, {args.targets:,} train targets, generated in "
              f"{time.perf_counter() - started:.0f} s, not timed)")
        report("synthetic", run_child("--child-build", args.synthetic_run_dir))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child-build":
        child_build(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "--child-generate":
        child_generate(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
