"""The fine-tuning data: one split's samples, encoded once, collated into left-padded batches.

Sequences are padded on the left, so every sample's target tokens end the row and the logits predicting
them are the same trailing positions in the main and in CFT's reference pass (igdrec.sft_loss).

Throughput without changing the loss (the gradient of an effective batch is a sum over its samples, so how
they are split into micro-batches changes nothing but float rounding):
- length grouping: the rows of an effective batch are sorted by encoded length before the split into
  micro-batches (`micro_batch_rows`), so each micro-batch pads to little more than its own longest row;
- encodings are tokenised once and kept for later epochs;
- a batch carries the prompt prefix all its rows start with (`Batch.prefix_ids`), which the forward
  computes once (igdrec.sft_loss).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch

from igdrec import weighting
from igdrec.config import MSL_WEIGHTINGS
from igdrec.ig import CatalogTrie
from igdrec.prompt import encode_prompt, encode_sample, shared_prefix_len


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) left-padded prompt + target
    attention_mask: torch.Tensor
    targets: torch.Tensor  # (B, m) target ids, right-aligned; IGNORE where a sample has fewer than m
    weights: torch.Tensor  # (B, m) token weights of the scheme, 0 on padding
    zero_ig: torch.Tensor  # (B, m) target token is zero-IG (False where unknown or padding)
    positive_ig: torch.Tensor  # (B, m) target token has IG > 0 (False where unknown or padding)
    high_ig: torch.Tensor  # (B, m) positive IG above the group threshold (low IG = positive_ig & ~high_ig)
    prefix_ids: torch.Tensor | None = None  # (1, p) tokens every row starts with (see `shared_prefix_len`)
    allowed: torch.Tensor | None = None  # MSL: (2, K) pairs (flat target position b·m + j, trie-valid token)
    ref_input_ids: torch.Tensor | None = None  # CFT reference prompt + target, left-padded
    ref_attention_mask: torch.Tensor | None = None
    ref_prefix_ids: torch.Tensor | None = None

    def to(self, device: torch.device) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device, non_blocking=True) if v is not None else None for k, v in moved.items()})

    def passes(self) -> list[tuple[list[int], int]]:
        """(real tokens of each row, shared prefix length) of the main and CFT's reference pass (host side)."""
        out = []
        for mask, prefix in ((self.attention_mask, self.prefix_ids), (self.ref_attention_mask, self.ref_prefix_ids)):
            if mask is not None:
                out.append((mask.sum(-1).tolist(), 0 if prefix is None else prefix.shape[1]))
        return out


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


