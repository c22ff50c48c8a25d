"""From a decode's beams to final ranked lists: deduplication and BIGRec's L2 grounding.

- `dedup_topk`: one entry per item and per title, ties broken by (score desc, item_id asc).
- BIGRec's grounding (docs/method.md §6.5): `last_token_embeddings` embeds texts with a causal LM's
  last-layer hidden state at the last token; `l2_topk` ranks every catalog title by L2 distance to the
  embedding of a sample's top-1 free generation.

D3's text-free assistant is not here: it acts inside beam search, on every step's score (docs/method.md
§6.4, §6.6 on why post-hoc rescoring of the finished beams was dropped).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch


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


@torch.no_grad()
def last_token_embeddings(model, tokenizer, texts: list[str], batch_size: int) -> torch.Tensor:
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


def l2_topk(generated: torch.Tensor, catalog: torch.Tensor, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `top_k` catalog rows nearest (L2) to each generated embedding, nearest first.

    (rows, distances), each of shape (len(generated), min(top_k, len(catalog))). Every catalog row is
    scored, as BIGRec ranks the whole catalog; equal distances keep the lower row first. Distances are
    computed in float64 so that the order does not depend on the batch or the device.
    """
    distances = torch.cdist(generated.double(), catalog.double())
    k = min(top_k, catalog.shape[0])
    # a stable full sort, not topk: topk's order among equal values is unspecified
    order = torch.sort(distances, dim=1, stable=True).indices[:, :k]
    return order.numpy(), torch.gather(distances, 1, order).numpy()


def catalog_titles(items: pl.DataFrame, catalog_item_ids: np.ndarray) -> pl.DataFrame:
    """One row per distinct stripped title of the catalog, carried by its smallest item id.

    A title shared by several ids is one text with one embedding, so ranking distinct titles is the
    same as ranking every id and letting a title count at its best rank.
    """
    return (
        items.filter(pl.col("item_id").is_in(catalog_item_ids.tolist()))
        .with_columns(pl.col("title").fill_null("").str.strip_chars())
        .group_by("title")
        .agg(pl.col("item_id").min())
        .sort("item_id")
        .select("item_id", "title")
    )
