"""`igdrec build-ig-index` end to end on the synthetic run, `igdrec ig show` and `igdrec prompt`."""

import json
import math
from collections import Counter

import polars as pl
import pytest
from typer.testing import CliRunner

from igdrec import schema
from igdrec.cli import app
from igdrec.config import IGIndexConfig
from igdrec.errors import IgdrecError
from igdrec.ig import CatalogTrie
from igdrec.modeling import load_tokenizer, tokenizer_identity
from igdrec.prompt import encode_prompt, encode_sample, item_token_sequence, render_prompt
from igdrec.rundir import RunDir
from igdrec.stages import build_ig_index
from fixtures import synthetic_dataset, synthetic_run, write_data_stage

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ig-run")
    run = synthetic_run(root / "run")
    manifest = build_ig_index.run(IGIndexConfig(model=str(tiny_model_dir)), run)
    return run, manifest


def load(run):
    ig_dir = run.stage_dir("ig")
    trie = CatalogTrie.load(ig_dir / "trie_nodes.parquet", ig_dir / "item_paths.parquet")
    items = schema.read(run.artifact("data", "items.parquet"), "items")
    titles = dict(zip(items["item_id"].to_list(), items["title"].to_list()))
    return trie, titles


def test_artifacts_manifest_and_table4_stats(built, tiny_model_dir):
    run, manifest = built
    ig_dir = run.stage_dir("ig")
    schema.read(ig_dir / "trie_nodes.parquet", "trie_nodes")
    schema.read(ig_dir / "item_paths.parquet", "item_paths")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert manifest["params"]["model"] == str(tiny_model_dir)
    assert manifest["params"]["tokenizer"] == tokenizer_identity(tokenizer)
    assert manifest["params"]["tokenizer"]["vocab_size"] == len(tokenizer)
    stats = json.loads((ig_dir / "stats.json").read_text())
    assert stats == manifest["stats"]

    trie, titles = load(run)
    splits = {s: schema.read(run.artifact("data", f"{s}.parquet"), "samples") for s in SPLITS}
    # Table 4 by brute force: walk every training target's tokens through prefix sets of the catalog
    frequency = Counter(splits["train"]["item_id"].to_list())
    sequences = {i: item_token_sequence(tokenizer, t) for i, t in titles.items()}
    total = sum(frequency.values())

    def entropy(prefix):
        return sum(-(f / total) * math.log(f / total) for i, f in frequency.items() if tuple(sequences[i][: len(prefix)]) == prefix)

    tokens = zero = 0
    for item in splits["train"]["item_id"].to_list():
        seq = sequences[item]
        for d in range(len(seq)):
            tokens += 1
            under = {sequences[i][d] for i in frequency if tuple(sequences[i][:d]) == tuple(seq[:d])}
            zero += under == {seq[d]}
    assert stats["tokens"] == tokens
    assert stats["zero_ig_tokens"] == zero
    assert stats["zero_ig_share"] == pytest.approx(zero / tokens)
    assert stats["items"] == len(titles) and stats["catalog_items"] == len(titles)
    assert [stats[s] for s in SPLITS] == [splits[s].height for s in SPLITS]
    assert stats["root_entropy"] == pytest.approx(entropy(()))
    prefixes = {tuple(s[:d]) for s in sequences.values() for d in range(len(s) + 1)}
    assert stats["nodes"] == len(prefixes)
    assert stats["depth"] == max(len(s) for s in sequences.values())


