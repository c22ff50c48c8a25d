"""Scoring a trained recommender: full ranking over every catalog item, the ranked lists, the metrics.

Full ranking as RecBole's full-sort evaluation of sequential models: every item is a candidate, the
items of the history included (RecBole masks history items only for non-sequential models). A ranked
list keeps one item per title (the best-scoring id; ties by smaller id), because the metrics match by
title (docs/method.md §7) and an LLM's list never holds one title twice. Metric values come from
`igdrec.metrics`, the one implementation the `metrics` stage uses.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import polars as pl
import torch

from igdrec import metrics as M
from igdrec.seqrec.data import SequenceData
from igdrec.seqrec.models import SequentialRecommender


def title_groups(titles: Sequence[str]) -> np.ndarray:
    """For items 0..n-1 with these titles: the smallest id carrying each item's (stripped) title."""
    first: dict[str, int] = {}
    return np.asarray([first.setdefault(t.strip(), i) for i, t in enumerate(titles)], dtype=np.int64)


@torch.no_grad()
def full_sort_scores(model: SequentialRecommender, data: SequenceData, batch_size: int, device: torch.device) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows of `data`, (B, n_items) scores on the CPU) batch by batch, the model in eval mode."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        start = 0
        for batch in data.batches(batch_size):
            scores = model.full_sort_predict(batch.to(device)).float().cpu()
            yield slice(start, start + len(batch.target)), scores
            start += len(batch.target)
    finally:
        if was_training:
            model.train()


def rank_items(scores: torch.Tensor, k: int, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k item ids and their scores per row, best first, ties by smaller id, one item per title group.

    Rows may come back shorter than k only if the catalog has fewer than k titles; such rows are padded
    with -1 ids (and NaN scores).
    """
    n_groups = len(np.unique(group))
    width = min(scores.shape[1], k + (scores.shape[1] - n_groups))  # enough to find k distinct titles
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :width].numpy()
    items = np.full((scores.shape[0], k), -1, dtype=np.int64)
    values = np.full((scores.shape[0], k), np.nan, dtype=np.float64)
    dense = scores.numpy()
    if n_groups == scores.shape[1]:  # every title distinct: the sorted prefix is the list
        take = min(k, width)
        items[:, :take] = order[:, :take]
    else:
        for row in range(order.shape[0]):
            _, first = np.unique(group[order[row]], return_index=True)
            kept = order[row, np.sort(first)][:k]
            items[row, : len(kept)] = kept
    valid = items >= 0
    values[valid] = np.take_along_axis(dense, np.where(valid, items, 0), axis=1)[valid]
    return items, values


def ranked_lists(model: SequentialRecommender, data: SequenceData, k: int, group: np.ndarray, batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """`rank_items` over all of `data`: (N, k) item ids and (N, k) scores in sample_id order."""
    items = np.empty((len(data), k), dtype=np.int64)
    values = np.empty((len(data), k), dtype=np.float64)
    for rows, scores in full_sort_scores(model, data, batch_size, device):
        items[rows], values[rows] = rank_items(scores, k, group)
    return items, values


def ranking_metric_values(lists: np.ndarray, targets: np.ndarray, titles: Sequence[str], ks: Sequence[int]) -> dict[str, float]:
    """Mean NDCG@K / HR@K of ranked item lists, through the metrics stage's title matching."""
    predicted = [[titles[i] for i in row if i >= 0] for row in lists]
    ranks = M.match_ranks(predicted, [titles[t] for t in targets])
    return {name: float(v.mean()) if len(v) else 0.0 for name, v in M.ranking_metrics(ranks, ks).items()}


class RankingEvaluator:
    """NDCG@K / HR@K of a model on one split (the validation signal of early stopping)."""

    def __init__(self, data: SequenceData, titles: Sequence[str], ks: Sequence[int], batch_size: int, device: torch.device | None = None):
        self.data = data
        self.titles = list(titles)
        self.ks = list(ks)
        self.group = title_groups(self.titles)
        self.batch_size = batch_size
        self.device = device or torch.device("cpu")

    def evaluate(self, model: SequentialRecommender) -> dict[str, float]:
        lists, _ = ranked_lists(model, self.data, max(self.ks), self.group, self.batch_size, self.device)
        return ranking_metric_values(lists, self.data.target.numpy(), self.titles, self.ks)


def topk_frame(model: SequentialRecommender, data: SequenceData, k: int, titles: Sequence[str], batch_size: int, device: torch.device) -> pl.DataFrame:
    """The ranked lists as rows of the `topk` schema (sample_id, 0-based rank, item_id, score)."""
    items, values = ranked_lists(model, data, k, title_groups(titles), batch_size, device)
    valid = items >= 0
    return pl.DataFrame({
        "sample_id": np.repeat(data.sample_ids, k)[valid.ravel()],
        "rank": np.tile(np.arange(k, dtype=np.int32), len(data))[valid.ravel()],
        "item_id": items[valid],
        "score": values[valid],
    })

