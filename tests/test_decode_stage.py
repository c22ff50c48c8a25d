"""The decode stage end to end: artifacts, chaining by default names, resume, refusals."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from decode_helpers import CacheIgnoringModel, publish_ig, save_peaked_model
from fixtures import synthetic_run
from tiny_model import build_tokenizer
from typer.testing import CliRunner

from igdrec import schema
from igdrec.cli import app
from igdrec.config import DecodeConfig
from igdrec.beam import CacheMismatchError
from igdrec.errors import IgdrecError
from igdrec.ig import CatalogTrie
from igdrec.modeling import load_tokenizer
from igdrec.stages import decode


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_peaked_model(tmp_path_factory.mktemp("peaked"))


@pytest.fixture()
def run(tmp_path, model_dir):
    run = synthetic_run(tmp_path / "run")
    publish_ig(run, load_tokenizer(str(model_dir)), str(model_dir))
    return run


def test_beams_artifact_is_consistent_with_the_trie(run, model_dir):
    config = DecodeConfig(model=str(model_dir), limit=5, num_beams=4, alpha=0.2, length_penalty=1.0, batch_size=3, shard_size=2)
    manifest = decode.run(config, run)
    name = manifest["stage_path"].split("/", 1)[1]
    beams = schema.read(run.artifact(f"decode/{name}", "beams.parquet"), "beams")
    trie = CatalogTrie.load(run.artifact("ig", "trie_nodes.parquet"), run.artifact("ig", "item_paths.parquet"))
    items = schema.read(run.artifact("data", "items.parquet"), "items")
    test_ids = schema.read(run.artifact("data", "test.parquet"), "samples").sort("sample_id")["sample_id"].head(5)
    assert beams["sample_id"].unique().sort().to_list() == test_ids.to_list()
    assert beams.group_by("sample_id").agg(pl.col("rank").sort())["rank"].to_list() == [[0, 1, 2, 3]] * 5
    titles = dict(zip(items["item_id"], items["title"]))
    for row in beams.iter_rows(named=True):
        path = trie.path(row["item_id"])
        assert trie.token[path].tolist() == row["tokens"]
        assert titles[row["item_id"]] == row["title"]
        assert row["item_id"] == min(i for i, t in titles.items() if t == row["title"])  # title group
        np.testing.assert_allclose(row["prefix_entropy"], trie.entropy[path])
        weights = 1 - 0.2 * trie.ig_norm[path]
        assert row["score"] == pytest.approx(np.dot(weights, row["step_logprobs"]) / len(path), rel=1e-5)
    scores = beams.sort(["sample_id", "rank"]).group_by("sample_id", maintain_order=True).agg("score")["score"]
    assert all(list(s) == sorted(s, reverse=True) for s in scores)
    stats = manifest["stats"]
    assert stats["n_samples"] == 5 and stats["forward_calls"] > 0 and stats["forward_calls_saved_by_jump_forward"] >= 0
    assert manifest["inputs"].keys() >= {"data", "ig"}
    assert not list((run.root / ".partial").glob("*"))


def test_killed_decode_resumes_from_the_last_finished_shard(run, model_dir, monkeypatch):
    config = DecodeConfig(model=str(model_dir), limit=6, num_beams=3, shard_size=2, batch_size=2, name="resumed")
    real = decode._decode_shard
    calls = []

    def dies_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "_decode_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        decode.run(config, run)
    assert run.manifest("decode/resumed") is None  # nothing published
    calls.clear()
    monkeypatch.setattr(decode, "_decode_shard", lambda *a, **k: calls.append(1) or real(*a, **k))
    manifest = decode.run(config, run)
    assert len(calls) == 2 and manifest["stats"]["resumed_samples"] == 2
    resumed = schema.read(run.artifact("decode/resumed", "beams.parquet"), "beams")
    monkeypatch.setattr(decode, "_decode_shard", real)
    fresh_manifest = decode.run(DecodeConfig(**{**config.__dict__, "name": "fresh"}), run)
    fresh = schema.read(run.artifact("decode/fresh", "beams.parquet"), "beams")
    assert resumed.drop("score", "step_logprobs").equals(fresh.drop("score", "step_logprobs"))
    np.testing.assert_allclose(resumed["score"].to_numpy(), fresh["score"].to_numpy(), rtol=1e-5)
    assert fresh_manifest["stats"]["resumed_samples"] == 0


def test_refuses_an_ig_index_from_another_tokenizer(tmp_path, model_dir):
    run = synthetic_run(tmp_path / "run")
    publish_ig(run, build_tokenizer(vocab_size=300), "other-tokenizer")
    with pytest.raises(IgdrecError, match="item_paths.parquet: item 0: .*another tokenizer"):
        decode.run(DecodeConfig(model=str(model_dir), limit=1), run)
    assert run.manifest(f"decode/{decode.default_name('peaked', DecodeConfig(limit=1))}") is None


def test_decode_refuses_a_model_that_ignores_the_kv_cache(run, model_dir, monkeypatch):
    real_load = decode.load_model
    monkeypatch.setattr(decode, "load_model", lambda *args, **kwargs: CacheIgnoringModel(real_load(*args, **kwargs)))
    config = DecodeConfig(model=str(model_dir), limit=3, num_beams=4, name="ignored-cache")
    with pytest.raises(CacheMismatchError, match="KV-cache self-check failed"):
        decode.run(config, run)
    assert run.manifest("decode/ignored-cache") is None
    assert not run.stage_dir("decode/ignored-cache").exists()


def test_cli_chains_default_names(run, model_dir):
    runner = CliRunner()
    common = ["--run-dir", str(run.root)]
    result = runner.invoke(app, ["decode", "--model", str(model_dir), "--limit", "4", "--num-beams", "3", *common])
    assert result.exit_code == 0, result.output
    name = decode.default_name(model_dir.name, DecodeConfig(limit=4, num_beams=3))
    assert f"igdrec rerank --decode {name}" in " ".join(result.output.split())
    result = runner.invoke(app, ["rerank", *common])  # the only decode: --decode may be omitted
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["metrics", *common])
    assert result.exit_code == 0, result.output
    assert "NDCG@K" in result.output and "4 of" in result.output
    summary = (run.root / "metrics" / f"{name}.json").read_text()
    assert '"NDCG@3"' in summary and '"NDCG@10"' not in summary and '"limited": true' in summary  # 3 beams: @10 dropped
    result = runner.invoke(app, ["decode", "--split", "train", *common])
    assert result.exit_code != 0 and "--split" in result.output


def test_unconstrained_decode_then_l2_grounding_lands_on_catalog_items(run, model_dir):
    from igdrec.config import RerankConfig
    from igdrec.stages import rerank

    manifest = decode.run(DecodeConfig(model=str(model_dir), limit=2, num_beams=3, constrained=False, max_new_tokens=5), run)
    name = manifest["stage_path"].split("/", 1)[1]
    assert name.endswith("-free-n2")
    beams = schema.read(run.artifact(f"decode/{name}", "beams.parquet"), "beams")
    assert beams.height == 6 and beams["tokens"].list.len().max() <= 5
    grounded = rerank.run(RerankConfig(decode=name, grounding=True), run)
    top = schema.read(run.artifact(grounded["stage_path"], "topk.parquet"), "topk")
    items = schema.read(run.artifact("data", "items.parquet"), "items")
    # a top-1 generation that is only whitespace has no text to embed: that sample is a miss
    empty = beams.filter(pl.col("rank") == 0)["title"].str.strip_chars().eq("").sum()
    assert grounded["stats"]["empty_generations"] == empty
    assert top["sample_id"].n_unique() == 2 - empty and set(top["item_id"]) <= set(items["item_id"])
    assert top.group_by("sample_id").agg(pl.col("item_id").n_unique() == pl.len())["item_id"].all()