class SFTExamples:
    """One split's samples for fine-tuning, encoded once (on first use) and collated into batches.

    `zero_ig[i]` holds the zero-IG flags of sample i's target tokens (aligned with
    `item_token_sequence`); `zero_ig` is None when no IG index is available, and an entry is None for a
    target outside the index's catalog (IGD then weighs that sample's tokens 1, as nothing marks them forced).
    `ig[i]` holds the same tokens' IG values (same None pattern); a positive-IG token is "high" when its IG
    exceeds `ig_group_threshold` and "low" otherwise (docs/method.md §5, the CE-by-IG-group logs).
    MSL schemes take the catalog `trie` and `target_nodes[i]`, the trie nodes after each of sample i's target
    tokens (None outside the catalog: MSL has no softmax for a target the trie cannot spell, so such a
    validation sample is left unlabelled).
    """

    def __init__(
        self,
        tokenizer,
        histories: Sequence[Sequence[int]],
        targets: Sequence[int],
        titles: Sequence[str],
        item_sequences: Sequence[Sequence[int]],
        category: str,
        scheme: str,
        beta: float,
        cutoff_len: int | None,
        zero_ig: Sequence[np.ndarray] | None = None,
        with_reference: bool = False,
        ig: Sequence[np.ndarray | None] | None = None,
        ig_group_threshold: float | None = None,
        sample_ids: Sequence[int] | None = None,  # named in errors (default: the row)
        trie: CatalogTrie | None = None,
        target_nodes: Sequence[np.ndarray | None] | None = None,
    ):
        if scheme in ("igd", "msl-igd") and zero_ig is None:
            raise ValueError("IGD weighting needs zero-IG flags")
        if scheme in MSL_WEIGHTINGS and (trie is None or target_nodes is None):
            raise ValueError("MSL needs the catalog trie and the target tokens' trie nodes")
        self.tokenizer = tokenizer
        self.histories = histories
        self.targets = targets
        self.titles = titles
        self.item_sequences = item_sequences
        self.category = category
        self.scheme = scheme
        self.beta = beta
        self.cutoff_len = cutoff_len
        self.zero_ig = zero_ig
        self.ig = ig
        self.ig_group_threshold = ig_group_threshold
        self.sample_ids = sample_ids
        self.trie = trie if scheme in MSL_WEIGHTINGS else None
        self.target_nodes = target_nodes
        self.reference_prompt_ids = encode_prompt(tokenizer, [], category, None)[0] if with_reference else None
        self._encoded: dict[int, tuple[np.ndarray, int]] = {}

    def __len__(self) -> int:
        return len(self.targets)

    def encoded(self, i: int) -> tuple[np.ndarray, int]:
        """Sample i's prompt + target ids and its prompt length, tokenised on first use only."""
        found = self._encoded.get(i)
        if found is None:
            target = self.item_sequences[self.targets[i]]
            history = [self.titles[item] for item in self.histories[i]]
            title = self.titles[self.targets[i]]
            name = f"sample_id {self.sample_ids[i]}" if self.sample_ids is not None else f"sample {i}"
            label = f"{name} (target {title[:40]!r}{'…' if len(title) > 40 else ''})"
            sample = encode_sample(self.tokenizer, history, self.category, target, self.cutoff_len, sample=label)
            found = self._encoded[i] = (np.asarray(sample.input_ids, dtype=np.int64), sample.prompt_len)
        return found

    def length(self, i: int) -> int:
        return len(self.encoded(i)[0])

    def collate(self, rows: Sequence[int]) -> Batch:
        sequences, prompt_lens, target_seqs, weight_rows, zero_rows, high_rows = [], [], [], [], [], []
        for i in rows:
            target = self.item_sequences[self.targets[i]]
            ids, prompt_len = self.encoded(i)
            sequences.append(ids)
            prompt_lens.append(prompt_len)
            flags = None if self.zero_ig is None else self.zero_ig[i]
            zero = None if flags is None else torch.as_tensor(flags, dtype=torch.bool)
            target_seqs.append(target)
            scheme = "plain" if self.scheme == "igd" and zero is None else self.scheme
            choice, weight_zero = None, zero
            if self.trie is not None:  # outside the catalog: no choice, so weight 0 whatever the flags
                nodes = self.target_nodes[i]
                none = torch.zeros(len(target), dtype=torch.bool)
                choice = none if nodes is None else torch.as_tensor(self.trie.child_count[self.trie.parent[nodes]] > 1)
                weight_zero = none if zero is None else zero
            weight_rows.append(weighting.token_weights(scheme, len(target), self.beta, weight_zero, choice))
            zero_rows.append(zero)
            values = None if self.ig is None or zero is None or self.ig_group_threshold is None else self.ig[i]
            high_rows.append(None if values is None else ~zero & torch.as_tensor(np.asarray(values) > self.ig_group_threshold))
        input_ids, attention_mask = left_pad(sequences, self.tokenizer.pad_token_id)
        m = max(len(t) for t in target_seqs)
        targets = torch.full((len(rows), m), weighting.IGNORE, dtype=torch.long)
        weights = torch.zeros((len(rows), m))
        zero_ig = torch.zeros((len(rows), m), dtype=torch.bool)
        positive_ig = torch.zeros((len(rows), m), dtype=torch.bool)
        high_ig = torch.zeros((len(rows), m), dtype=torch.bool)
        for row, (target, w, zero, high) in enumerate(zip(target_seqs, weight_rows, zero_rows, high_rows)):
            n = len(target)
            targets[row, m - n:] = torch.as_tensor(target)
            weights[row, m - n:] = w
            if zero is not None:
                zero_ig[row, m - n:] = zero
                positive_ig[row, m - n:] = ~zero
            if high is not None:
                high_ig[row, m - n:] = high
        allowed = None
        if self.trie is not None:
            allowed = self._allowed_pairs(rows, m, targets)
        p = shared_prefix_len(sequences, prompt_lens)
        batch = Batch(input_ids, attention_mask, targets, weights, zero_ig, positive_ig, high_ig,
                      prefix_ids=torch.as_tensor(sequences[0][:p])[None] if p > 0 else None, allowed=allowed)
        if self.reference_prompt_ids is not None:
            ref = [np.asarray(self.reference_prompt_ids + list(t), dtype=np.int64) for t in target_seqs]
            batch.ref_input_ids, batch.ref_attention_mask = left_pad(ref, self.tokenizer.pad_token_id)
            p = shared_prefix_len(ref, [len(self.reference_prompt_ids)] * len(ref))
            batch.ref_prefix_ids = torch.as_tensor(ref[0][:p])[None] if p > 0 else None
        return batch

    def _allowed_pairs(self, rows: Sequence[int], m: int, targets: torch.Tensor) -> torch.Tensor:
        """MSL: the (2, K) pairs (flat position b·m + j, token) of every trie child of each target token's
        parent node, gathered from the trie's CSR arrays in one pass. A row whose target is outside the
        catalog is made unlabelled (IGNORE) in `targets`."""
        trie, positions, parents = self.trie, [], []
        for row, i in enumerate(rows):
            nodes = self.target_nodes[i]
            if nodes is None:
                targets[row] = weighting.IGNORE
                continue
            positions.append(row * m + m - len(nodes) + np.arange(len(nodes)))
            parents.append(trie.parent[nodes])
        if not positions:
            return torch.zeros((2, 0), dtype=torch.long)
        position, parent = np.concatenate(positions), np.concatenate(parents)
        count = trie.child_count[parent].astype(np.int64)
        first = np.repeat(np.cumsum(count) - count, count)
        child = np.repeat(trie.child_start[parent], count) + np.arange(int(count.sum())) - first
        return torch.as_tensor(np.stack([np.repeat(position, count), trie.token[child]]))


def micro_batch_rows(data: SFTExamples, rows: torch.Tensor | list[int], size: int, length_grouping: bool) -> list[list[int]]:
    """Split one rank's share of an effective batch into micro-batches; with `length_grouping` the rows are
    first sorted by encoded length (stable, so ties keep the data order), which leaves the summed gradient
    unchanged and cuts padding."""
    rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
    if length_grouping:
        rows = sorted(rows, key=data.length)
    return [rows[i:i + size] for i in range(0, len(rows), size)]
