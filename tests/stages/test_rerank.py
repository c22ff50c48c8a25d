"""The rerank stage: BIGRec's grounding (whole-catalog L2 ranking) against brute force."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from decode_helpers import publish_ig

from fixtures import TITLES, synthetic_run
from igdrec import reranking, schema
from igdrec.config import RerankConfig
from igdrec.errors import IgdrecError
from igdrec.rundir import StageWriter
from igdrec.stages import rerank


def publish_free_decode(run, name: str, top1_texts: dict[int, str], model_spec: str, inputs: dict | None = None, source: str | None = None):
    """A decode of unconstrained generations written by hand: per sample, a rank-0 text and a rank-1 decoy."""
    rows = []
    for sample_id, text in top1_texts.items():
        for rank, title in enumerate([text, "Decoy text that must be ignored"]):
            rows.append({"sample_id": sample_id, "rank": rank, "item_id": None, "title": title, "score": -1.0 - rank,
                         "tokens": [1, 2], "step_logprobs": [-0.5, -0.5], "prefix_entropy": [float("nan")] * 2})
    params = {"source": source or name, "model": model_spec, "split": "test", "limit": None}
    with StageWriter(run, f"decode/{name}", stage="decode", params=params, inputs=inputs or {}, force=True) as out:
        schema.conform(pl.DataFrame(rows, schema_overrides={"item_id": pl.Int64}), "beams").write_parquet(out.path("beams.parquet"))
        out.stats = {"n_samples": len(top1_texts)}


def embed_alone(model, tokenizer, text: str) -> np.ndarray:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1].double().numpy()


def test_grounding_ranks_the_whole_catalog_by_l2_to_the_top1_generation(tmp_path, tiny_model_dir, monkeypatch):
    from igdrec.modeling import load_model, load_tokenizer

    run = synthetic_run(tmp_path / "run")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    publish_ig(run, tokenizer, str(tiny_model_dir))
    texts = {0: "The Godfather (1972)", 1: "Fargo (1996)", 2: "a space movie with robots", 3: "  "}
    publish_free_decode(run, "free", texts, str(tiny_model_dir))
    manifest = rerank.run(RerankConfig(decode="free", grounding=True, top_k=20, grounding_batch_size=4), run)
    top = schema.read(run.artifact(manifest["stage_path"], "topk.parquet"), "topk")
    assert manifest["params"]["grounding_model"] == str(tiny_model_dir)  # a --model decode embeds with its model
    assert manifest["stats"]["empty_generations"] == 1 and set(top["sample_id"]) == {0, 1, 2}

    # brute force: every distinct title embedded alone (no padding), sorted by L2 to the generation's embedding
    model = load_model(str(tiny_model_dir))
    distinct = {}
    for item_id, title in enumerate(TITLES):
        distinct.setdefault(title.strip(), item_id)  # "Fargo (1996)" is items 12 and 15: it counts once, as 12
    catalog = {title: embed_alone(model, tokenizer, title) for title in distinct}
    for sample_id, text in list(texts.items())[:3]:
        g = embed_alone(model, tokenizer, text)
        brute = sorted(distinct, key=lambda t: (np.linalg.norm(catalog[t] - g), distinct[t]))
        got = top.filter(pl.col("sample_id") == sample_id).sort("rank")
        assert got["item_id"].to_list() == [distinct[t] for t in brute]  # all 19 distinct titles, nearest first
        np.testing.assert_allclose(-got["score"].to_numpy(), [np.linalg.norm(catalog[t] - g) for t in brute], rtol=1e-4, atol=1e-4)
        assert 15 not in got["item_id"].to_list()
    first = dict(top.filter(pl.col("rank") == 0).select("sample_id", "item_id").iter_rows())
    assert first[0] == TITLES.index("The Godfather (1972)") and first[1] == 12  # a generation equal to a title: that title first

    # the catalog's embeddings are cached per model: a second decode grounded with it embeds only its generations
    embedded = []
    original = reranking.last_token_embeddings
    monkeypatch.setattr(reranking, "last_token_embeddings", lambda m, t, texts, *a: embedded.extend(texts) or original(m, t, texts, *a))
    publish_free_decode(run, "free2", {5: "Heat"}, str(tiny_model_dir))
    second = rerank.run(RerankConfig(decode="free2", grounding=True, top_k=3), run)
    assert embedded == ["Heat"]
    again = schema.read(run.artifact(second["stage_path"], "topk.parquet"), "topk")
    assert again["item_id"][0] == TITLES.index("Heat") and again.height == 3


def test_grounding_model_defaults_to_the_fine_tunes_base(tmp_path):
    run = synthetic_run(tmp_path / "run")
    with StageWriter(run, "sft/lora", stage="sft", params={"model": "org/base-model", "lora": True}) as out:
        out.path("model/adapter_config.json").write_text('{"base_model_name_or_path": "org/base-model"}')
    sft = run.require("sft/lora", hint="test")
    model_dir = str(run.stage_dir("sft/lora") / "model")
    publish_free_decode(run, "from-sft", {0: "x"}, model_dir, inputs={"sft": sft["fingerprint"]}, source="lora")
    publish_free_decode(run, "from-model", {0: "x"}, "org/plain-model")
    assert rerank.base_model(run, run.require("decode/from-sft", hint="test")) == "org/base-model"
    assert rerank.base_model(run, run.require("decode/from-model", hint="test")) == "org/plain-model"
    with pytest.raises(IgdrecError, match="only used with --grounding"):
        rerank.run(RerankConfig(decode="from-model", grounding_model="org/other"), run)
