"""`igdrec recommend` and the Python API: the same lists as `decode`, history handling, refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from decode_helpers import exhaustive_ranking, publish_ig, publish_sft, save_peaked_model
from fixtures import synthetic_run
from typer.testing import CliRunner

from igdrec import Recommender, prompt, schema
from igdrec.beam import BeamSearch
from igdrec.cli import app
from igdrec.config import DecodeConfig
from igdrec.errors import IgdrecError
from igdrec.modeling import load_tokenizer
from igdrec.stages import decode

SFT = "peaked-sft"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model_dir = save_peaked_model(tmp_path_factory.mktemp("peaked"))
    run = synthetic_run(tmp_path_factory.mktemp("run") / "run")
    publish_ig(run, load_tokenizer(str(model_dir)), str(model_dir))
    publish_sft(run, model_dir, SFT)
    return run


@pytest.fixture(scope="module")
def recommender(run):
    return Recommender.load(run.root, sft=SFT, alpha=0.2, length_penalty=1.0)


def test_recommend_equals_decode_for_five_test_samples(run, recommender):
    manifest = decode.run(DecodeConfig(sft=SFT, limit=5, alpha=0.2, length_penalty=1.0, num_beams=10), run)
    beams = schema.read(run.artifact(manifest["stage_path"], "beams.parquet"), "beams").sort("sample_id", "rank")
    samples = schema.read(run.artifact("data", "test.parquet"), "samples").sort("sample_id").head(5)
    histories = samples["history_item_ids"].to_list()
    batch = recommender.recommend_batch(histories, k=10, exclude_history=False)
    for sample_id, history, batched in zip(samples["sample_id"], histories, batch):
        expected = beams.filter(sample_id=sample_id)
        single = recommender.recommend(history, k=10, exclude_history=False)
        assert [r.item_id for r in single] == expected["item_id"].to_list()
        assert [r.title for r in single] == expected["title"].to_list()
        np.testing.assert_allclose([r.score for r in single], expected["score"].to_numpy(), rtol=1e-5)
        assert [r.item_id for r in batched] == [r.item_id for r in single]
    # the command line gives the same list
    ids = ",".join(map(str, histories[0]))
    result = CliRunner().invoke(app, ["recommend", "--run-dir", str(run.root), "--sft", SFT, "--history-ids", ids,
                                      "--alpha", "0.2", "--length-penalty", "1", "--no-exclude-history", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    first = beams.filter(sample_id=samples["sample_id"][0])
    assert [r["item_id"] for r in listed] == first["item_id"].to_list()
    assert [r["rank"] for r in listed] == list(range(1, 11))


def beam_widths(monkeypatch) -> list[int]:
    """The num_beams of every beam search run from now on."""
    widths = []
    search = BeamSearch.search
    monkeypatch.setattr(BeamSearch, "search", lambda self, *args, **kwargs: widths.append(self.num_beams) or search(self, *args, **kwargs))
    return widths


@pytest.mark.parametrize("k,history", [(10, list(range(10))), (3, list(range(17)) + [0, 5])])
def test_excluding_the_history_ranks_the_rest_like_exhaustive_scoring(run, recommender, monkeypatch, k, history):
    """Seen titles are masked inside a k-beam search. With k at least the unseen titles it is exact (so
    is the search widened by one beam per seen title that it replaces): the list must be the exhaustive
    ranking without the seen titles."""
    widths = beam_widths(monkeypatch)
    trie = recommender.catalog.trie
    prepared = recommender.prepare(history)
    found = recommender.recommend(history, k=k)
    seen = {recommender.catalog.group_of[i] for i in history}
    expected = [(g, s) for g, s in exhaustive_ranking(recommender.decoder.model, prepared.prompt_ids, trie, 0.2, 1.0) if g not in seen]
    assert len(expected) <= k
    assert [r.item_id for r in found] == [g for g, _ in expected]
    np.testing.assert_allclose([r.score for r in found], [s for _, s in expected], rtol=1e-5)
    assert widths == [k]


def test_the_beam_width_does_not_grow_with_the_history(run, recommender, monkeypatch):
    widths = beam_widths(monkeypatch)
    for n in (1, 5, 12, 1000):
        history = [i % 20 for i in range(n)]
        found = recommender.recommend(history, k=4)
        assert {r.item_id for r in found}.isdisjoint(history) and (len(found) == 4 or n >= 20)
    assert widths == [4] * 4
    assert recommender.recommend(list(range(20)) * 50, k=4) == []  # every title seen: nothing left to recommend


def test_titles_and_ids_name_the_same_history(recommender):
    by_title = recommender.recommend(["Toy Story (1995)", "Fargo (1996)"], k=5)
    assert recommender.resolve(["Toy Story (1995)", "Fargo (1996)"]) == [0, 12]  # the smallest id of a duplicated title
    assert by_title == recommender.recommend([0, 12], k=5)
    assert recommender.resolve(["toy  story (1995)"]) == [0]  # case and spacing, when unambiguous
    assert all(isinstance(r.item_id, int) and isinstance(r.title, str) for r in by_title)
    item_id, title, score = by_title[0]  # a plain (item_id, title, score) tuple
    assert title == recommender.catalog.titles[item_id] and score == by_title[0].score
    assert {0, 12, 15}.isdisjoint(r.item_id for r in by_title)  # seen (15 is Fargo's duplicate) excluded


def test_a_history_longer_than_the_prompt_keeps_the_most_recent_items(run, recommender):
    titles = ["Toy Story (1995)", "GoldenEye (1995)", "Heat", "Halo 3"]
    tokenizer = recommender.decoder.tokenizer
    full, _ = prompt.encode_prompt(tokenizer, titles, "movies", None)
    short = Recommender.load(run.root, sft=SFT, alpha=0.2, length_penalty=1.0, cutoff_len=len(full) - 1)
    prepared = short.prepare(titles)
    assert prepared.kept == 3 and prepared.dropped == 1
    assert prepared.prompt_ids == prompt.encode_prompt(tokenizer, titles[1:], "movies", None)[0]
    assert short.recommend(titles, k=5, exclude_history=False) == short.recommend(titles[1:], k=5, exclude_history=False)
    config = run.root.parent / "short.yaml"
    config.write_text(f"decode:\n  cutoff_len: {len(full) - 1}\n")
    args = ["recommend", "--run-dir", str(run.root), "--sft", SFT, "--config", str(config)]
    result = CliRunner().invoke(app, args + [a for t in titles for a in ("--history", t)])
    assert result.exit_code == 0, result.output
    assert "holds the most recent 3" in " ".join(result.output.split())


def test_cli_table_and_refusals(run):
    runner = CliRunner()
    common = ["recommend", "--run-dir", str(run.root), "--sft", SFT]
    result = runner.invoke(app, common + ["--history", "Toy Story (1995)", "--history", "Fargo (1996)", "--top-k", "3"])
    assert result.exit_code == 0, result.output
    assert "rank" in result.output and "item id" in result.output and "score" in result.output
    result = runner.invoke(app, common + ["--history", "Toy Stroy (1995)"])
    assert result.exit_code != 0 and "'Toy Story (1995)'" in result.output and "not in" in result.output
    result = runner.invoke(app, common)
    assert result.exit_code != 0 and "empty history" in result.output
    result = runner.invoke(app, common + ["--history-ids", "0,999"])
    assert result.exit_code != 0 and "999" in result.output
    result = runner.invoke(app, common + ["--history-ids", "0,x"])
    assert result.exit_code != 0 and "--history-ids" in result.output
    result = runner.invoke(app, common + ["--history", "Heat", "--history-ids", "1"])
    assert result.exit_code != 0 and "not both" in result.output
    result = runner.invoke(app, ["recommend", "--run-dir", str(run.root), "--sft", "nope", "--history", "Heat"])
    assert result.exit_code != 0 and "igdrec sft --name nope" in " ".join(result.output.split())


def test_api_refuses_bad_histories(recommender):
    with pytest.raises(IgdrecError, match="empty"):
        recommender.recommend([])
    with pytest.raises(IgdrecError, match="closest: 'Heat Wave'"):
        recommender.recommend(["Heat Wav"])
    with pytest.raises(IgdrecError, match="top-k"):
        recommender.recommend(["Heat"], k=0)


def test_api_load_checks_its_decode_options(run):
    """Recommender.load is an entry point: its options get the CLI's one-line errors before anything loads."""
    from igdrec.config import DecodeConfig

    with pytest.raises(IgdrecError, match=r"^--alpha 2: must lie in \[0, 1\]$"):
        Recommender.load(run.root, sft=SFT, alpha=2.0)
    with pytest.raises(IgdrecError, match=r"^--batch-size 'many': expected a positive integer or auto$"):
        Recommender.load(run.root, sft=SFT, config=DecodeConfig(batch_size="many"))


@pytest.mark.parametrize("bad", [1.7, 1.0, True, None, np.float64(2.0), [3]])
def test_api_ids_must_be_integers(recommender, bad):
    """1.7 or True once silently meant item 1, None ended in a TypeError."""
    with pytest.raises(IgdrecError) as caught:
        recommender.recommend(["Heat", 3, bad])
    assert str(caught.value) == f"history[2] = {bad!r} ({type(bad).__name__}): expected an integer item id or a catalog title"


def test_api_takes_numpy_integer_ids(recommender):
    assert recommender.resolve([np.int64(3), np.int32(12), 7]) == [3, 12, 7]


def test_import_igdrec_does_not_import_torch():
    code = "import sys, igdrec; assert 'torch' not in sys.modules; assert 'Recommender' in igdrec.__all__"
    subprocess.run([sys.executable, "-c", code], check=True)
