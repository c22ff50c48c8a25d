"""The catalog trie and the information gain of every token (SPEC §4), built with array operations.

Every catalog item is a path of token ids (`prompt.item_token_sequence`) ending in EOS, so no item ends
inside another's path. Nodes are numbered level by level, and within a level in lexicographic order of
their prefixes: the root is node 0, and the children of any node are a contiguous, token-sorted range
`[child_start, child_start + child_count)`. That is what lets decoding gather allowed tokens and their
weights as tensors instead of walking a Python trie.

Reference distribution p_r(i) ∝ count(i) (training-target frequency, optionally smoothed). For a node v,
H(v) = -Σ_{i under v} p_r(i) log p_r(i) (not renormalised) and the edge into child c has
IG(c) = H(v) - H(c). IG(c) = 0 exactly when every reference item under v lies under c; that is decided
from integer counts of positive-mass items, so forced tokens are exactly zero, never 1e-17.
"""

from __future__ import annotations

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
    ig_norm: np.ndarray  # float64, ig min-max normalised among siblings
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

    def leaf_items(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for leaf, item in zip(self.item_leaf.tolist(), self.item_ids.tolist()):
            out.setdefault(leaf, []).append(item)
        return out

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
    item_ids = np.asarray(item_ids, dtype=np.int64)
    order = np.argsort(item_ids, kind="stable")
    item_ids = item_ids[order]
    counts = np.asarray(reference_counts, dtype=np.float64)[order]
    n = len(item_ids)
    lengths = np.fromiter((len(sequences[i]) for i in order), dtype=np.int64, count=n)
    if n and lengths.min() == 0:
        raise ValueError("empty item token sequence")
    width = int(lengths.max()) if n else 0
    # Padded matrix; -1 pads sort before every real token.
    matrix = np.full((n, width), -1, dtype=np.int64)
    flat = np.fromiter((t for i in order for t in sequences[i]), dtype=np.int64, count=int(lengths.sum()))
    rows_of_flat = np.repeat(np.arange(n), lengths)
    cols_of_flat = np.arange(len(flat)) - np.repeat(np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    matrix[rows_of_flat, cols_of_flat] = flat
    return _build_from_matrix(item_ids, matrix, lengths, counts)


def _build_from_matrix(item_ids: np.ndarray, matrix: np.ndarray, lengths: np.ndarray, counts: np.ndarray) -> CatalogTrie:
    n, width = matrix.shape
    total = counts.sum()
    p = counts / total if total > 0 else np.zeros(n)
    plogp = np.zeros(n)
    positive = p > 0
    plogp[positive] = -p[positive] * np.log(p[positive])

    # Lexicographic row order (last key is primary for lexsort).
    sorted_rows = np.lexsort(matrix.T[::-1]) if n else np.zeros(0, dtype=np.int64)
    m = matrix[sorted_rows]
    len_sorted = lengths[sorted_rows]
    # First position where each row differs from the previous one (width if identical).
    first_diff = np.zeros(n, dtype=np.int64)
    if n > 1:
        differs = m[1:] != m[:-1]
        any_diff = differs.any(axis=1)
        first_diff[1:] = np.where(any_diff, differs.argmax(axis=1), width)

    path_nodes = np.zeros((n, width), dtype=np.int64)  # node after token d of each sorted row
    parent_chunks, token_chunks, depth_chunks = [np.array([-1])], [np.array([-1])], [np.array([0])]
    next_id = 1
    prev_level = np.zeros(n, dtype=np.int64)  # node at depth d of each row (root for d = 0)
    for d in range(width):
        live = len_sorted > d
        new_node = live & (first_diff <= d)
        new_node[0] = live[0] if n else False
        level_index = np.cumsum(new_node) - 1
        ids = next_id + level_index
        starts = np.nonzero(new_node)[0]
        parent_chunks.append(prev_level[starts])
        token_chunks.append(m[starts, d])
        depth_chunks.append(np.full(len(starts), d + 1))
        next_id += len(starts)
        path_nodes[:, d] = np.where(live, ids, -1)
        prev_level = np.where(live, ids, prev_level)

    parent = np.concatenate(parent_chunks).astype(np.int64)
    token = np.concatenate(token_chunks).astype(np.int64)
    depth = np.concatenate(depth_chunks).astype(np.int32)
    num_nodes = len(parent)

    valid = path_nodes >= 0
    node_of_cell = path_nodes[valid]
    row_of_cell = np.broadcast_to(np.arange(n)[:, None], (n, width))[valid]
    sorted_p = p[sorted_rows]
    mass = np.bincount(node_of_cell, weights=sorted_p[row_of_cell], minlength=num_nodes)
    entropy = np.bincount(node_of_cell, weights=plogp[sorted_rows][row_of_cell], minlength=num_nodes)
    n_positive = np.bincount(node_of_cell, weights=positive[sorted_rows][row_of_cell].astype(np.float64), minlength=num_nodes)
    mass[0], entropy[0], n_positive[0] = sorted_p.sum(), plogp.sum(), positive.sum()

    child_count = np.bincount(parent[1:], minlength=num_nodes).astype(np.int32)
    child_start = np.searchsorted(parent[1:], np.arange(num_nodes), side="left").astype(np.int64) + 1

    zero_ig = np.zeros(num_nodes, dtype=bool)
    zero_ig[1:] = n_positive[1:] == n_positive[parent[1:]]
    ig = np.zeros(num_nodes)
    ig[1:] = np.where(zero_ig[1:], 0.0, np.maximum(entropy[parent[1:]] - entropy[1:], 0.0))
    ig_norm = _normalise_among_siblings(ig, child_start, child_count)

    # Per item (back in item_id order): its node path and leaf.
    unsort = np.empty(n, dtype=np.int64)
    unsort[sorted_rows] = np.arange(n)
    item_paths = path_nodes[unsort]
    path_ptr = np.zeros(n + 1, dtype=np.int64)
    path_ptr[1:] = np.cumsum(lengths)
    path_flat = item_paths[item_paths >= 0]  # row-major keeps each item's nodes in order
    leaf = item_paths[np.arange(n), lengths - 1] if n else np.zeros(0, dtype=np.int64)
    title_group = _title_groups(item_ids, leaf)
    return CatalogTrie(
        parent=parent, token=token, depth=depth, child_start=child_start, child_count=child_count,
        mass=mass, entropy=entropy, ig=ig, ig_norm=ig_norm, zero_ig=zero_ig,
        item_ids=item_ids, item_leaf=leaf, item_path_ptr=path_ptr, item_path_nodes=path_flat,
        item_title_group=title_group, item_reference_count=counts,
    )


def _normalise_among_siblings(ig: np.ndarray, child_start: np.ndarray, child_count: np.ndarray) -> np.ndarray:
    """Min-max of IG within each sibling group (the allowed next tokens at a node); all equal -> 0."""
    out = np.zeros_like(ig)
    parents = np.nonzero(child_count > 0)[0]
    if len(parents) == 0:
        return out
    # Nodes 1.. are exactly all children, grouped by parent in increasing parent order.
    group_starts = child_start[parents] - 1
    lo = np.minimum.reduceat(ig[1:], group_starts)
    span = np.maximum.reduceat(ig[1:], group_starts) - lo
    group_of_child = np.repeat(np.arange(len(parents)), child_count[parents])
    g_lo, g_span = lo[group_of_child], span[group_of_child]
    out[1:] = np.where(g_span > 0, (ig[1:] - g_lo) / np.where(g_span > 0, g_span, 1.0), 0.0)
    return out


def _title_groups(item_ids: np.ndarray, leaf: np.ndarray) -> np.ndarray:
    """Smallest item id sharing each item's leaf (items with the same title share a leaf)."""
    if len(leaf) == 0:
        return leaf.copy()
    smallest = np.full(int(leaf.max()) + 1, np.iinfo(np.int64).max)
    np.minimum.at(smallest, leaf, item_ids)
    return smallest[leaf]
