"""A brute-force stand-in for the `ig` stage, for SFT tests (the real stage replaces it in integration tests).

Reference distribution: training-target frequencies. A target token is zero-IG iff every reference item
whose token sequence starts with the prefix before it also continues with that token (docs/method.md §4); IG is
H(prefix) - H(prefix + token) with H summed over the reference items under a prefix. Both are computed
here by scanning the whole catalog for every token, with no trie.
"""

from __future__ import annotations

import math
from collections import Counter

import polars as pl

from igdrec import schema
from igdrec.modeling import tokenizer_identity
from igdrec.prompt import item_token_sequence
from igdrec.rundir import RunDir, StageWriter


def _entropy(prefix: tuple, sequences: dict[int, tuple], p: dict[int, float]) -> float:
    return -sum(p[i] * math.log(p[i]) for i, seq in sequences.items() if p[i] > 0 and seq[: len(prefix)] == prefix)


def brute_force_sample_ig(tokenizer, titles: list[str], train: pl.DataFrame, samples: pl.DataFrame) -> pl.DataFrame:
    sequences = {i: tuple(item_token_sequence(tokenizer, t)) for i, t in enumerate(titles)}
    counts = Counter(train["item_id"].to_list())
    total = sum(counts.values())
    p = {i: counts.get(i, 0) / total for i in sequences}
    rows = []
    for sample_id, item_id in zip(samples["sample_id"].to_list(), samples["item_id"].to_list()):
        seq = sequences[item_id]
        ig, zero = [], []
        for t, token in enumerate(seq):
            prefix = seq[:t]
            under = [s for i, s in sequences.items() if p[i] > 0 and s[:t] == prefix]
            zero.append(all(len(s) > t and s[t] == token for s in under))
            ig.append(_entropy(prefix, sequences, p) - _entropy(prefix + (token,), sequences, p))
        rows.append({"sample_id": sample_id, "item_id": item_id, "ig": ig, "zero_ig": zero})
    return schema.conform(pl.DataFrame(rows), "sample_ig")


def publish_ig_stage(run: RunDir, tokenizer, model_spec: str, corrupt=None) -> dict:
    """Publish <run>/ig with sample_ig_{train,valid}.parquet as the IG stage would (params: model spec, tokenizer identity).

    `corrupt`, if given, maps a split to a function `frame -> frame` applied to its table (bad-input tests).
    """
    items = schema.read(run.artifact("data", "items.parquet"), "items").sort("item_id")
    train = schema.read(run.artifact("data", "train.parquet"), "samples")
    data = run.require("data", hint="fixture")
    with StageWriter(run, "ig", stage="build-ig-index", params={"model": model_spec, "tokenizer": tokenizer_identity(tokenizer)}, inputs={"data": data["fingerprint"]}, force=True) as out:
        for split in ("train", "valid"):
            samples = schema.read(run.artifact("data", f"{split}.parquet"), "samples")
            table = brute_force_sample_ig(tokenizer, items["title"].to_list(), train, samples)
            if corrupt and split in corrupt:
                table = corrupt[split](table)
            table.write_parquet(out.path(f"sample_ig_{split}.parquet"))
    return out.manifest
