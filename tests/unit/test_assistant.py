"""The text-free assistant's node masses and step scores, checked by hand and by brute force; its
probabilities computed per decode batch from the baseline's saved model, checked against the dense path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from decode_helpers import brute_force_node_mass, publish_ig, save_peaked_model
from fixtures import synthetic_run

from igdrec import schema, seqrec
from igdrec.assistant import MassTree, guided_step, node_mass, tfa_log_share
from igdrec.config import BaselineConfig, DecodeConfig
from igdrec.decoding import Decoder, TextFreeAssistant, beams_frame
from igdrec.errors import IgdrecError
from igdrec.ig import CatalogTrie, build_catalog_trie
from igdrec.modeling import load_tokenizer
from igdrec.seqrec.evaluation import full_sort_scores
from igdrec.stages import baseline as baseline_stage
from igdrec.stages import decode as decode_stage

EOS = 0


@pytest.fixture()
def trie():
    # item 10: 5 6 EOS, item 11: 5 7 EOS, item 12: 8 EOS, item 13: same title as 12 (shares its leaf)
    return build_catalog_trie([10, 11, 12, 13], [[5, 6, EOS], [5, 7, EOS], [8, EOS], [8, EOS]], [1, 1, 1, 1])


def child_scores(trie, mass: torch.Tensor, node: int) -> dict[int, float]:
    """tfa of each child token of `node`, as the beam search gathers them (one row, padded to 3 columns)."""
    start, count = int(trie.child_start[node]), int(trie.child_count[node])
    children = torch.tensor([start + i if i < count else 0 for i in range(3)])
    allowed = torch.arange(3) < count
    tfa = tfa_log_share(mass[0, children][None, :], allowed[None, :])[0]
    return {int(trie.token[start + i]): float(tfa[i]) for i in range(count)}


def test_tfa_by_hand_on_a_three_title_trie(trie):
    q = np.array([0.5, 0.2, 0.2, 0.1])
    mass = node_mass(MassTree.from_trie(trie), q)
    node_of = {tuple(trie.token[trie.path(i)][:d].tolist()): int(trie.path(i)[d - 1]) for i in (10, 11, 12) for d in (1, 2)}
    assert mass[0, 0] == pytest.approx(1.0)
    assert mass[0, node_of[(5,)]] == pytest.approx(0.7)
    assert mass[0, node_of[(8,)]] == pytest.approx(0.3)  # both ids of the shared title count
    assert mass[0, node_of[(5, 6)]] == pytest.approx(0.5)
    assert child_scores(trie, mass, 0) == pytest.approx({5: math.log(0.7), 8: math.log(0.3)})
    assert child_scores(trie, mass, node_of[(5,)]) == pytest.approx({6: math.log(0.5 / 0.7), 7: math.log(0.2 / 0.7)})
    assert child_scores(trie, mass, node_of[(5, 6)]) == pytest.approx({EOS: 0.0}, abs=1e-7)  # a forced token
    # D3's combination g·(llm − tfa) + tfa
    llm, tfa = torch.tensor([-2.0]), torch.tensor([math.log(0.2 / 0.7)])
    assert float(guided_step(llm, tfa, 0.7)) == pytest.approx(0.7 * -2.0 + 0.3 * math.log(0.2 / 0.7))


def test_zero_assistant_mass_gives_the_floor_not_nan(trie):
    mass = node_mass(MassTree.from_trie(trie), np.array([1.0, 0.0, 0.0, 0.0]))
    below_8 = int(trie.path(12)[0])
    assert child_scores(trie, mass, 0)[8] == pytest.approx(math.log(1e-20))
    assert child_scores(trie, mass, below_8) == pytest.approx({EOS: math.log(1e-20)})


def test_batched_node_mass_equals_brute_force():
    rng = np.random.default_rng(3)
    sequences = [list(rng.integers(1, 6, size=rng.integers(1, 5))) + [EOS] for _ in range(40)]
    trie = build_catalog_trie(np.arange(40), sequences, np.ones(40))
    q = rng.random((3, 40))
    mass = node_mass(MassTree.from_trie(trie), torch.tensor(q)).numpy()
    for row in range(3):
        np.testing.assert_allclose(mass[row], brute_force_node_mass(trie, q[row]), rtol=1e-5)


def test_rejects_probabilities_of_the_wrong_shape(trie):
    with pytest.raises(ValueError, match=r"expected \(samples, 4 catalog items\)"):
        node_mass(MassTree.from_trie(trie), np.ones((2, 3)))


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return save_peaked_model(tmp_path_factory.mktemp("peaked"))


@pytest.fixture()
def run_with_sasrec(tmp_path, llm_dir):
    run = synthetic_run(tmp_path / "run", n_users=60)
    publish_ig(run, load_tokenizer(str(llm_dir)), str(llm_dir))
    baseline_stage.run(BaselineConfig(model="sasrec", epochs=8, lr=0.01, batch_size=32, hidden_size=16, inner_size=32, seed=3), run)
    return run


def dense_assistant_probs(run, split: str, trie: CatalogTrie) -> np.ndarray:
    """What the baseline stage used to write and decode read back: the whole split's distributions over
    every item id at once (scored in one batch of the split's windows, each cut to the longest history of
    any split), in sample_id order, columns at the trie's item rows."""
    model, _ = seqrec.load_recommender(run.stage_dir("baseline/sasrec"))
    frames = {s: schema.read(run.artifact("data", f"{s}.parquet"), "samples") for s in ("train", "valid", "test")}
    max_len = max(int(f["history_item_ids"].list.len().max()) for f in frames.values())
    data = seqrec.SequenceData.from_samples(frames[split], model.n_items, max_len)
    (_, scores), = full_sort_scores(model, data, len(data), torch.device("cpu"))
    return model.item_probabilities(scores).numpy().astype(np.float32)[:, trie.item_ids]


