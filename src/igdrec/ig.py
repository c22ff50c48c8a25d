"""The catalog trie and the information gain of every token (docs/method.md §4), built with array operations.

Every catalog item is a path of token ids (`prompt.item_token_sequence`) ending in EOS, so no item ends
inside another's path. Nodes are numbered level by level, and within a level in lexicographic order of
their prefixes: the root is node 0, and the children of any node are a contiguous, token-sorted range
`[child_start, child_start + child_count)`. That is what lets decoding gather allowed tokens and their
weights as tensors instead of walking a Python trie.

Reference distribution p_r(i) ∝ count(i) (training-target frequency, optionally smoothed). For a node v,
H(v) = -Σ_{i under v} p_r(i) log p_r(i) (not renormalised) and the edge into child c has
IG(c) = H(v) - H(c). IG(c) = 0 exactly when every reference item under v lies under c; that is decided
from integer counts of positive-mass items, so forced tokens are exactly zero, never 1e-17.

The normalised IG~ that decoding calibrates with is min-max over siblings, except that a branch with zero
reference mass (only never-trained items under it, `--catalog all` without smoothing) gets IG~ = 0 and
does not take part in its siblings' min-max (docs/method.md §4.1).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from igdrec import schema


@dataclass
class CatalogTrie:
    # per node (node 0 is the root)
    parent: np.ndarray  # int64, -1 for the root
    token: np.ndarray  # int64, -1 for the root
    depth: np.ndarray  # int32
    child_start: np.ndarray  # int64
    child_count: np.ndarray  # int32
    mass: np.ndarray  # float64, reference mass under the node
    entropy: np.ndarray  # float64, H(node)
    ig: np.ndarray  # float64, IG of the incoming edge (0 for the root)
    ig_norm: np.ndarray  # float64, IG~: ig min-max normalised among siblings (zero-mass branches: 0)
    zero_ig: np.ndarray  # bool
    # per catalog item, in item_id order
    item_ids: np.ndarray  # int64
    item_leaf: np.ndarray  # int64, node after the item's EOS
    item_path_ptr: np.ndarray  # int64 CSR offsets into item_path_nodes (len n_items + 1)
    item_path_nodes: np.ndarray  # int64, the nodes after each token of each item's sequence
    item_title_group: np.ndarray  # int64, smallest item_id sharing the item's token sequence
    item_reference_count: np.ndarray  # float64

    @property
    def num_nodes(self) -> int:
        return len(self.parent)

    @property
    def max_depth(self) -> int:
        return int(self.depth.max()) if self.num_nodes else 0

    def item_index(self, item_ids: np.ndarray) -> np.ndarray:
        """Row of each item id in the per-item arrays, -1 for items outside the catalog."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        pos = np.searchsorted(self.item_ids, item_ids)
        pos = np.clip(pos, 0, max(len(self.item_ids) - 1, 0))
        found = len(self.item_ids) > 0
        hit = found & (self.item_ids[pos] == item_ids) if found else np.zeros(len(item_ids), bool)
        return np.where(hit, pos, -1)

    def path(self, item_id: int) -> np.ndarray:
        """Nodes reached after each token of the item's sequence (the last one is its leaf)."""
        (row,) = self.item_index(np.array([item_id]))
        if row < 0:
            raise KeyError(item_id)
        return self.item_path_nodes[self.item_path_ptr[row] : self.item_path_ptr[row + 1]]

    def tokens(self, item_id: int) -> np.ndarray:
        return self.token[self.path(item_id)]

    # -- persistence -------------------------------------------------------------------------------
    def node_frame(self) -> pl.DataFrame:
        return schema.conform(
            pl.DataFrame(
                {
                    "node_id": np.arange(self.num_nodes, dtype=np.int64),
                    "parent": self.parent,
                    "token": self.token,
                    "depth": self.depth,
                    "child_start": self.child_start,
                    "child_count": self.child_count,
                    "mass": self.mass,
                    "entropy": self.entropy,
                    "ig": self.ig,
                    "ig_norm": self.ig_norm,
                    "zero_ig": self.zero_ig,
                }
            ),
            "trie_nodes",
        )

    def item_frame(self) -> pl.DataFrame:
        lengths = np.diff(self.item_path_ptr)
        tokens = pl.Series("tokens", self.token[self.item_path_nodes]).cast(pl.Int64)
        return schema.conform(
            pl.DataFrame(
                {
                    "item_id": self.item_ids,
                    "leaf": self.item_leaf,
                    "tokens": _split(tokens, lengths),
                    "title_group": self.item_title_group,
                    "reference_count": self.item_reference_count,
                }
            ),
            "item_paths",
        )

    def save(self, nodes_path: Path, items_path: Path) -> None:
        self.node_frame().write_parquet(nodes_path)
        self.item_frame().write_parquet(items_path)

    @classmethod
    def load(cls, nodes_path: Path, items_path: Path) -> "CatalogTrie":
        nodes = schema.read(nodes_path, "trie_nodes")
        items = schema.read(items_path, "item_paths").sort("item_id")
        trie = cls(
            parent=nodes["parent"].to_numpy(),
            token=nodes["token"].to_numpy(),
            depth=nodes["depth"].to_numpy(),
            child_start=nodes["child_start"].to_numpy(),
            child_count=nodes["child_count"].to_numpy(),
            mass=nodes["mass"].to_numpy(),
            entropy=nodes["entropy"].to_numpy(),
            ig=nodes["ig"].to_numpy(),
            ig_norm=nodes["ig_norm"].to_numpy(),
            zero_ig=nodes["zero_ig"].to_numpy(),
            item_ids=items["item_id"].to_numpy(),
            item_leaf=items["leaf"].to_numpy(),
            item_path_ptr=np.zeros(items.height + 1, dtype=np.int64),
            item_path_nodes=np.zeros(0, dtype=np.int64),
            item_title_group=items["title_group"].to_numpy(),
            item_reference_count=items["reference_count"].to_numpy(),
        )
        lengths = items["tokens"].list.len().to_numpy().astype(np.int64)
        trie.item_path_ptr[1:] = np.cumsum(lengths)
        trie.item_path_nodes = _paths_from_tokens(trie, items["tokens"].explode().to_numpy().astype(np.int64), lengths)
        return trie


