"""D3's text-free assistant (TFA) as a per-step guide inside beam search (docs/method.md §6).

A traditional recommender gives every catalog item a probability q(i). For a beam at trie node v, each
allowed child c gets the assistant's conditional log-probability

    tfa(c) = log( Q(c) / Σ_{allowed children c'} Q(c') + 1e-20 ),   Q(v) = Σ q(i) over items under v,

and the step score becomes g · (llm − tfa) + tfa, with llm the (IG-calibrated) LLM step score and g the
guidance. Items that share a title share a trie leaf, so each of their ids adds its mass to that leaf.
A node whose allowed children all have zero mass gives each of them the floor log(1e-20) (the assistant
puts no mass there, so it has no preference to offer, only the penalty for having gone there).

The masses Q of B samples are computed on the decoding device in one pass up the trie: the item
masses land on their leaves, then each level, deepest first, adds its nodes' masses into their parents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from igdrec.ig import CatalogTrie

TFA_EPSILON = 1e-20  # added to the child's share, so a child without assistant mass scores log(1e-20), not -inf


@dataclass
class MassTree:
    """What summing item masses up the catalog trie needs, as tensors on the decoding device."""

    item_leaf: torch.Tensor  # (n_items,) leaf node of each item row (trie.item_ids order)
    parent: torch.Tensor  # (n_nodes,) -1 for the root
    level_start: list[int]  # the nodes of depth d are [level_start[d], level_start[d + 1])

    @classmethod
    def from_trie(cls, trie: CatalogTrie, device: torch.device | str = "cpu") -> "MassTree":
        depth = np.asarray(trie.depth, dtype=np.int64)
        if len(depth) > 1 and (np.diff(depth) < 0).any():
            raise ValueError("trie nodes must be numbered level by level")
        level_start = np.searchsorted(depth, np.arange(int(depth.max()) + 2) if len(depth) else [0]).tolist()
        return cls(
            item_leaf=torch.tensor(np.asarray(trie.item_leaf, dtype=np.int64), device=device),
            parent=torch.tensor(np.asarray(trie.parent, dtype=np.int64), device=device),
            level_start=level_start,
        )

    @property
    def num_items(self) -> int:
        return len(self.item_leaf)

    @property
    def num_nodes(self) -> int:
        return len(self.parent)


def node_mass(tree: MassTree, item_probs: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Q (B, n_nodes) float32 on the tree's device: Σ item_probs[b, i] over the items i under each node.

    `item_probs` is (B, n_items) (or (n_items,) for one sample), aligned with the trie's item rows.
    """
    device = tree.parent.device
    q = torch.as_tensor(item_probs, device=device).to(torch.float32)
    if q.dim() == 1:
        q = q[None, :]
    if q.dim() != 2 or q.shape[1] != tree.num_items:
        raise ValueError(f"assistant probabilities of shape {tuple(q.shape)}: expected (samples, {tree.num_items} catalog items)")
    if not bool(torch.isfinite(q).all()) or bool((q < 0).any()):
        raise ValueError("assistant probabilities must be finite and non-negative")
    mass = torch.zeros((q.shape[0], tree.num_nodes), dtype=torch.float32, device=device)
    mass.index_add_(1, tree.item_leaf, q)
    for d in range(len(tree.level_start) - 2, 0, -1):  # deepest level first; the root (depth 0) has no parent
        lo, hi = tree.level_start[d], tree.level_start[d + 1]
        mass.index_add_(1, tree.parent[lo:hi], mass[:, lo:hi].clone())  # source and target are one tensor
    return mass


def tfa_log_share(child_mass: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """tfa = log(Q(c) / Σ_allowed Q(c') + 1e-20) per column of (rows, children) masses; not-allowed
    columns take no part in the sum (their value is meaningless)."""
    mass = torch.where(allowed, child_mass, 0.0)
    total = mass.sum(dim=1, keepdim=True)
    share = torch.where(total > 0, mass / torch.where(total > 0, total, 1.0), 0.0)
    return torch.log(share + TFA_EPSILON)


def guided_step(llm: torch.Tensor, tfa: torch.Tensor, guidance: float) -> torch.Tensor:
    """D3's combined step score g · (llm − tfa) + tfa."""
    return guidance * (llm - tfa) + tfa
