"""The decode stage end to end: artifacts, chaining by default names, resume, refusals."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from decode_helpers import CacheIgnoringModel, model_dir, publish_ig, run, save_peaked_model  # noqa: F401 (model_dir, run: fixtures)
from fixtures import synthetic_run
from tiny_model import build_tokenizer
from typer.testing import CliRunner

from igdrec import schema
from igdrec.cli import app
from igdrec.config import BaselineConfig, DecodeConfig
from igdrec.beam import CacheMismatchError
from igdrec.errors import IgdrecError
from igdrec.ig import CatalogTrie
from igdrec.modeling import load_tokenizer
from igdrec.stages import decode


def test_a_cli_decode_checks_its_config_once(run, model_dir, monkeypatch):
    """The CLI, the runner and Decoder.from_run each ask for a check; the decode's rules run once."""
    from igdrec import options

    calls = []
    original = DecodeConfig.check_fields
    monkeypatch.setattr(DecodeConfig, "check_fields", lambda self: (calls.append(self), original(self))[-1])
    monkeypatch.setattr(options, "_PASSED", set())
    result = CliRunner().invoke(app, ["decode", "--model", str(model_dir), "--limit", "2", "--num-beams", "2",
                                      "--run-dir", str(run.root)])
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
    # a Python caller's stage.run is checked at the runner's door
    with pytest.raises(IgdrecError, match="--tfa scores catalog items"):
        decode.run(DecodeConfig(model=str(model_dir), tfa="sasrec", constrained=False), run)


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


def interrupt_second_shard(monkeypatch):
    """Make the decode stage die with KeyboardInterrupt when it starts its second shard; returns the real
    shard function."""
    real = decode._decode_shard
    calls = []

    def dies_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "_decode_shard", dies_on_second_shard)
    return real


def test_killed_decode_resumes_from_the_last_finished_shard(run, model_dir, monkeypatch):
    config = DecodeConfig(model=str(model_dir), limit=6, num_beams=3, shard_size=2, batch_size=2, name="resumed")
    real = interrupt_second_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        decode.run(config, run)
    assert run.manifest("decode/resumed") is None  # nothing published
    calls = []
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
    from igdrec import modeling

    real_load = modeling.load_model
    monkeypatch.setattr(modeling, "load_model", lambda *args, **kwargs: CacheIgnoringModel(real_load(*args, **kwargs)))
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


def test_cache_key_holds_the_fine_tunes_fingerprint_not_the_run_dirs_spelling(tmp_path, model_dir, monkeypatch):
    from decode_helpers import publish_sft

    from igdrec.rundir import RunDir

    run = synthetic_run(tmp_path / "runs" / "x")
    publish_ig(run, load_tokenizer(str(model_dir)), str(model_dir))
    publish_sft(run, model_dir, "ft")
    config = DecodeConfig(sft="ft", limit=6, num_beams=3, shard_size=2, batch_size=2, name="d")
    # Interrupted under an absolute spelling, resumed under a relative one: the finished shard is reused.
    real = interrupt_second_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        decode.run(config, RunDir(run.root.resolve()))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(decode, "_decode_shard", real)
    manifest = decode.run(config, RunDir("runs/x"))
    assert manifest["stats"]["resumed_samples"] == 2
    assert not list((run.root / ".partial").glob("decode*"))
    assert str(tmp_path) not in json.dumps(manifest["params"]) and manifest["params"]["sft"] == "ft"
    assert manifest["inputs"]["sft"] == run.manifest("sft/ft")["fingerprint"]

    # Another spelling, then a moved run directory: still cached, nothing decoded.
    monkeypatch.setattr(decode, "_decode_shard", lambda *a, **k: pytest.fail("decoded again"))
    assert decode.run(config, RunDir("runs/../runs/x"))["key"] == manifest["key"]
    (tmp_path / "runs" / "x").rename(tmp_path / "moved")
    assert decode.run(config, RunDir(tmp_path / "moved"))["key"] == manifest["key"]

    # A different fine-tune under the same name is a different decode.
    publish_sft(RunDir(tmp_path / "moved"), save_peaked_model(tmp_path / "other", seed=1), "ft")
    monkeypatch.setattr(decode, "_decode_shard", real)
    assert decode.run(config, RunDir(tmp_path / "moved"))["key"] != manifest["key"]


def test_cache_params_cover_every_keyed_field():
    import dataclasses

    from igdrec.decoding import ModelSource

    source = ModelSource(label="m", spec="m", sft=None, inputs={}, key={"model": "m"})
    params = decode.cache_params(DecodeConfig(), source)
    keyed = {f.name for f in dataclasses.fields(DecodeConfig) if f.metadata["key"]}
    # the guidance is inert without an assistant, the softmax over the children keyed only when on
    assert keyed - {"tfa_guidance", "constrained_softmax"} <= params.keys()
    assert keyed <= decode.cache_params(DecodeConfig(tfa="sasrec", constrained_softmax=True), source).keys()
    assert not {"batch_size", "device", "name", "jump_forward", "jump_fill"} & params.keys()
    changed = decode.cache_params(DecodeConfig(batch_size=3, device="cpu", jump_fill=0.5), source)
    assert changed == params


def test_a_missing_assistant_baseline_names_the_command_that_makes_it(run, model_dir):
    with pytest.raises(IgdrecError, match=r"baseline/nosuch has no finished, intact artifacts; run `igdrec baseline --name nosuch` first$"):
        decode.run(DecodeConfig(model=str(model_dir), tfa="nosuch"), run)


