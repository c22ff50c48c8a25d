"""Sample windows (history → target) as padded tensors for the traditional sequential recommenders.

Item ids are dense 0..n_items-1 and id 0 is a real item, so histories are padded with the extra index
`n_items` (RecBole reserves id 0 instead). Histories are right-padded, oldest item first, and cut to their
`max_len` most recent items, as RecBole stores `item_id_list`; a model reads its output at position
`length - 1`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import polars as pl
import torch

from igdrec.errors import IgdrecError


@dataclass
class SequenceBatch:
    item_seq: torch.Tensor  # (B, max_len) int64, right-padded with the padding index n_items
    item_seq_len: torch.Tensor  # (B,) int64, ≥ 1
    target: torch.Tensor  # (B,) int64, the next item

    def to(self, device: torch.device) -> "SequenceBatch":
        return SequenceBatch(self.item_seq.to(device), self.item_seq_len.to(device), self.target.to(device))


@dataclass
class SequenceData:
    """Every window of one split, in sample_id order."""

    sample_ids: np.ndarray  # (N,) int64
    item_seq: torch.Tensor  # (N, max_len)
    item_seq_len: torch.Tensor  # (N,)
    target: torch.Tensor  # (N,)
    n_items: int

    @property
    def pad_index(self) -> int:
        return self.n_items

    def __len__(self) -> int:
        return len(self.sample_ids)

    @classmethod
    def from_samples(cls, samples: pl.DataFrame, n_items: int, max_len: int, source: str = "samples") -> "SequenceData":
        """Build from a frame of the `samples` schema; `source` names the file in error messages."""
        samples = samples.sort("sample_id")
        targets = samples["item_id"].to_numpy().astype(np.int64)
        sample_ids = samples["sample_id"].to_numpy().astype(np.int64)
        item_seq, lengths = pad_histories(samples["history_item_ids"].to_list(), sample_ids, n_items, max_len, source)
        bad = targets[(targets < 0) | (targets >= n_items)]
        if bad.size:
            raise IgdrecError(f"{source}: target item id {int(bad[0])} is outside the catalog's ids 0..{n_items - 1}")
        return cls(sample_ids, item_seq, lengths, torch.from_numpy(targets), n_items)

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[SequenceBatch]:
        """Consecutive batches; shuffled by `generator` when one is given (a training epoch)."""
        order = torch.randperm(len(self), generator=generator) if generator is not None else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            index = order[start:start + batch_size]
            yield SequenceBatch(self.item_seq[index], self.item_seq_len[index], self.target[index])

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)


def pad_histories(histories: Sequence[Sequence[int]], sample_ids: Sequence[int], n_items: int, max_len: int,
                  source: str = "samples") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, max_len) right-padded item ids, oldest first, of each history's `max_len` most recent items,
    and (N,) their lengths; `sample_ids` and `source` name a bad history in the error."""
    item_seq = np.full((len(histories), max_len), n_items, dtype=np.int64)
    lengths = np.zeros(len(histories), dtype=np.int64)
    for row, history in enumerate(histories):
        if not len(history):
            raise IgdrecError(f"{source}: sample {sample_ids[row]} has an empty history; a sequential model needs at least one item")
        recent = history[-max_len:]
        item_seq[row, : len(recent)] = recent
        lengths[row] = len(recent)
    ids = item_seq[np.arange(max_len) < lengths[:, None]]  # by position: an id equal to the padding index is bad too
    bad = ids[(ids < 0) | (ids >= n_items)]
    if bad.size:
        raise IgdrecError(f"{source}: history item id {int(bad[0])} is outside the catalog's ids 0..{n_items - 1}")
    return torch.from_numpy(item_seq), torch.from_numpy(lengths)