def test_decode_from_the_saved_model_equals_the_dense_probabilities_path(run_with_sasrec, llm_dir):
    """`decode --tfa sasrec` (the assistant scored per decode batch) writes the same lists and scores as
    the search fed the dense per-sample probabilities."""
    run = run_with_sasrec
    config = DecodeConfig(model=str(llm_dir), limit=12, num_beams=4, alpha=0.2, batch_size=5, shard_size=7,
                          tfa="sasrec", tfa_guidance=0.2)
    decode_stage.run(config, run)
    name = decode_stage.default_name(llm_dir.name, config)  # the fixture directory's name varies with test order
    got = schema.read(run.artifact(f"decode/{name}", "beams.parquet"), "beams")

    decoder = Decoder.from_run(run, config)
    samples = schema.read(run.artifact("data", "test.parquet"), "samples").sort("sample_id").head(12)
    dense = dense_assistant_probs(run, "test", decoder.catalog.trie)[:12]  # test sample ids are 0..n-1
    prompts = [decoder.prompt(h)[0] for h in samples["history_item_ids"].to_list()]
    hypotheses = decoder.search(prompts, assistant=lambda rows: dense[rows])
    expected = beams_frame(samples["sample_id"].to_list(), [decoder.items(h) for h in hypotheses])

    assert got.drop("score", "step_logprobs").equals(expected.drop("score", "step_logprobs"))
    np.testing.assert_allclose(got["score"].to_numpy(), expected["score"].to_numpy(), rtol=1e-5)
    # the assistant changed the lists, per sample: an ignored or misaligned one could not pass the comparison
    guided = [tuple(i.item_id for i in decoder.items(h)) for h in hypotheses]
    plain = [tuple(i.item_id for i in decoder.items(h)) for h in decoder.search(prompts)]
    assert sum(g != p for g, p in zip(guided, plain)) >= 6 and len(set(guided)) > len(set(plain))


def test_assistant_rows_follow_the_histories_and_cut_them_like_training(run_with_sasrec, llm_dir):
    run = run_with_sasrec
    trie = CatalogTrie.load(run.artifact("ig", "trie_nodes.parquet"), run.artifact("ig", "item_paths.parquet"))
    assistant = TextFreeAssistant.load(run, "sasrec", trie, torch.device("cpu"))
    samples = schema.read(run.artifact("data", "test.parquet"), "samples").sort("sample_id")
    dense = dense_assistant_probs(run, "test", trie)
    rows = [7, 2, 5]  # any order, any batch
    probs = assistant.probs([samples["history_item_ids"][r].to_list() for r in rows], rows)
    np.testing.assert_allclose(probs.numpy(), dense[rows], rtol=1e-5, atol=1e-9)
    # a history longer than the model's window is cut to its most recent items, as the baseline cut it
    window = [(3 * k) % 20 for k in range(assistant.max_len)]
    cut = assistant.probs([[1, 2, 3] + window, window], [0, 1]).numpy()
    np.testing.assert_allclose(cut[0], cut[1], rtol=1e-6)
    assert not np.allclose(cut[0], assistant.probs([[1, 2, 3] + window[:-3]], [0]).numpy()[0])  # a real window moves them
    with pytest.raises(IgdrecError, match=r"baseline/sasrec: history item id 999 is outside the catalog's ids 0\.\.\d+"):
        assistant.probs([[1, 999]], [4])
    with pytest.raises(IgdrecError, match=r"baseline/sasrec: sample 4 has an empty history"):
        assistant.probs([[]], [4])


def test_assistant_refuses_a_baseline_without_a_usable_model(run_with_sasrec):
    run = run_with_sasrec
    trie = CatalogTrie.load(run.artifact("ig", "trie_nodes.parquet"), run.artifact("ig", "item_paths.parquet"))
    directory = run.stage_dir("baseline/sasrec")
    small = seqrec.ModelSettings.from_config(BaselineConfig(hidden_size=8, inner_size=8))
    seqrec.save_recommender(seqrec.build_model("sasrec", 3, 4, small, np.zeros(0)), directory, "sasrec", 4, small)
    with pytest.raises(IgdrecError, match=r"baseline/sasrec/model.json: the baseline scores 3 items, "
                                          r"the catalog needs one per item id up to \d+"):
        TextFreeAssistant.load(run, "sasrec", trie, "cpu")
    (directory / "model.json").unlink()
    with pytest.raises(IgdrecError, match=r"baseline/sasrec: no saved model for the text-free assistant \(a baseline from an earlier "
                                          r"igdrec\); rerun the `igdrec baseline` that made it \(--name sasrec\)"):
        TextFreeAssistant.load(run, "sasrec", trie, "cpu")