def test_sample_ig_aligns_with_sft_labels(built, tiny_model_dir):
    run, manifest = built
    tokenizer = load_tokenizer(str(tiny_model_dir))
    trie, titles = load(run)
    for split in SPLITS:
        samples = schema.read(run.artifact("data", f"{split}.parquet"), "samples")
        sample_ig = schema.read(run.stage_dir("ig") / f"sample_ig_{split}.parquet", "sample_ig")
        assert sample_ig["sample_id"].to_list() == samples["sample_id"].to_list()
        assert sample_ig["item_id"].to_list() == samples["item_id"].to_list()
        for sample, row in zip(samples.iter_rows(named=True), sample_ig.iter_rows(named=True)):
            history = [titles[i] for i in sample["history_item_ids"]]
            target = item_token_sequence(tokenizer, titles[sample["item_id"]])
            encoded = encode_sample(tokenizer, history, "movies", target, cutoff_len=512)
            labels = encoded.input_ids[encoded.prompt_len:]
            path = trie.path(sample["item_id"])
            assert labels == trie.token[path].tolist()
            assert len(row["ig"]) == len(labels) == len(row["zero_ig"])
            assert row["ig"] == trie.ig[path].tolist()
            assert row["zero_ig"] == trie.zero_ig[path].tolist()


def test_second_run_is_cached(built, tiny_model_dir):
    run, manifest = built
    nodes = run.stage_dir("ig") / "trie_nodes.parquet"
    before = nodes.stat().st_mtime_ns
    again = build_ig_index.run(IGIndexConfig(model=str(tiny_model_dir)), run)
    assert again == manifest
    assert nodes.stat().st_mtime_ns == before


def test_artifacts_are_bitwise_deterministic(built, tmp_path, tiny_model_dir):
    run, _ = built
    other = synthetic_run(tmp_path / "again")
    build_ig_index.run(IGIndexConfig(model=str(tiny_model_dir)), other)
    names = sorted(p.name for p in run.stage_dir("ig").iterdir() if p.name != "stage.json")
    assert names == sorted(["trie_nodes.parquet", "item_paths.parquet", "stats.json"] + [f"sample_ig_{s}.parquet" for s in SPLITS])
    for name in names:
        assert (run.stage_dir("ig") / name).read_bytes() == (other.stage_dir("ig") / name).read_bytes(), name


def test_train_catalog_uniform_reference_and_smoothing(tmp_path, tiny_model_dir):
    run = synthetic_run(tmp_path / "run")
    manifest = build_ig_index.run(IGIndexConfig(model=str(tiny_model_dir), catalog="train", reference="uniform"), run)
    trie, titles = load(run)
    train_items = set(schema.read(run.artifact("data", "train.parquet"), "samples")["item_id"].to_list())
    assert set(trie.item_ids.tolist()) == train_items
    assert (trie.item_reference_count == 1).all()
    assert trie.entropy[0] == pytest.approx(math.log(len(train_items)))
    for split in ("valid", "test"):
        frame = schema.read(run.stage_dir("ig") / f"sample_ig_{split}.parquet", "sample_ig")
        outside = ~frame["item_id"].is_in(list(train_items))
        assert frame.filter(outside)["ig"].null_count() == outside.sum()
        assert frame.filter(~outside)["ig"].null_count() == 0
        assert manifest["stats"][f"{split}_outside_catalog"] == int(outside.sum())
    # smoothing: every catalog item gets count f(i) + s, and a new key (not the cached index)
    smoothed = build_ig_index.run(IGIndexConfig(model=str(tiny_model_dir), smoothing=0.5), run)
    assert smoothed["key"] != manifest["key"]
    trie, _ = load(run)
    frequency = Counter(schema.read(run.artifact("data", "train.parquet"), "samples")["item_id"].to_list())
    assert trie.item_reference_count.tolist() == [frequency.get(i, 0) + 0.5 for i in trie.item_ids.tolist()]


def test_unknown_target_is_a_one_line_error_and_publishes_nothing(tmp_path, tiny_model_dir):
    items, splits = synthetic_dataset()
    splits["valid"] = splits["valid"].with_columns(pl.when(pl.col("sample_id") == 3).then(999).otherwise(pl.col("item_id")).alias("item_id"))
    run = write_data_stage(tmp_path / "run", items, splits)
    with pytest.raises(IgdrecError, match=r"valid\.parquet: sample 3: target item 999 is not in items\.parquet"):
        build_ig_index.run(IGIndexConfig(model=str(tiny_model_dir)), run)
    assert not run.stage_dir("ig").exists()
    assert not any((tmp_path / "run" / ".partial").glob("*"))


