"""The search-errors stage end to end on the tiny fixtures: classes against exhaustive scoring, TFA decodes,
`igdrec metrics` printing the rates, refusals."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from cli_helpers import one_line_error
from decode_helpers import exhaustive_ranking, model_dir, run  # noqa: F401 (model_dir, run: fixtures)
from typer.testing import CliRunner

from igdrec import decoding, schema
from igdrec import search_errors as S
from igdrec.cli import app
from igdrec.config import BaselineConfig, DecodeConfig, RerankConfig, SearchErrorsConfig
from igdrec.errors import IgdrecError
from igdrec.rundir import StageWriter
from igdrec.stages import decode, rerank, search_errors


def decode_name(manifest: dict) -> str:
    return manifest["stage_path"].split("/", 1)[1]


def per_sample(run, name: str) -> pl.DataFrame:
    return schema.read(run.artifact(f"search-errors/{name}", "per_sample.parquet"), "search_errors").sort("sample_id")


def test_as_many_beams_as_titles_makes_no_search_error(run, model_dir):
    config = DecodeConfig(model=str(model_dir), limit=8, num_beams=18, alpha=0.2, length_penalty=1.0)
    name = decode_name(decode.run(config, run))
    manifest = search_errors.run(SearchErrorsConfig(decode=name), run)
    frame = per_sample(run, name)
    assert frame.height == 8 and manifest["stats"]["rates"][S.SEARCH_ERROR] == 0.0
    assert set(frame["class"]) <= {S.HIT, S.UNREACHABLE}
    assert manifest["stats"]["kth_score_gap_max"] < 1e-4
    assert manifest["inputs"] == {"decode": run.manifest(f"decode/{name}")["fingerprint"]}


@pytest.mark.parametrize("alpha, length_penalty", [(0.0, 1.0), (0.3, 0.0)])
def test_classes_agree_with_exhaustive_scoring(run, model_dir, alpha, length_penalty):
    """Every sample's class from brute force: every title scored alone (tests/helpers/decode_helpers.py)."""
    config = DecodeConfig(model=str(model_dir), limit=12, num_beams=3, alpha=alpha, length_penalty=length_penalty, batch_size=5)
    name = decode_name(decode.run(config, run))
    search_errors.run(SearchErrorsConfig(decode=name, batch_size=3), run)
    frame = per_sample(run, name)
    decoder = decoding.Decoder.from_run(run, config)
    trie = decoder.catalog.trie
    samples = schema.read(run.artifact("data", "test.parquet"), "samples").sort("sample_id").head(12)
    beams = schema.read(run.artifact(f"decode/{name}", "beams.parquet"), "beams").sort(["sample_id", "rank"])
    compared = 0
    for sample, got in zip(samples.iter_rows(named=True), frame.iter_rows(named=True)):
        exhaustive = dict(exhaustive_ranking(decoder.model, decoder.prompt(sample["history_item_ids"])[0], trie, alpha, length_penalty))
        returned = beams.filter(pl.col("sample_id") == sample["sample_id"])["item_id"].to_list()
        target = decoder.catalog.group_of[sample["item_id"]]
        kth = exhaustive[returned[-1]]
        if target in returned:
            expected = S.HIT
        elif abs(exhaustive[target] - kth) < 1e-4:
            continue  # a near tie: float noise may fall either way
        else:
            expected = S.SEARCH_ERROR if exhaustive[target] > kth else S.MODEL_ERROR
            np.testing.assert_allclose(got["gt_score"], exhaustive[target], rtol=1e-5)
        assert got["class"] == expected, sample["sample_id"]
        np.testing.assert_allclose(got["kth_score"], kth, rtol=1e-5)
        compared += 1
    assert compared >= 10
    if length_penalty == 0.0:  # both kinds of miss occur here (with lp 1 every miss is a search error)
        assert {S.SEARCH_ERROR, S.MODEL_ERROR} <= set(frame["class"])


