"""Rerank: dedup and ties, D3's text-free assistant against hand computation, L2 grounding."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch
from decode_helpers import publish_ig

from fixtures import TITLES, synthetic_run
from igdrec import reranking, schema
from igdrec.config import RerankConfig
from igdrec.errors import IgdrecError
from igdrec.ig import build_catalog_trie
from igdrec.rundir import StageWriter
from igdrec.stages import rerank


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


@pytest.fixture()
def small_trie():
    # eos = 0; items 0: [5, 6, 0], 1: [5, 7, 0], 2: [8, 0]
    return build_catalog_trie([0, 1, 2], [[5, 6, 0], [5, 7, 0], [8, 0]], [1, 1, 1])


def test_tfa_step_scores_match_hand_computation(small_trie, tmp_path):
    scores = [0.3, 1.2, -0.4]
    tfa = pl.DataFrame({"sample_id": [7, 7, 7], "item_id": [0, 1, 2], "score": scores})
    q = np.exp(scores) / np.exp(scores).sum()
    llm = [-0.7, -1.1, -0.05]
    beams = pl.DataFrame({"sample_id": [7, 7], "item_id": [1, 2], "step_logprobs": [llm, llm[:2]]})
    probabilities = reranking.tfa_probabilities(tfa, small_trie, tmp_path / "tfa.parquet")
    g = 0.5
    got = reranking.tfa_rescore(beams, small_trie, probabilities, g, tmp_path / "tfa.parquet")
    tfa_item1 = [math.log(q[0] + q[1]), math.log(q[1] / (q[0] + q[1])), 0.0]
    tfa_item2 = [math.log(q[2]), 0.0]
    expected1 = sum(g * (l - t) + t for l, t in zip(llm, tfa_item1))
    expected2 = sum(g * (l - t) + t for l, t in zip(llm[:2], tfa_item2))
    np.testing.assert_allclose(got, [expected1, expected2], rtol=1e-12)
    plain = reranking.tfa_rescore(beams, small_trie, probabilities, 1.0, tmp_path / "tfa.parquet")
    np.testing.assert_allclose(plain, [sum(llm), sum(llm[:2])], rtol=1e-12)


def test_tfa_rejects_unknown_items_and_duplicates(small_trie, tmp_path):
    source = tmp_path / "tfa.parquet"
    bad = pl.DataFrame({"sample_id": [0, 0], "item_id": [0, 99], "score": [0.0, 0.0]})
    with pytest.raises(IgdrecError, match="tfa.parquet: row 1: item_id 99"):
        reranking.tfa_probabilities(bad, small_trie, source)
    dup = pl.DataFrame({"sample_id": [0, 0], "item_id": [1, 1], "score": [0.0, 1.0]})
    with pytest.raises(IgdrecError, match="tfa.parquet: row 0: sample 0 scores item 1 twice"):
        reranking.tfa_probabilities(dup, small_trie, source)


def test_rerank_stage_with_tfa_reorders_by_combined_score(tmp_path, tiny_tokenizer):
    run = synthetic_run(tmp_path / "run")
    trie = publish_ig(run, tiny_tokenizer, "tiny")
    items = [0, 5, 12, 15]  # 12 and 15 share the title "Fargo (1996)": beams carry its group id 12
    rows = []
    for rank, item in enumerate([0, 5, 12]):
        path = trie.path(item)
        rows.append({"sample_id": 3, "rank": rank, "item_id": item, "title": TITLES[item], "score": -1.0 - rank,
                     "tokens": trie.token[path].tolist(), "step_logprobs": [-0.1 - 0.1 * rank] * len(path),
                     "prefix_entropy": trie.entropy[path].tolist()})
    beams = schema.conform(pl.DataFrame(rows), "beams")
    with StageWriter(run, "decode/hand", stage="decode", params={"split": "test", "limit": None, "model": "tiny"}) as out:
        beams.write_parquet(out.path("beams.parquet"))
        out.stats = {"n_samples": 1}
    tfa_path = tmp_path / "tfa.parquet"
    tfa = pl.DataFrame({"sample_id": [3] * 4, "item_id": items, "score": [0.0, 0.5, 3.0, 3.0]})
    tfa.write_parquet(tfa_path)
    manifest = rerank.run(RerankConfig(decode="hand", tfa_scores=str(tfa_path), tfa_guidance=0.3), run)
    top = schema.read(run.artifact(manifest["stage_path"], "topk.parquet"), "topk")
    q = reranking.tfa_probabilities(schema.read(tfa_path, "tfa_scores"), trie, tfa_path)
    expected = reranking.tfa_rescore(beams, trie, q, 0.3, tfa_path)
    order = np.argsort(-expected, kind="stable")
    assert top["item_id"].to_list() == [beams["item_id"][int(i)] for i in order]
    np.testing.assert_allclose(top["score"].to_numpy(), expected[order])
    assert top["item_id"][0] == 12  # the assistant's favourite title wins despite the lowest LLM score
    plain = rerank.run(RerankConfig(decode="hand", top_k=2), run)
    assert schema.read(run.artifact(plain["stage_path"], "topk.parquet"), "topk")["item_id"].to_list() == [0, 5]


def test_l2_grounding_is_nearest_neighbour():
    rng = np.random.default_rng(0)
    catalog = torch.tensor(rng.normal(size=(30, 8)))
    generated = torch.tensor(rng.normal(size=(12, 8)))
    brute = [int(np.argmin(((catalog.numpy() - g) ** 2).sum(1))) for g in generated.numpy()]
    assert reranking.l2_grounding(generated, catalog).tolist() == brute


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
