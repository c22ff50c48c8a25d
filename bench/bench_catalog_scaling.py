"""Benchmark: does decoding cost grow with the catalog? Synthetic catalogs of 1k, 10k and 50k titles.

Titles are recombined from ml-100k's title words (each synthetic title takes the word count of a real one,
its words drawn by their frequency in the real titles, and keeps a year in parentheses where the real one
had one), so they tokenise to realistic lengths and share prefixes the way real titles do; training counts
for IG~ are Zipf-distributed. Every catalog decodes the same prompts: ml-100k test histories written with
titles of that catalog. Per size, each in its own process (so that peak RSS is that size's):

  s/sample         igdrec's constrained beam search (10 beams, α 0.2, lp 0) with the model;
  peak RSS         of the process (model, trie and search);
  trie MB          the tensors the search gathers from (`TrieTensors.nbytes`);
  search share     the search's time per step outside the model's forward: the same search with a stub
                   model that returns fixed logits at no cost (and keeps no KV cache), per step, over the
                   model's time per step (the constraint: trie lookups, IG~ weights, forced chains,
                   masking, top-k; plus the log-softmax over the vocabulary, which is not the trie's).

    .venv/bin/python bench/bench_catalog_scaling.py [--sizes 1000 10000 50000] [--samples 16] [--static]
    .venv/bin/python bench/bench_catalog_scaling.py --quick     # 200 and 1000 titles, 2 samples: checks the script
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from igdrec import prompt, schema  # noqa: E402
from igdrec.beam import BeamSearch, TrieTensors  # noqa: E402
from igdrec.config import EMBEDDED_MODEL, DecodeConfig, PreprocessConfig  # noqa: E402
from igdrec.ig import build_catalog_trie  # noqa: E402
from igdrec.modeling import load_model, load_tokenizer  # noqa: E402
from igdrec.rundir import RunDir  # noqa: E402

YEAR = re.compile(r"\s*\((\d{4})\)\s*$")


def synthetic_titles(real: list[str], n: int, seed: int = 0) -> list[str]:
    """n distinct titles recombined from the words of `real` (see the module's docstring)."""
    rng = np.random.default_rng(seed)
    stems, years = [], []
    for title in real:
        match = YEAR.search(title)
        stems.append(title[: match.start()] if match else title)
        years.append(match.group(1) if match else None)
    words, counts = np.unique([w for s in stems for w in s.split()], return_counts=True)
    p = counts / counts.sum()
    lengths = np.array([max(len(s.split()), 1) for s in stems])
    titles, seen = [], set()
    while len(titles) < n:
        i = int(rng.integers(len(real)))
        title = " ".join(rng.choice(words, size=lengths[i], p=p))
        if years[i] is not None:
            title += f" ({years[i]})"
        if title not in seen:
            seen.add(title)
            titles.append(title)
    return titles


class StubModel(torch.nn.Module):
    """A causal LM of no cost: fixed random logits per row (every fed position alike), no KV cache."""

    def __init__(self, vocab_size: int, rows: int, seed: int = 0):  # rows: the most a pass feeds
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # the search asks for a device
        self.logits = torch.randn((rows, 1, vocab_size), generator=generator) * 4

    def forward(self, input_ids, past_key_values=None, logits_to_keep=1, **_):
        logits = self.logits[: input_ids.shape[0]].expand(-1, logits_to_keep, -1)  # a view: nothing computed
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


def one_size(args, size: int, real_titles: list[str], histories: list[list[int]], category: str) -> dict:
    """Decode `histories` over a synthetic catalog of `size` titles (run in a child process)."""
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model)
    titles = synthetic_titles(real_titles, size, seed=size)
    counts = np.random.default_rng(size).zipf(1.3, size=size).astype(float)
    trie = build_catalog_trie(np.arange(size), prompt.item_token_sequences(tokenizer, titles), counts)
    tensors = TrieTensors.from_trie(trie)
    # history item ids index the real catalog; each is written with the synthetic title of the same row
    prompts = [prompt.encode_prompt(tokenizer, [titles[i % size] for i in h], category, 512)[0] for h in histories]
    config = DecodeConfig(num_beams=10, alpha=0.2, length_penalty=0.0)

    def timed_search(decoder) -> tuple[float, int]:
        search = BeamSearch.from_config(decoder, tokenizer.eos_token_id, tokenizer.pad_token_id, config, trie=tensors,
                                        share_prefix=True, static_shapes=args.static)
        search.search(prompts[:1])  # warm-up
        search.stats = type(search.stats)()
        started = time.perf_counter()
        for begin in range(0, len(prompts), args.batch_size):
            search.search(prompts[begin:begin + args.batch_size])
        return time.perf_counter() - started, search.stats.steps

    seconds, steps = timed_search(model)
    stub_seconds, stub_steps = timed_search(StubModel(len(tokenizer), args.batch_size * config.num_beams))
    per_step, stub_per_step = seconds / steps, stub_seconds / stub_steps
    return {
        "titles": size, "trie_nodes": trie.num_nodes, "max_depth": trie.max_depth,
        "mean_title_tokens": float(np.mean(np.diff(trie.item_path_ptr))),
        "s_per_sample": seconds / len(prompts), "steps": steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trie_mb": tensors.nbytes() / 2**20,
        "step_ms": 1000 * per_step, "search_step_ms": 1000 * stub_per_step, "search_share": stub_per_step / per_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="runs/bench-decode", help="Where the ml-100k data is preprocessed (shared with bench_decode.py).")
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--static", action="store_true", help="Static shapes (the CUDA default) instead of the CPU default.")
    parser.add_argument("--quick", action="store_true", help="200 and 1000 titles, 2 samples: checks that the script runs.")
    parser.add_argument("--out", type=Path, help="Also write the rows as JSON here.")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.samples, args.batch_size = [200, 1000], 2, 2

    from igdrec.stages import preprocess

    run = RunDir(args.run_dir)
    data = preprocess.run(PreprocessConfig(source="ml-100k"), run)
    items = schema.read(run.artifact("data", "items.parquet"), "items").sort("item_id")
    test = schema.read(run.artifact("data", "test.parquet"), "samples").sort("sample_id").head(args.samples)
    histories = test["history_item_ids"].to_list()
    category = data["stats"]["category_word"]
    print(f"{len(histories)} ml-100k test histories, 10 beams, α 0.2, lp 0, batch {args.batch_size}, "
          f"{'static' if args.static else 'dynamic'} shapes, {args.threads} threads", flush=True)
    rows = []
    context = multiprocessing.get_context("spawn")
    for size in args.sizes:
        with context.Pool(1) as pool:
            rows.append(pool.apply(one_size, (args, size, items["title"].to_list(), histories, category)))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| titles | trie nodes | tokens/title | s/sample | × smallest | peak RSS MB | trie MB | step ms | search ms/step | search share |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['titles']:,} | {r['trie_nodes']:,} | {r['mean_title_tokens']:.1f} | {r['s_per_sample']:.3f} | "
              f"{r['s_per_sample'] / rows[0]['s_per_sample']:.2f} | {r['peak_rss_mb']:.0f} | {r['trie_mb']:.2f} | "
              f"{r['step_ms']:.1f} | {r['search_step_ms']:.2f} | {100 * r['search_share']:.1f}% |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