def test_missing_data_stage_and_bad_options(tmp_path, tiny_model_dir):
    with pytest.raises(IgdrecError, match="igdrec preprocess"):
        build_ig_index.run(IGIndexConfig(model=str(tiny_model_dir)), RunDir(tmp_path / "empty"))
    run = synthetic_run(tmp_path / "run")
    for bad in (dict(reference="popular"), dict(catalog="some"), dict(smoothing=-1.0)):
        with pytest.raises(IgdrecError):
            build_ig_index.run(IGIndexConfig(model=str(tiny_model_dir), **bad), run)


def test_cli_ig_show(built, tiny_model_dir):
    run, _ = built
    trie, titles = load(run)
    runner = CliRunner()
    result = runner.invoke(app, ["ig", "show", "--item-id", "14", "--run-dir", str(run.root)], terminal_width=200)
    assert result.exit_code == 0, result.output
    tokenizer = load_tokenizer(str(tiny_model_dir))
    path = trie.path(14)
    for node in path:
        assert repr(tokenizer.decode([int(trie.token[node])])) in result.output
        assert f"{trie.ig[node]:.4f}" in result.output and f"{trie.entropy[node]:.4f}" in result.output
    by_title = runner.invoke(app, ["ig", "show", "--title", "Fargo (1996)", "--run-dir", str(run.root)], terminal_width=200)
    assert by_title.exit_code == 0 and "items sharing this title: [12, 15]" in by_title.output
    for args in (["--item-id", "12345"], ["--title", "No Such Movie"], []):
        bad = runner.invoke(app, ["ig", "show", *args, "--run-dir", str(run.root)])
        assert bad.exit_code != 0 and "error:" in bad.output and len(bad.output.strip().splitlines()) == 1


def test_cli_prompt_text_and_ids(built, tiny_model_dir):
    run, _ = built
    trie, titles = load(run)
    sample = schema.read(run.artifact("data", "test.parquet"), "samples").row(2, named=True)
    history = [titles[i] for i in sample["history_item_ids"]]
    runner = CliRunner()
    text = runner.invoke(app, ["prompt", "--split", "test", "--sample-id", "2", "--run-dir", str(run.root)])
    assert text.exit_code == 0, text.output
    assert text.stdout == render_prompt(history, "movies")
    ids = runner.invoke(app, ["prompt", "--split", "test", "--sample-id", "2", "--ids", "--run-dir", str(run.root)])
    tokenizer = load_tokenizer(str(tiny_model_dir))  # the IG index's tokenizer is the default
    assert json.loads(ids.stdout) == encode_prompt(tokenizer, history, "movies", 512)[0]
    missing = runner.invoke(app, ["prompt", "--split", "test", "--sample-id", "99999", "--run-dir", str(run.root)])
    assert missing.exit_code != 0 and "test.parquet: no sample with sample_id 99999" in missing.output


def test_cli_errors_are_one_line(tmp_path, tiny_model_dir):
    run = synthetic_run(tmp_path / "run")
    runner = CliRunner()
    bad = runner.invoke(app, ["build-ig-index", "--model", str(tiny_model_dir), "--reference", "popular", "--run-dir", str(run.root)])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "--reference 'popular'" in bad.output
    built = runner.invoke(app, ["build-ig-index", "--model", str(tiny_model_dir), "--catalog", "train", "--run-dir", str(run.root)])
    assert built.exit_code == 0, built.output
    train_items = set(schema.read(run.artifact("data", "train.parquet"), "samples")["item_id"].to_list())
    unseen = sorted(set(range(20)) - train_items)
    assert unseen, "the fixture should leave some item out of the training targets"
    outside = runner.invoke(app, ["ig", "show", "--item-id", str(unseen[0]), "--run-dir", str(run.root)])
    assert outside.exit_code == 2 and "is not in the IG catalog (built with --catalog train)" in outside.output
