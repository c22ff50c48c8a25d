"""The one implementation of every evaluation number (docs/method.md §7).

Ranking: r = 0-based rank of the first predicted title equal to the target's title (both stripped; a
title shared by several ids matches any of them); HR@K = 1[r < K], NDCG@K = 1/log2(r + 2) if r < K,
averaged over all evaluated samples (no match counts 0). Beyond the paper: diversity of the lists, the
mean trie entropy H(prefix) per decoding step of predicted vs ground-truth items (paper Figs. 1–3) and the
popularity of the recommended items (average popularity, long-tail share, novelty; docs/method.md §7.2).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from igdrec.ig import CatalogTrie

NO_MATCH = -1
POPULARITY = ("average_popularity", "long_tail_share", "novelty", "unseen_share")  # per-list values of `popularity`


def match_ranks(predicted_titles: Sequence[Sequence[str]], target_titles: Sequence[str]) -> np.ndarray:
    """0-based rank of the first prediction whose stripped title equals the target's; -1 if none."""
    ranks = np.full(len(target_titles), NO_MATCH, dtype=np.int64)
    for i, (titles, target) in enumerate(zip(predicted_titles, target_titles)):
        wanted = target.strip()
        for r, title in enumerate(titles):
            if title is not None and title.strip() == wanted:
                ranks[i] = r
                break
    return ranks


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-sample NDCG@K and HR@K vectors (take the mean for the reported value)."""
    ranks = np.asarray(ranks)
    hit = ranks >= 0
    gain = np.where(hit, 1.0 / np.log2(np.where(hit, ranks, 0) + 2.0), 0.0)
    out = {}
    for k in ks:
        within = hit & (ranks < k)
        out[f"NDCG@{k}"] = np.where(within, gain, 0.0)
        out[f"HR@{k}"] = within.astype(np.float64)
    return out


def diversity(lists: Sequence[Sequence[int]], first_token: dict[int, int], catalog_size: int) -> dict[str, float]:
    """Item coverage, share of lists whose items all start with one token, entropy of recommended items."""
    flat = [item for items in lists for item in items]
    counts = np.unique(np.asarray(flat, dtype=np.int64), return_counts=True)[1] if flat else np.zeros(0)
    p = counts / counts.sum() if counts.size else counts
    nonempty = [items for items in lists if len(items)]
    # an item outside the trie (e.g. grounded free text) shares its first token with nothing
    same_first = [len({first_token.get(i, ("no token", i)) for i in items}) == 1 for items in nonempty]
    return {
        "item_coverage": float(len(counts) / catalog_size) if catalog_size else 0.0,
        "same_first_token_share": float(np.mean(same_first)) if same_first else 0.0,
        "recommended_item_entropy": float(-(p * np.log(p)).sum()) if counts.size else 0.0,
    }


def popularity_head(counts: Mapping[int, int], head_share: float) -> set[int]:
    """The head of the catalog: its ⌈head_share · n⌉ most frequent items (n = len(counts)), every item tied
    with the last of them included, never an item of frequency 0; the other items are the long tail."""
    # the tolerance keeps a float product such as 0.07 * 100 = 7.000000000000001 from gaining an item
    n_head = math.ceil(head_share * len(counts) - 1e-9)
    if n_head <= 0:
        return set()
    cut = sorted(counts.values(), reverse=True)[n_head - 1]
    return {item for item, count in counts.items() if count >= max(cut, 1)}


def popularity(lists: Sequence[Sequence[int]], counts: Mapping[int, int], head_share: float) -> tuple[dict, dict[str, list]]:
    """Popularity of the recommended items by their training frequency `counts` (of every catalog item, 0 for
    one never seen in training; a recommended item must be one of them).

    Per list: the mean frequency (average recommendation popularity), the share of long-tail items (outside
    `popularity_head`), the mean novelty −log2 p(i) with p(i) = max(count, 1) / Σ counts (an unseen item is
    as novel as one seen once) and the share of unseen items. The summary averages them over the non-empty
    lists; per sample, an empty list gets None.
    """
    total = sum(counts.values())
    if total <= 0:
        raise ValueError("popularity needs at least one training interaction")
    head = popularity_head(counts, head_share)
    per_list: dict[str, list] = {name: [] for name in POPULARITY}
    for items in lists:
        if not len(items):
            for name in POPULARITY:
                per_list[name].append(None)
            continue
        c = np.array([counts[i] for i in items], dtype=np.float64)
        per_list["average_popularity"].append(float(c.mean()))
        per_list["long_tail_share"].append(float(np.mean([i not in head for i in items])))
        per_list["novelty"].append(float(-np.log2(np.maximum(c, 1.0) / total).mean()))
        per_list["unseen_share"].append(float(np.mean(c == 0)))
    n_lists = sum(1 for items in lists if len(items))
    summary = {name: float(np.mean([v for v in values if v is not None])) if n_lists else None for name, values in per_list.items()}
    summary |= {"head_share": head_share, "head_items": len(head), "items": len(counts), "lists": n_lists}
    return summary, per_list


def entropy_per_step(trie: CatalogTrie, predicted: Sequence[Sequence[int]], targets: Sequence[int]) -> dict[str, list]:
    """Mean trie H(prefix after t tokens), t = 1.., over predicted items vs ground-truth items.

    An item contributes to step t only if its token sequence has at least t tokens; steps no item
    reaches are None.
    """
    depth = trie.max_depth
    sums = {"predicted": np.zeros(depth), "ground_truth": np.zeros(depth)}
    counts = {"predicted": np.zeros(depth), "ground_truth": np.zeros(depth)}

    def add(kind: str, item_ids: Sequence[int]) -> None:
        rows = trie.item_index(np.asarray(item_ids, dtype=np.int64))
        for row in rows[rows >= 0]:
            nodes = trie.item_path_nodes[trie.item_path_ptr[row]:trie.item_path_ptr[row + 1]]
            sums[kind][: len(nodes)] += trie.entropy[nodes]
            counts[kind][: len(nodes)] += 1

    add("predicted", [i for items in predicted for i in items])
    add("ground_truth", list(targets))
    out: dict[str, list] = {"step": list(range(1, depth + 1))}
    for kind in sums:
        out[kind] = [float(s / c) if c else None for s, c in zip(sums[kind], counts[kind])]
        out[f"{kind}_count"] = [int(c) for c in counts[kind]]
    return out


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> tuple[float, float, float]:
    """Mean of b − a and its 95% percentile interval from `resamples` paired resamples of the samples."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if diff.size == 0:
        return 0.0, 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 256):  # chunks bound the index matrix's memory
        n = min(256, resamples - start)
        means[start:start + n] = diff[rng.integers(0, diff.size, size=(n, diff.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5]) if resamples else (diff.mean(), diff.mean())
    return float(diff.mean()), float(lo), float(hi)
