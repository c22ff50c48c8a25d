"""`reranking`: dedup and ties, the L2 top-k against a brute-force sort, catalog titles, last-token embeddings."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from igdrec import reranking


def test_dedup_keeps_best_entry_per_item_and_title_and_breaks_ties_by_item_id():
    candidates = pl.DataFrame({
        "sample_id": [0, 0, 0, 0, 0, 0, 1, 1],
        "item_id": [4, 7, 4, 2, 9, 3, None, 5],
        "title": ["D", "X", "D", "B", " X ", "C", "free text", "E"],
        "score": [-1.0, -2.0, -0.5, -2.0, -1.5, -3.0, -0.1, -4.0],
    })
    top = reranking.dedup_topk(candidates, top_k=3)
    # sample 0: item 4 best at -0.5; " X " (9, -1.5) beats "X" (7, -2.0); B (2) and X... tie at -2.0 is gone
    assert top.filter(pl.col("sample_id") == 0)["item_id"].to_list() == [4, 9, 2]
    assert top.filter(pl.col("sample_id") == 0)["score"].to_list() == [-0.5, -1.5, -2.0]
    assert top.filter(pl.col("sample_id") == 1)["item_id"].to_list() == [5]  # unmatched text dropped
    assert top["rank"].to_list() == [0, 1, 2, 0]
    tie = pl.DataFrame({"sample_id": [0, 0, 0], "item_id": [8, 3, 5], "title": ["a", "b", "c"], "score": [-1.0, -1.0, -1.0]})
    assert reranking.dedup_topk(tie, 10)["item_id"].to_list() == [3, 5, 8]


def test_l2_topk_equals_a_brute_force_sort_with_ties_to_the_lower_row():
    rng = np.random.default_rng(0)
    catalog = rng.normal(size=(30, 8))
    catalog[17] = catalog[4]  # an exact tie: row 4 must come first
    generated = rng.normal(size=(12, 8))
    generated[3] = catalog[4]
    rows, distances = reranking.l2_topk(torch.tensor(generated), torch.tensor(catalog), top_k=10)
    for g, got_rows, got_distances in zip(generated, rows, distances):
        brute = np.sqrt(((catalog - g) ** 2).sum(1))
        order = sorted(range(len(catalog)), key=lambda r: (brute[r], r))[:10]
        assert got_rows.tolist() == order
        np.testing.assert_allclose(got_distances, brute[order], atol=1e-12)
    assert rows[3][:2].tolist() == [4, 17] and distances[3][0] == 0.0
    assert reranking.l2_topk(torch.tensor(generated), torch.tensor(catalog), top_k=99)[0].shape == (12, 30)


def test_catalog_titles_keep_one_row_per_stripped_title_with_its_smallest_id():
    items = pl.DataFrame({"item_id": [0, 1, 2, 3, 4], "title": ["B", " A", "A ", "C", "A"]})
    titles = reranking.catalog_titles(items, np.array([1, 2, 3, 4]))  # item 0 is outside the catalog
    assert titles.rows() == [(1, "A"), (3, "C")]


def test_last_token_embeddings_ignore_left_padding(tiny_model_dir):
    from igdrec.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    texts = ["Heat", "The Godfather (1972)", "Star Wars (1977)"]
    batched = reranking.last_token_embeddings(model, tokenizer, texts, batch_size=3)
    for text, row in zip(texts, batched):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            alone = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
        torch.testing.assert_close(row, alone.float(), rtol=1e-4, atol=1e-5)
