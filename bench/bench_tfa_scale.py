"""Benchmark: D3's text-free assistant at Amazon Books' size, the assistant's part of a decode only.

The baseline stage saves its model; `decode --tfa NAME` scores each batch's histories with it
(decoding.TextFreeAssistant) and sums the item probabilities up the catalog trie (assistant.node_mass),
which is all the search reads from the assistant. This script runs exactly that for every sample, batch
by batch, with a random-weight SASRec (RecBole's default shape) over synthetic histories and a synthetic
catalog trie of the paper's Books size, and prints the peak RSS, the bytes written to disk and the time
per 1,000 samples. For comparison it writes a few hundred rows of the earlier dense artifact (one float32
per sample and item, polars' default parquet compression) and projects its size to all samples.

    nice .venv/bin/python bench/bench_tfa_scale.py [--items 41722] [--samples 85376] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from igdrec import seqrec
from igdrec.assistant import MassTree, node_mass
from igdrec.config import BaselineConfig
from igdrec.decoding import TextFreeAssistant
from igdrec.ig import build_catalog_trie_flat

BOOKS_ITEMS = 41_722  # Amazon Books after the paper's filtering (its Table 5)
BOOKS_TEST_SAMPLES = 85_376
DENSE_PROBE_ROWS = 256


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def synthetic_trie(n_items: int, rng: np.random.Generator):
    """Titles of 4..16 tokens then EOS (0), first tokens Zipf-distributed so that titles share prefixes
    as real ones do ("The", "A", series names), the rest drawn from a 49,152-token vocabulary."""
    lengths = rng.integers(4, 17, size=n_items)
    flat = rng.integers(1, 49_152, size=int(lengths.sum()) + n_items)
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    for depth in range(3):  # shared prefixes
        flat[starts + depth] = np.minimum(rng.zipf(1.3, size=n_items), 2_000)
    flat[starts + lengths] = 0  # EOS
    return build_catalog_trie_flat(np.arange(n_items), flat, lengths + 1, np.ones(n_items))


def dense_bytes_per_sample(model, histories: list[list[int]], max_len: int, directory: Path) -> float:
    """Bytes per sample of the earlier `probs_<split>.parquet` (sample_id, List(Float32) over every item id)."""
    item_seq, lengths = seqrec.pad_histories(histories, list(range(len(histories))), model.n_items, max_len)
    with torch.no_grad():
        probs = model.item_probabilities(model.full_sort_predict(seqrec.SequenceBatch(item_seq, lengths, lengths))).numpy()
    column = pl.Series("probs", probs, dtype=pl.Array(pl.Float32, model.n_items)).cast(pl.List(pl.Float32))
    path = directory / "probs_probe.parquet"
    pl.DataFrame({"sample_id": np.arange(len(histories), dtype=np.int64)}).with_columns(column).write_parquet(path)
    return path.stat().st_size / len(histories)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=BOOKS_ITEMS)
    parser.add_argument("--samples", type=int, default=BOOKS_TEST_SAMPLES)
    parser.add_argument("--batch-size", type=int, default=8, help="Samples per decode batch (8: decode's automatic batch on a CPU).")
    parser.add_argument("--max-len", type=int, default=10, help="History length the model was built for (the paper keeps 10 items).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    started = time.perf_counter()
    trie = synthetic_trie(args.items, rng)
    tree = MassTree.from_trie(trie)
    lengths = rng.integers(1, args.max_len + 1, size=args.samples)
    histories = np.split(rng.integers(0, args.items, size=int(lengths.sum())), np.cumsum(lengths)[:-1])
    print(f"catalog: {args.items:,} items, trie of {trie.num_nodes:,} nodes, depth {trie.max_depth}; "
          f"{args.samples:,} synthetic histories of 1..{args.max_len} items (set up in {time.perf_counter() - started:.1f}s)")

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        settings = seqrec.ModelSettings.from_config(BaselineConfig())  # RecBole's SASRec defaults: 64 hidden, 2 layers
        torch.manual_seed(args.seed)
        model = seqrec.build_model("sasrec", args.items, args.max_len, settings, np.zeros(0))
        seqrec.save_recommender(model, directory, "sasrec", args.max_len, settings)
        disk = sum(p.stat().st_size for p in directory.iterdir())
        loaded, max_len = seqrec.load_recommender(directory)
        assistant = TextFreeAssistant(loaded, max_len, trie.item_ids, torch.device("cpu"), str(directory))
        rss_before = peak_rss_mib()

        ids = np.arange(args.samples)
        checksum = 0.0
        started = time.perf_counter()
        for begin in range(0, args.samples, args.batch_size):
            rows = slice(begin, begin + args.batch_size)
            probs = assistant.probs([h.tolist() for h in histories[rows]], ids[rows])
            mass = node_mass(tree, probs)  # what the search gathers the children's shares from
            checksum += float(mass[:, 0].sum())  # the root holds every item's mass: 1 per sample
        seconds = time.perf_counter() - started
        rss_after = peak_rss_mib()
        if abs(checksum - args.samples) > 1e-3 * args.samples:
            raise SystemExit(f"root masses sum to {checksum}, expected {args.samples}")
        dense_per_sample = dense_bytes_per_sample(loaded, [h.tolist() for h in histories[:DENSE_PROBE_ROWS]], max_len, directory)

    dense_split = dense_per_sample * args.samples
    print(f"assistant path, batch {args.batch_size}, {args.threads} thread(s):")
    print(f"  time:      {seconds:.1f}s for {args.samples:,} samples = {1000 * seconds / args.samples:.3f}s per 1,000 samples")
    print(f"  peak RSS:  {rss_after:,.0f} MiB (after setup, before the loop: {rss_before:,.0f} MiB)")
    print(f"  disk:      {disk / 2**20:.1f} MiB written (model.safetensors + model.json), independent of the samples")
    print(f"dense path (earlier igdrec): {dense_per_sample / 1024:.1f} KiB per sample in parquet "
          f"(measured on {DENSE_PROBE_ROWS} rows) → {dense_split / 1e9:.1f} GB per split at {args.samples:,} samples, "
          f"{args.samples * args.items * 4 / 1e9:.1f} GB of float32 once read back into memory")


if __name__ == "__main__":
    main()
