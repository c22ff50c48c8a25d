"""From beams to final ranked lists: deduplication, D3's text-free assistant, BIGRec's L2 grounding.

- `dedup_topk`: one entry per item and per title, ties broken by (score desc, item_id asc).
- `tfa_rescore` (D3, docs/method.md §6): a traditional recommender's item distribution q guides each step:
  tfa_d = log(Q(node_d) / Q(parent)), Q(v) = Σ q(i) over items under trie node v (the child mass of q
  renormalised over the allowed children), and the beam is rescored by Σ_d g·(llm_d − tfa_d) + tfa_d.
- `l2_grounding` (BIGRec): embed texts with the LLM's last-layer hidden state of the last token and
  map each generated text to the catalog title nearest in L2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch

from igdrec.errors import IgdrecError
from igdrec.ig import CatalogTrie

TFA_FLOOR = 1e-12  # a child with no assistant mass gets log(1e-12) rather than -inf


def dedup_topk(candidates: pl.DataFrame, top_k: int) -> pl.DataFrame:
    """Best `top_k` distinct items per sample from (sample_id, item_id, title, score) rows.

    A title repeated under several ids, or an id repeated, keeps only its best-scored entry.
    """
    ranked = (
        candidates.filter(pl.col("item_id").is_not_null())
        .with_columns(pl.col("title").fill_null("").str.strip_chars().alias("_title"))
        .sort(["sample_id", "score", "item_id"], descending=[False, True, False])
        .unique(subset=["sample_id", "item_id"], keep="first", maintain_order=True)
        .unique(subset=["sample_id", "_title"], keep="first", maintain_order=True)
        .with_columns(pl.int_range(pl.len()).over("sample_id").cast(pl.Int32).alias("rank"))
        .filter(pl.col("rank") < top_k)
    )
    return ranked.select("sample_id", "rank", "item_id", "score")


def tfa_probabilities(tfa: pl.DataFrame, trie: CatalogTrie, source: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per sample: (catalog rows, q) with q = softmax of the assistant's scores over the listed items."""
    rows = trie.item_index(tfa["item_id"].to_numpy())
    if (rows < 0).any():
        bad = int(np.nonzero(rows < 0)[0][0])
        raise IgdrecError(f"{source}: row {bad}: item_id {tfa['item_id'][bad]} is not in the catalog")
    dup = tfa.select("sample_id", "item_id").is_duplicated()
    if dup.any():
        bad = int(dup.arg_true()[0])
        raise IgdrecError(f"{source}: row {bad}: sample {tfa['sample_id'][bad]} scores item {tfa['item_id'][bad]} twice")
    scores = tfa["score"].to_numpy()
    if not np.isfinite(scores).all():
        bad = int(np.nonzero(~np.isfinite(scores))[0][0])
        raise IgdrecError(f"{source}: row {bad}: score is not finite")
    out = {}
    frame = tfa.with_columns(pl.Series("_row", rows)).group_by("sample_id", maintain_order=True).agg("_row", "score")
    for sample_id, item_rows, item_scores in frame.iter_rows():
        s = np.asarray(item_scores, dtype=np.float64)
        q = np.exp(s - s.max())
        out[int(sample_id)] = (np.asarray(item_rows, dtype=np.int64), q / q.sum())
    return out


def node_mass(trie: CatalogTrie, item_rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q(v) = Σ q over the items under every trie node v (an item with several ids counts each id)."""
    lengths = trie.item_path_ptr[item_rows + 1] - trie.item_path_ptr[item_rows]
    starts = np.repeat(trie.item_path_ptr[item_rows], lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    nodes = trie.item_path_nodes[starts + offsets]
    mass = np.bincount(nodes, weights=np.repeat(q, lengths), minlength=trie.num_nodes)
    mass[0] = q.sum()
    return mass


def tfa_rescore(beams: pl.DataFrame, trie: CatalogTrie, q_by_sample: dict, guidance: float, source: Path) -> np.ndarray:
    """Combined score Σ_d g·(llm_d − tfa_d) + tfa_d of every beam row (llm_d = stored step log-probs)."""
    out = np.empty(beams.height)
    mass_cache: dict[int, np.ndarray] = {}
    for i, (sample_id, item_id, step_logprobs) in enumerate(beams.select("sample_id", "item_id", "step_logprobs").iter_rows()):
        if sample_id not in q_by_sample:
            raise IgdrecError(f"{source}: no assistant scores for sample {sample_id}")
        if sample_id not in mass_cache:
            mass_cache = {sample_id: node_mass(trie, *q_by_sample[sample_id])}  # beams come grouped by sample
        mass = mass_cache[sample_id]
        path = trie.path(item_id)
        parents = np.concatenate([[0], path[:-1]])
        ratio = mass[path] / np.where(mass[parents] > 0, mass[parents], 1.0)
        tfa = np.log(np.maximum(ratio, TFA_FLOOR))
        llm = np.asarray(step_logprobs, dtype=np.float64)
        out[i] = float(np.sum(guidance * (llm - tfa) + tfa))
    return out


@torch.no_grad()
def last_token_embeddings(model, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """BIGRec's text embedding: the last layer's hidden state at the last (non-pad) token."""
    device = next(model.parameters()).device
    chunks = []
    for begin in range(0, len(texts), batch_size):
        batch = tokenizer(texts[begin:begin + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
        if tokenizer.padding_side == "left":
            last = hidden[:, -1]
        else:
            last = hidden[torch.arange(hidden.shape[0]), batch["attention_mask"].sum(1) - 1]
        chunks.append(last.float().cpu())
    return torch.cat(chunks) if chunks else torch.zeros((0, 0))


def l2_grounding(generated: torch.Tensor, catalog: torch.Tensor) -> np.ndarray:
    """Index of the catalog embedding nearest (L2) to each generated embedding (ties: lowest index)."""
    return torch.cdist(generated.double(), catalog.double()).argmin(dim=1).numpy()