def _split(flat: pl.Series, lengths: np.ndarray) -> pl.Series:
    """Cut a flat series into a list series of the given lengths."""
    ids = np.repeat(np.arange(len(lengths)), lengths)
    df = pl.DataFrame({"row": ids, "v": flat})
    grouped = df.group_by("row", maintain_order=True).agg(pl.col("v"))
    full = pl.DataFrame({"row": np.arange(len(lengths))}).join(grouped, on="row", how="left")
    return full["v"].fill_null(pl.lit([], dtype=pl.List(flat.dtype)))


def _paths_from_tokens(trie: CatalogTrie, flat_tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Re-derive each item's node path from its tokens: one vectorised child lookup per depth."""
    n = len(lengths)
    out = np.zeros(len(flat_tokens), dtype=np.int64)
    current = np.zeros(n, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if n else np.zeros(0, np.int64)
    for d in range(int(lengths.max()) if n else 0):
        live = lengths > d
        rows = np.nonzero(live)[0]
        tok = flat_tokens[starts[rows] + d]
        lo = trie.child_start[current[rows]]
        hi = lo + trie.child_count[current[rows]]
        # children are token-sorted within [lo, hi): binary search by offset
        child = _search_children(trie.token, lo, hi, tok)
        current[rows] = child
        out[starts[rows] + d] = child
    return out


def _search_children(token: np.ndarray, lo: np.ndarray, hi: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    lo = lo.copy()
    hi = hi.copy()
    while True:
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) // 2
        go_right = active & (token[np.minimum(mid, len(token) - 1)] < wanted)
        lo = np.where(go_right, mid + 1, lo)
        hi = np.where(active & ~go_right, mid, hi)
    if (token[lo] != wanted).any():
        raise ValueError("item tokens do not follow the trie")
    return lo


def build_catalog_trie(
    item_ids: Sequence[int] | np.ndarray,
    sequences: Sequence[Sequence[int]],
    reference_counts: Sequence[float] | np.ndarray,
) -> CatalogTrie:
    """Build the trie and its entropy/IG arrays from item token sequences and reference counts."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum()))
    return build_catalog_trie_flat(item_ids, flat, lengths, reference_counts)


def build_catalog_trie_flat(
    item_ids: Sequence[int] | np.ndarray,
    flat_tokens: np.ndarray,
    lengths: np.ndarray,
    reference_counts: Sequence[float] | np.ndarray,
) -> CatalogTrie:
    """`build_catalog_trie` for sequences given as one flat token array plus per-item lengths.

    Cost is a lexicographic sort of the items plus O(items) array work per depth, so a million titles
    take seconds and memory stays a few times the token array.
    """
    item_ids = np.asarray(item_ids, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    flat_tokens = np.asarray(flat_tokens, dtype=np.int64)
    counts = np.asarray(reference_counts, dtype=np.float64)
    n = len(item_ids)
    if n == 0:
        raise ValueError("empty catalog")
    if len(lengths) != n or len(counts) != n:
        raise ValueError("item_ids, lengths and reference_counts differ in length")
    if lengths.min() < 1 or int(lengths.sum()) != len(flat_tokens):
        raise ValueError("every item needs a non-empty token sequence, and lengths must cover flat_tokens")
    if (counts < 0).any() or not np.isfinite(counts).all():
        raise ValueError("reference counts must be finite and non-negative")
    if flat_tokens.min() < 0:
        raise ValueError("token ids must be non-negative")

    order = np.argsort(item_ids, kind="stable")
    if n > 1 and (np.diff(item_ids[order]) == 0).any():
        raise ValueError("duplicate item ids")
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    # Per-item rows, in item_id order from here on.
    item_ids, counts, lengths = item_ids[order], counts[order], lengths[order]
    path_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=path_ptr[1:])
    gather = np.repeat(starts[order] - path_ptr[:-1], lengths) + np.arange(path_ptr[-1])
    flat_tokens = flat_tokens[gather]
    del gather

    width = int(lengths.max())
    # Padded matrix (int32 halves its memory); the -1 pad sorts before every real token, so a
    # sequence sorts right before its extensions.
    token_dtype = np.int32 if flat_tokens.max() < np.iinfo(np.int32).max else np.int64
    matrix = np.full((n, width), -1, dtype=token_dtype)
    rows = np.repeat(np.arange(n), lengths)
    matrix[rows, np.arange(len(flat_tokens)) - path_ptr[rows]] = flat_tokens
    del rows
    sorted_rows = np.lexsort(matrix.T[::-1])
    matrix = matrix[sorted_rows]
    len_sorted = lengths[sorted_rows]
    ptr_sorted = path_ptr[:-1][sorted_rows]

    # first_diff[r]: first depth where sorted row r differs from row r-1 (width if equal). The rows
    # under a node at depth d+1 are a contiguous block, and blocks at that depth start exactly where
    # first_diff <= d.
    first_diff = np.full(n, width, dtype=np.int64)
    first_diff[0] = 0
    equal_so_far = np.ones(n - 1, dtype=bool)
    for d in range(width):
        equal_so_far &= matrix[1:, d] == matrix[:-1, d]
        first_diff[1:][(first_diff[1:] == width) & ~equal_so_far] = d

    total = counts.sum()
    p = counts / total if total > 0 else np.zeros(n)
    positive = p > 0
    plogp = np.zeros(n)
    plogp[positive] = -p[positive] * np.log(p[positive])
    p_sorted, plogp_sorted = p[sorted_rows], plogp[sorted_rows]
    positive_sorted = positive[sorted_rows].astype(np.int64)

    # Row r opens one new node at each depth in [first_diff[r], length[r]); nodes are numbered level
    # by level and, within a level, in sorted-row order, so the node arrays can be allocated up front.
    opens = first_diff < len_sorted
    level_size = np.cumsum(
        np.bincount(first_diff[opens], minlength=width + 1) - np.bincount(len_sorted[opens], minlength=width + 1)
    )[:width]
    level_offset = 1 + np.concatenate([[0], np.cumsum(level_size)])
    num_nodes = int(level_offset[-1])
    parent = np.full(num_nodes, -1, dtype=np.int64)
    token = np.full(num_nodes, -1, dtype=np.int64)
    depth = np.zeros(num_nodes, dtype=np.int32)
    mass = np.zeros(num_nodes)
    entropy = np.zeros(num_nodes)
    n_positive = np.zeros(num_nodes, dtype=np.int64)
    # Root sums are plain sums over all items; below, a node's sums are reduceat over its block of rows.
    mass[0], entropy[0], n_positive[0] = p.sum(), plogp.sum(), positive.sum()
    path_flat = np.zeros(len(flat_tokens), dtype=np.int64)
    node_of_row = np.zeros(n, dtype=np.int64)  # node at the current depth of each sorted row
    for d in range(width):
        level = slice(level_offset[d], level_offset[d + 1])
        is_block_start = first_diff <= d
        block_starts = np.nonzero(is_block_start)[0]
        live = len_sorted[block_starts] > d
        new_rows = block_starts[live]
        parent[level] = node_of_row[new_rows]
        token[level] = matrix[new_rows, d]
        depth[level] = d + 1
        mass[level] = np.add.reduceat(p_sorted, block_starts)[live]
        entropy[level] = np.add.reduceat(plogp_sorted, block_starts)[live]
        n_positive[level] = np.add.reduceat(positive_sorted, block_starts)[live]
        # Every row takes the node of the block it lies in; rows too short for this depth drop out.
        block_node = np.full(len(block_starts), -1, dtype=np.int64)
        block_node[live] = np.arange(level.start, level.stop)
        live_rows = np.nonzero(len_sorted > d)[0]
        node_of_row[live_rows] = block_node[np.cumsum(is_block_start)[live_rows] - 1]
        path_flat[ptr_sorted[live_rows] + d] = node_of_row[live_rows]
    del matrix, node_of_row, p_sorted, plogp_sorted, positive_sorted

    child_count = np.bincount(parent[1:], minlength=num_nodes).astype(np.int32)
    child_start = np.ones(num_nodes, dtype=np.int64)
    np.cumsum(child_count[:-1], out=child_start[1:])
    child_start[1:] += 1

    zero_ig = np.zeros(num_nodes, dtype=bool)
    zero_ig[1:] = n_positive[1:] == n_positive[parent[1:]]
    has_reference = n_positive > 0
    del n_positive
    ig = np.zeros(num_nodes)
    np.subtract(entropy[parent[1:]], entropy[1:], out=ig[1:])
    # Forced tokens are exactly zero; elsewhere clip the rounding of near-equal float sums.
    ig[zero_ig] = 0.0
    np.maximum(ig, 0.0, out=ig)
    ig_norm = _normalise_among_siblings(ig, child_start, child_count, has_reference)

    leaf = path_flat[path_ptr[1:] - 1]
    return CatalogTrie(
        parent=parent, token=token, depth=depth, child_start=child_start, child_count=child_count,
        mass=mass, entropy=entropy, ig=ig, ig_norm=ig_norm, zero_ig=zero_ig,
        item_ids=item_ids, item_leaf=leaf, item_path_ptr=path_ptr, item_path_nodes=path_flat,
        item_title_group=_title_groups(item_ids, leaf), item_reference_count=counts,
    )


def _normalise_among_siblings(
    ig: np.ndarray, child_start: np.ndarray, child_count: np.ndarray, has_reference: np.ndarray
) -> np.ndarray:
    """IG~: min-max of IG within each sibling group (the allowed next tokens at a node); all equal -> 0.

    `has_reference[v]`: some item under node v has positive reference mass. A child without any gets
    IG~ = 0 (no calibration boost, w_d = 1) and is left out of its siblings' min and max (docs/method.md
    §4.1): its raw IG is H(parent), the largest possible, only because the reference distribution knows
    nothing under it. Calibration thus redistributes weight among the branches the reference knows.
    With smoothing > 0 no node has zero mass and this is plain min-max.
    """
    out = np.zeros_like(ig)
    counts = child_count[child_count > 0]
    if len(counts) == 0:
        return out
    # Nodes 1.. are exactly all children, grouped by parent in increasing parent order.
    group_starts = child_start[child_count > 0] - 1
    known = has_reference[1:]
    lo = np.minimum.reduceat(np.where(known, ig[1:], np.inf), group_starts)
    hi = np.maximum.reduceat(np.where(known, ig[1:], -np.inf), group_starts)
    child_lo, child_span = np.repeat(lo, counts), np.repeat(hi - lo, counts)
    # Groups without any known child have lo = inf: every child there is unknown and stays 0.
    scaled = known & (child_span > 0)
    out[1:][scaled] = (ig[1:][scaled] - child_lo[scaled]) / child_span[scaled]
    return out


def _title_groups(item_ids: np.ndarray, leaf: np.ndarray) -> np.ndarray:
    """Smallest item id sharing each item's leaf (items with the same title share a leaf)."""
    if len(leaf) == 0:
        return leaf.copy()
    smallest = np.full(int(leaf.max()) + 1, np.iinfo(np.int64).max)
    np.minimum.at(smallest, leaf, item_ids)
    return smallest[leaf]


# -- what training sees --------------------------------------------------------------------------------
def item_token_values(trie: CatalogTrie) -> pl.DataFrame:
    """Per catalog item, the IG and zero-IG flag of each of its tokens, in token order."""
    lengths = np.diff(trie.item_path_ptr)
    cells = pl.DataFrame(
        {
            "item_id": np.repeat(trie.item_ids, lengths),
            "ig": trie.ig[trie.item_path_nodes],
            "zero_ig": trie.zero_ig[trie.item_path_nodes],
        }
    )
    return cells.group_by("item_id", maintain_order=True).agg("ig", "zero_ig")


def sample_ig(item_values: pl.DataFrame, samples: pl.DataFrame) -> pl.DataFrame:
    """Each sample's target-token IG lists (null for targets outside the catalog), in sample order.

    A join instead of a per-sample loop: the lists are the target item's, and the target's tokens are
    exactly the SFT labels (both come from `prompt.item_token_sequence`).
    """
    joined = samples.select("sample_id", "item_id").join(item_values, on="item_id", how="left", maintain_order="left")
    return schema.conform(joined, "sample_ig")


def token_stats(trie: CatalogTrie, train_item_ids: np.ndarray) -> dict:
    """Paper Table 4's token columns over the training targets (docs/method.md §4), plus the share by position."""
    rows = trie.item_index(train_item_ids)
    frequency = np.bincount(rows[rows >= 0], minlength=len(trie.item_ids))
    lengths = np.diff(trie.item_path_ptr)
    zero = trie.zero_ig[trie.item_path_nodes]
    position = np.arange(len(zero)) - np.repeat(trie.item_path_ptr[:-1], lengths)
    weight = np.repeat(frequency, lengths)
    tokens_at = np.bincount(position, weights=weight)
    zero_at = np.bincount(position, weights=weight * zero)
    tokens, zero_tokens = int(tokens_at.sum()), int(zero_at.sum())
    used = int(np.nonzero(tokens_at)[0].max()) + 1 if tokens else 0
    tokens_at, zero_at = tokens_at[:used], zero_at[:used]
    return {
        "tokens": tokens,
        "zero_ig_tokens": zero_tokens,
        "zero_ig_share": zero_tokens / tokens if tokens else 0.0,
        "zero_ig_share_by_position": [
            round(z / t, 6) if t else None for z, t in zip(zero_at.tolist(), tokens_at.tolist())
        ],
        "train_outside_catalog": int((rows < 0).sum()),
    }
