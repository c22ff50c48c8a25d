"""The search-error diagnostic: did the search lose the ground truth, or did the model rank it low? (docs/method.md §6.8)

For each decoded sample the ground-truth title is scored teacher-forced, in one forward pass over prompt and
title, with the step scores of the decode's own search (`beam.step_scores`: w_d = 1 − α·IG~ over the node's
children, the assistant's share among the same siblings, then `beam.hypothesis_score`'s S / L^lp). The
sample is then

  * a *hit*: the ground truth's title is among the returned hypotheses;
  * a *search error*: it is not, although its score beats the K-th (last) returned hypothesis' score, or the
    search returned fewer than K hypotheses: the list is then provably not the K best under the search's own
    scores (the search pruned the ground truth's path although it ends above a returned item);
  * a *model error*: its score is at most the K-th's: an exact search (the K best) would not return it either;
  * *unreachable*: its title is not in the decoding catalog (or longer than the search may write), so no
    search over that catalog could return it.

The K-th hypothesis is scored teacher-forced in the same batch, so the comparison is between two numbers
computed the same way; its difference from the score the search reported (float noise of other batch
shapes only, since the formula is one function) is recorded, and a difference beyond rounding error is
refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import polars as pl
import torch

from igdrec.assistant import node_mass
from igdrec.beam import BeamSearch, cache_check_tolerance, hypothesis_score, step_scores
from igdrec.errors import IgdrecError

HIT, SEARCH_ERROR, MODEL_ERROR, UNREACHABLE = "hit", "search_error", "model_error", "unreachable"
CLASSES = (HIT, SEARCH_ERROR, MODEL_ERROR, UNREACHABLE)


class ScoreMismatchError(IgdrecError):
    """The teacher-forced score of a returned hypothesis differs from the score its search reported."""


@dataclass
class ScoredPaths:
    """Teacher-forced scores of (prompt, trie path) pairs and how far they may lie from a search's."""

    scores: np.ndarray  # float64 S / L^lp per pair
    tolerance: np.ndarray  # rounding error another batch shape may cause (beam.cache_check_tolerance per token)