def test_merged_lora_is_cast_after_merging(tmp_path, model_dir):
    """A LoRA adapter is folded into the fp32 base, then the merged weights are cast once."""
    import torch
    from peft import LoraConfig, get_peft_model

    from igdrec.modeling import load_model

    base = load_model(str(model_dir))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged32 = load_model(str(tmp_path / "adapter"), merge_adapter=True)
    merged16 = load_model(str(tmp_path / "adapter"), dtype=torch.bfloat16, merge_adapter=True)
    state32, state16 = merged32.state_dict(), merged16.state_dict()
    assert state16.keys() == state32.keys()
    for key, value in state16.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, state32[key].to(torch.bfloat16)), key
    q32 = state32["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q32, load_model(str(model_dir)).state_dict()["model.layers.0.self_attn.q_proj.weight"])


def _publish_baseline(run, name: str, seed: int = 0):
    """A baseline stage holding a random-weight SASRec; returns each test sample's dense distribution over
    all item ids, computed as the baseline stage scores a whole split."""
    from igdrec import seqrec
    from igdrec.rundir import StageWriter
    from igdrec.seqrec.evaluation import full_sort_scores

    n_items = schema.read(run.artifact("data", "items.parquet"), "items").height
    samples = schema.read(run.artifact("data", "test.parquet"), "samples")
    settings = seqrec.ModelSettings.from_config(BaselineConfig(hidden_size=16, inner_size=32))
    torch.manual_seed(seed)
    model = seqrec.build_model("sasrec", n_items, 6, settings, np.zeros(0))
    with torch.no_grad():  # sharper than N(0, 0.02): distinct rows per history
        model.item_embedding.weight.normal_(0, 1.0)
    with StageWriter(run, f"baseline/{name}", stage="baseline", params={}, inputs={}, force=True) as out:
        seqrec.save_recommender(model, out.partial_dir, "sasrec", 6, settings)
    data = seqrec.SequenceData.from_samples(samples, n_items, 6)
    model.eval()
    dense = torch.cat([model.item_probabilities(scores) for _, scores in full_sort_scores(model, data, 64, torch.device("cpu"))])
    return dict(zip(data.sample_ids.tolist(), dense.numpy()))


def test_assistant_probabilities_reach_the_search_aligned_with_prompts_and_trie(run, model_dir, monkeypatch):
    """D3's text-free assistant: each prompt's search gets its own sample's row, in trie item order."""
    from igdrec import beam, decoding

    trie = CatalogTrie.load(run.artifact("ig", "trie_nodes.parquet"), run.artifact("ig", "item_paths.parquet"))
    by_sample = _publish_baseline(run, "sas")
    seen = []

    class RecordingSearch(beam.BeamSearch):  # stands in for a search that uses the assistant
        def search(self, prompts, assistant_probs=None):
            seen.extend(zip(map(tuple, prompts), assistant_probs.numpy(), [self.tfa_guidance] * len(prompts)))
            return super().search(prompts)

    RecordingSearch.tfa_guidance = None
    monkeypatch.setattr(beam, "BeamSearch", RecordingSearch)
    config = DecodeConfig(model=str(model_dir), limit=5, num_beams=2, batch_size=2, shard_size=3, tfa="sas", tfa_guidance=0.7)
    manifest = decode.run(config, run)
    assert manifest["inputs"]["tfa"] == run.manifest("baseline/sas")["fingerprint"]
    assert "tfa-sas-g0.7" in manifest["stage_path"]
    decoder = decoding.Decoder.from_run(run, config)
    samples = schema.read(run.artifact("data", "test.parquet"), "samples").sort("sample_id").head(5)
    expected = sorted((tuple(decoder.prompt(h)[0]), s) for s, h in zip(samples["sample_id"], samples["history_item_ids"]))
    got = sorted(((p, row) for p, row, _ in seen), key=lambda pair: pair[0])
    assert [p for p, _ in got] == [p for p, _ in expected]
    assert len({tuple(by_sample[s]) for _, s in expected}) >= 4  # the rows differ: a misaligned row would show
    for (_, row), (_, sample_id) in zip(got, expected):
        np.testing.assert_allclose(row, by_sample[sample_id][trie.item_ids], rtol=1e-5, atol=1e-9)
    assert all(guidance == 0.7 for _, _, guidance in seen)

    # a new baseline (other weights) is another input: the decode reruns instead of counting as cached
    _publish_baseline(run, "sas", seed=1)
    assert decode.run(config, run)["inputs"]["tfa"] != manifest["inputs"]["tfa"]


def test_two_process_decode_writes_the_same_beams_as_one(run, model_dir):
    """`torchrun --nproc_per_node 2 igdrec decode` (gloo, CPU): disjoint shards, one assembled file."""
    import os
    import subprocess
    import sys

    config = DecodeConfig(model=str(model_dir), limit=7, num_beams=3, shard_size=2, batch_size=2, alpha=0.2, name="one")
    single = decode.run(config, run)
    args = ["decode", "--model", str(model_dir), "--run-dir", str(run.root), "--limit", "7", "--num-beams", "3",
            "--shard-size", "2", "--batch-size", "2", "--alpha", "0.2", "--name", "two"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IGDREC_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "igdrec.cli", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = run.manifest("decode/two")
    assert two["stats"]["world_size"] == 2 and two["key"] == single["key"]
    expected = schema.read(run.artifact("decode/one", "beams.parquet"), "beams")
    got = schema.read(run.artifact("decode/two", "beams.parquet"), "beams")
    assert got.drop("score", "step_logprobs").equals(expected.drop("score", "step_logprobs"))
    np.testing.assert_allclose(got["score"].to_numpy(), expected["score"].to_numpy(), rtol=1e-5)
    assert two["stats"]["forward_calls"] == single["stats"]["forward_calls"]
    assert not list((run.root / ".partial").glob("*"))