def publish_baseline(run, name: str) -> None:
    """A baseline stage holding a random-weight SASRec (as tests/stages/test_decode.py's)."""
    from igdrec import seqrec

    n_items = schema.read(run.artifact("data", "items.parquet"), "items").height
    settings = seqrec.ModelSettings.from_config(BaselineConfig(hidden_size=16, inner_size=32))
    torch.manual_seed(0)
    model = seqrec.build_model("sasrec", n_items, 6, settings, np.zeros(0))
    with torch.no_grad():  # sharper than N(0, 0.02): the assistant then prefers other items than the LLM
        model.item_embedding.weight.normal_(0, 1.0)
    with StageWriter(run, f"baseline/{name}", stage="baseline", params={}, inputs={}, force=True) as out:
        seqrec.save_recommender(model, out.partial_dir, "sasrec", 6, settings)


def test_a_tfa_decode_is_scored_with_its_assistant(run, model_dir):
    """Each sample's K-th hypothesis scores as the search reported only with the same sample's assistant row."""
    publish_baseline(run, "sas")
    config = DecodeConfig(model=str(model_dir), limit=6, num_beams=3, tfa="sas", tfa_guidance=0.3, length_penalty=0.0, batch_size=4)
    name = decode_name(decode.run(config, run))
    manifest = search_errors.run(SearchErrorsConfig(decode=name, batch_size=2), run)
    frame = per_sample(run, name)
    assert frame["kth_score"].null_count() == 0
    np.testing.assert_allclose(frame["kth_score"], frame["kth_reported_score"], rtol=1e-5)
    assert manifest["stats"]["kth_score_gap_max"] < 1e-4


def test_metrics_prints_the_rates_of_its_decode(run, model_dir):
    name = decode_name(decode.run(DecodeConfig(model=str(model_dir), limit=6, num_beams=2), run))
    rerank.run(RerankConfig(decode=name), run)
    before = CliRunner().invoke(app, ["metrics", "--rerank", name, "--ks", "1,2", "--run-dir", str(run.root)])
    assert before.exit_code == 0, before.output
    assert "search error" not in before.output  # nothing scored yet: nothing printed
    key = run.manifest(f"metrics/{name}")["key"]

    result = CliRunner().invoke(app, ["search-errors", "--decode", name, "--run-dir", str(run.root)])
    assert result.exit_code == 0, result.output
    rates = run.manifest(f"search-errors/{name}")["stats"]["rates"]
    line = (f"hit {rates[S.HIT]:.4f}, search error {rates[S.SEARCH_ERROR]:.4f}, model error {rates[S.MODEL_ERROR]:.4f}")
    assert line in " ".join(result.output.split())
    after = CliRunner().invoke(app, ["metrics", "--rerank", name, "--ks", "1,2", "--run-dir", str(run.root)])
    assert after.exit_code == 0, after.output
    assert line in " ".join(after.output.split()) and "cached" in after.output
    assert run.manifest(f"metrics/{name}")["key"] == key  # the metrics result itself does not depend on it
    assert sum(rates.values()) == pytest.approx(1.0)
    summary = json.loads((run.root / "metrics" / f"{name}.json").read_text())
    assert "search_error" not in summary


def test_refuses_an_unconstrained_decode(run, model_dir):
    name = decode_name(decode.run(DecodeConfig(model=str(model_dir), limit=2, num_beams=2, constrained=False, max_new_tokens=4), run))
    result = CliRunner().invoke(app, ["search-errors", "--decode", name, "--run-dir", str(run.root)])
    one_line_error(result, "an unconstrained decode writes free text", f"decode/{name}/stage.json")


def test_refuses_a_decode_option_it_does_not_model():
    manifest = {"params": {"num_beams": 4, "alpha": 0.2, "softmax": "allowed", "source": "x"}}
    with pytest.raises(IgdrecError, match="decode option softmax = 'allowed' changes step scores"):
        search_errors.decode_settings(manifest, "decode/x/stage.json")
    assert search_errors.decode_settings({"params": {"num_beams": 4, "alpha": 0.2, "source": "x"}}, "w").alpha == 0.2


def test_a_missing_decode_names_what_to_run(run):
    result = CliRunner().invoke(app, ["search-errors", "--decode", "nosuch", "--run-dir", str(run.root)])
    one_line_error(result, "igdrec decode")