@torch.no_grad()
def teacher_forced_scores(search: BeamSearch, prompts: Sequence[Sequence[int]], paths: Sequence[np.ndarray],
                          assistant_probs: torch.Tensor | np.ndarray | None = None) -> ScoredPaths:
    """The final score `search` gives each path (trie nodes after each token, EOS leaf last) after its prompt.

    One forward pass for the batch: the prompts and titles, left-padded, and the log p of every child of
    every node on each path at the position that writes it. `assistant_probs` as `BeamSearch.search` takes it.
    """
    trie = search.trie
    if trie is None:
        raise ValueError("teacher-forced scores follow the catalog trie (a constrained search)")
    device = next(search.model.parameters()).device
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in paths], dtype=torch.long, device=device)
    L = int(lengths.max())
    nodes = torch.zeros((B, L), dtype=torch.long, device=device)
    for i, path in enumerate(paths):
        nodes[i, : len(path)] = torch.as_tensor(np.asarray(path, dtype=np.int64), device=device)
    valid = torch.arange(L, device=device)[None, :] < lengths[:, None]
    parents = torch.cat([torch.zeros((B, 1), dtype=torch.long, device=device), nodes[:, :-1]], dim=1)
    tokens = trie.token[nodes]

    # [pad | prompt | title without its last token]: the last L positions' logits write the title's tokens
    feeds = [list(p) + tokens[i, : len(paths[i]) - 1].tolist() for i, p in enumerate(prompts)]
    width = max(len(f) for f in feeds)
    input_ids = torch.full((B, width), search.pad_token_id, dtype=torch.long, device=device)
    attention = torch.zeros((B, width), dtype=torch.long, device=device)
    for i, feed in enumerate(feeds):
        input_ids[i, width - len(feed):] = torch.tensor(feed, dtype=torch.long, device=device)
        attention[i, width - len(feed):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = search._forward(input_ids, attention, positions, None, keep=L, decoding=False)
    # row i's token j is written at kept position L - len_i + j
    column = (L - lengths[:, None] + torch.arange(L, device=device)[None, :]).clamp(min=0, max=L - 1)
    log_probs = torch.log_softmax(logits.float(), dim=-1)

    count = torch.where(valid, trie.child_count[parents], 0)
    M = max(int(count.max()), 1)
    offset = torch.arange(M, device=device)
    allowed = offset[None, None, :] < count[:, :, None]
    child = torch.where(allowed, trie.child_start[parents][:, :, None] + offset, 0)
    rows = torch.arange(B, device=device)[:, None, None]
    model_lp = log_probs[rows, column[:, :, None], trie.token[child]]
    child_mass = None
    if assistant_probs is not None:
        child_mass = node_mass(trie.mass_tree, assistant_probs)[rows, child].reshape(B * L, M)
    step = step_scores(model_lp.reshape(B * L, M), trie.ig_norm[child].reshape(B * L, M), allowed.reshape(B * L, M),
                       search.alpha, child_mass, search.tfa_guidance).reshape(B, L, M)
    taken = step.gather(2, (nodes - trie.child_start[parents]).clamp(min=0)[:, :, None])[:, :, 0]

    total = torch.zeros(B, dtype=step.dtype, device=device)
    for j in range(L):  # the search's order of additions, step by step in the step scores' dtype
        total = total + torch.where(valid[:, j], taken[:, j], 0.0)
    dtype = search.autocast_dtype or next(search.model.parameters()).dtype
    scale = logits.float().abs().amax(dim=(1, 2))
    scores, tolerance = np.empty(B), np.empty(B)
    for i in range(B):
        n = len(paths[i])
        scores[i] = float(hypothesis_score(total[i], n, search.length_penalty))
        # each token's log p may move by twice the logits' rounding bound (the logit and the log-sum-exp)
        tolerance[i] = 2 * n * cache_check_tolerance(search.model, dtype, width, float(scale[i])) / n ** search.length_penalty
    return ScoredPaths(scores, tolerance)


def classify(hit: np.ndarray, reachable: np.ndarray, gt_score: np.ndarray, kth_score: np.ndarray) -> list[str]:
    """Each sample's class (module docstring); `kth_score` is -inf where fewer than K hypotheses came back."""
    return [HIT if h else UNREACHABLE if not r else SEARCH_ERROR if g > k else MODEL_ERROR
            for h, r, g, k in zip(hit, reachable, gt_score, kth_score)]


def rates(classes: Sequence[str]) -> dict[str, float]:
    """The share of samples in each class (0 for none)."""
    n = len(classes)
    return {c: (sum(1 for x in classes if x == c) / n if n else 0.0) for c in CLASSES}


def rates_line(decode_name: str, stats: dict) -> str:
    """A search-errors stage's rates in one line (its stage.json stats)."""
    rates = stats["rates"]
    line = (f"search errors of decode {decode_name} ({stats['n_samples']:,} {stats['split']} samples, K = {stats['num_beams']}): "
            f"hit {rates[HIT]:.4f}, search error {rates[SEARCH_ERROR]:.4f}, model error {rates[MODEL_ERROR]:.4f}")
    if rates[UNREACHABLE]:
        line += f", unreachable (outside the catalog) {rates[UNREACHABLE]:.4f}"
    return line


def diagnose(decoder, samples: pl.DataFrame, beams: pl.DataFrame, where: str, assistant=None,
             progress: Callable[[int, int], None] | None = None) -> tuple[pl.DataFrame, float]:
    """Per sample of `samples` (sample_id, history_item_ids, item_id): its class, the ground truth's and the
    K-th hypothesis' teacher-forced scores, and the K-th's score as the decode reported it; and the largest
    |teacher-forced − reported| over the K-th hypotheses.

    `decoder` (igdrec.decoding.Decoder) holds the decode's model, catalog and search settings, `beams` its
    `beams` rows, `where` names that file in errors; `assistant` the decode's TextFreeAssistant, if it had one;
    `progress(done, total)` hears of each scored batch (sequences: about two per sample).
    """
    search, trie = decoder.engine, decoder.catalog.trie
    K = search.num_beams
    sample_ids = samples["sample_id"].to_list()
    histories = samples["history_item_ids"].to_list()
    by_sample = {s: frame.sort("rank") for (s,), frame in beams.group_by("sample_id")}
    gt_rows = trie.item_index(np.asarray(samples["item_id"].to_list(), dtype=np.int64))
    longest = search.max_new_tokens

    hit, reachable, kth_reported = [], [], []
    pairs = []  # (sample index, path, role)
    for i, (sample_id, row) in enumerate(zip(sample_ids, gt_rows)):
        returned = by_sample.get(sample_id)
        groups = set() if returned is None else set(returned["item_id"].to_list())
        path = trie.item_path_nodes[trie.item_path_ptr[row]:trie.item_path_ptr[row + 1]] if row >= 0 else None
        reachable.append(path is not None and len(path) <= longest)
        hit.append(row >= 0 and int(trie.item_title_group[row]) in groups)
        if reachable[-1] and not hit[-1]:
            pairs.append((i, path, "gt"))
        if returned is not None and returned.height >= K:
            last = returned.row(K - 1, named=True)
            kth = trie.item_index(np.asarray([last["item_id"] if last["item_id"] is not None else -1]))[0]
            kth_path = trie.item_path_nodes[trie.item_path_ptr[kth]:trie.item_path_ptr[kth + 1]] if kth >= 0 else None
            if kth_path is None or trie.token[kth_path].tolist() != last["tokens"]:
                raise IgdrecError(f"{where}: sample {sample_id} rank {K - 1}: item {last['item_id']} is not the catalog "
                                  "title its tokens spell; search errors need a constrained decode of this run's catalog")
            kth_reported.append(last["score"])
            pairs.append((i, kth_path, "kth"))
        else:
            kth_reported.append(None)

    gt_score = np.full(len(sample_ids), np.nan)
    kth_score = np.full(len(sample_ids), -np.inf)
    worst_gap = 0.0
    prompts = [decoder.prompt(h)[0] for h in histories]
    order = sorted(range(len(pairs)), key=lambda p: (len(prompts[pairs[p][0]]), p))  # similar lengths batch together
    batch = decoder.batch_size(max((len(p) for p in prompts), default=1), num_beams=1)
    for begin in range(0, len(order), batch):
        chunk = [pairs[p] for p in order[begin:begin + batch]]
        index = [i for i, _, _ in chunk]
        probs = None if assistant is None else assistant.probs([histories[i] for i in index], [sample_ids[i] for i in index])
        scored = teacher_forced_scores(search, [prompts[i] for i in index], [path for _, path, _ in chunk], probs)
        for (i, _, role), score, tolerance in zip(chunk, scored.scores, scored.tolerance):
            if role == "gt":
                gt_score[i] = score
                continue
            kth_score[i] = score
            gap = abs(score - kth_reported[i])
            worst_gap = max(worst_gap, gap)
            if not gap <= tolerance:
                raise ScoreMismatchError(
                    f"{where}: sample {sample_ids[i]}: the teacher-forced score {score:.6g} of the rank-{K - 1} hypothesis "
                    f"differs from the decode's {kth_reported[i]:.6g} by {gap:.3g} (rounding allows {tolerance:.2g}); the "
                    "decode's step scores are not the ones igdrec.beam.step_scores computes")
        if progress is not None:
            progress(begin + len(chunk), len(pairs))

    classes = classify(np.asarray(hit), np.asarray(reachable), gt_score, kth_score)
    frame = pl.DataFrame({
        "sample_id": sample_ids,
        "class": classes,
        "gt_score": [None if np.isnan(s) else float(s) for s in gt_score],
        "kth_score": [None if not np.isfinite(s) else float(s) for s in kth_score],
        "kth_reported_score": kth_reported,
    }, schema={"sample_id": pl.Int64, "class": pl.String, "gt_score": pl.Float64, "kth_score": pl.Float64,
               "kth_reported_score": pl.Float64})
    return frame, worst_gap
