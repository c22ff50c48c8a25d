"""The search-error diagnostic: teacher-forced scores are the search's own, and the classes count what they say."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
from decode_helpers import exhaustive_ranking, fixture_trie, save_peaked_model
from fixtures import TITLES, synthetic_dataset

from igdrec import prompt, schema
from igdrec import search_errors as S
from igdrec.beam import BeamSearch, TrieTensors
from igdrec.config import DecodeConfig
from igdrec.ig import build_catalog_trie
from igdrec.modeling import load_model, load_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = save_peaked_model(tmp_path_factory.mktemp("peaked"))
    tokenizer = load_tokenizer(str(directory))
    model = load_model(str(directory))
    items, splits = synthetic_dataset()
    trie = fixture_trie(tokenizer, items, splits["train"])
    histories = splits["test"]["history_item_ids"].to_list()[:3]
    prompts = [prompt.encode_prompt(tokenizer, [TITLES[i] for i in h], "movies", 512)[0] for h in histories]
    return tokenizer, model, trie, prompts


def make_search(model, eos: int, pad: int, trie, **settings) -> BeamSearch:
    return BeamSearch.from_config(model, eos, pad, DecodeConfig(),
                                  **({"share_prefix": True, "trie": TrieTensors.from_trie(trie)} | settings))


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
@pytest.mark.parametrize("assistant", [False, True])
def test_teacher_forced_score_of_every_returned_hypothesis_is_the_searchs(setup, alpha, length_penalty, assistant):
    tokenizer, model, trie, prompts = setup
    probs = None
    if assistant:  # a peaked assistant that disagrees with the model somewhere
        probs = np.random.default_rng(0).dirichlet(np.full(len(trie.item_ids), 0.3), size=len(prompts)).astype(np.float32)
    search = make_search(model, tokenizer.eos_token_id, tokenizer.pad_token_id, trie, num_beams=4, alpha=alpha,
                         length_penalty=length_penalty, tfa_guidance=0.4)
    results = search.search(prompts, assistant_probs=probs)
    index = [i for i, hyps in enumerate(results) for _ in hyps]
    paths = [np.asarray(h.nodes) for hyps in results for h in hyps]
    scored = S.teacher_forced_scores(search, [prompts[i] for i in index], paths, None if probs is None else probs[index])
    reported = np.asarray([h.score for hyps in results for h in hyps])
    assert len(reported) == 12
    np.testing.assert_allclose(scored.scores, reported, rtol=1e-5, atol=1e-6)
    assert (np.abs(scored.scores - reported) <= scored.tolerance).all()


def test_teacher_forced_scores_equal_exhaustive_scoring(setup):
    """Every catalog title scored in one batch equals the brute-force scorer of tests/unit/test_beam.py."""
    tokenizer, model, trie, prompts = setup
    search = make_search(model, tokenizer.eos_token_id, tokenizer.pad_token_id, trie, alpha=0.2, length_penalty=1.0)
    rows = [int(np.nonzero(trie.item_title_group == g)[0][0]) for g in sorted(set(trie.item_title_group.tolist()))]
    paths = [trie.item_path_nodes[trie.item_path_ptr[r]:trie.item_path_ptr[r + 1]] for r in rows]
    scored = S.teacher_forced_scores(search, [prompts[1]] * len(paths), paths)
    expected = dict(exhaustive_ranking(model, prompts[1], trie, 0.2, 1.0))
    np.testing.assert_allclose(scored.scores, [expected[int(trie.item_title_group[r])] for r in rows], rtol=1e-5)


class BigramModel(torch.nn.Module):
    """A causal LM whose next-token log-probabilities depend on the last token only, set by hand: the
    search's cache machinery gets a dummy key/value per position."""

    def __init__(self, table: dict[int, dict[int, float]], vocab: int = 16):
        super().__init__()
        logits = torch.full((vocab, vocab), -40.0)
        for last, nxt in table.items():
            for token, p in nxt.items():
                logits[last, token] = float(np.log(p))
        self.logits = torch.nn.Parameter(logits, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                logits_to_keep=0):
        if past_key_values is not None:
            dummy = torch.zeros((input_ids.shape[0], 1, input_ids.shape[1], 1))
            past_key_values.update(dummy, dummy, 0)
        return SimpleNamespace(logits=self.logits[input_ids][:, -logits_to_keep:])


EOS, PAD, START = 2, 0, 5
A, A1, A2, B, B1 = 10, 11, 12, 13, 14


def hand_built():
    """Items 0: A A1, 1: A A2, 2: B B1. Greedy (one beam) takes A (0.6 over 0.4), then A1: log .6 + log .6 =
    -1.02, while B B1 scores log .4 = -0.92: the best item is pruned at its first token."""
    model = BigramModel({START: {A: 0.6, B: 0.4}, A: {A1: 0.6, A2: 0.4}, B: {B1: 1.0}, A1: {EOS: 1.0}, A2: {EOS: 1.0}, B1: {EOS: 1.0}})
    trie = build_catalog_trie([0, 1, 2], [[A, A1, EOS], [A, A2, EOS], [B, B1, EOS]], [1.0, 1.0, 1.0])
    return model, trie


def beams_rows(results, sample_ids, trie) -> pl.DataFrame:
    leaf_group = dict(zip(trie.item_leaf.tolist(), trie.item_title_group.tolist()))
    rows = [{"sample_id": s, "rank": r, "item_id": leaf_group[h.nodes[-1]], "title": None, "score": h.score,
             "tokens": h.tokens, "step_logprobs": h.step_logprobs, "prefix_entropy": [0.0] * len(h.tokens)}
            for s, hyps in zip(sample_ids, results) for r, h in enumerate(hyps)]
    return schema.conform(pl.DataFrame(rows, schema=schema.BEAMS), "beams")


def diagnose_hand_built(num_beams: int, targets: list[int]) -> pl.DataFrame:
    model, trie = hand_built()
    search = BeamSearch(model, EOS, PAD, num_beams=num_beams, length_penalty=0.0, alpha=0.0, max_new_tokens=trie.max_depth,
                        jump_forward=True, jump_fill=1.0, tfa_guidance=0.5, constrained_softmax=False, share_prefix=False,
                        trie=TrieTensors.from_trie(trie))
    sample_ids = list(range(len(targets)))
    results = search.search([[START]] * len(targets))
    decoder = SimpleNamespace(engine=search, catalog=SimpleNamespace(trie=trie), prompt=lambda history: ([START], 0),
                              batch_size=lambda prompt_len, num_beams: 2)
    samples = pl.DataFrame({"sample_id": sample_ids, "history_item_ids": [[0]] * len(targets), "item_id": targets})
    frame, gap = S.diagnose(decoder, samples, beams_rows(results, sample_ids, trie), "beams.parquet")
    assert gap < 1e-6
    return frame


def test_one_beam_pruning_the_best_path_counts_one_search_error():
    frame = diagnose_hand_built(1, targets=[2, 0, 1])  # B B1 (pruned, better), A A1 (returned), A A2 (worse)
    assert frame["class"].to_list() == [S.SEARCH_ERROR, S.HIT, S.MODEL_ERROR]
    np.testing.assert_allclose(frame["gt_score"][0], np.log(0.4), rtol=1e-5)
    np.testing.assert_allclose(frame["kth_score"][0], 2 * np.log(0.6), rtol=1e-5)
    assert S.rates(frame["class"].to_list())[S.SEARCH_ERROR] == pytest.approx(1 / 3)


def test_as_many_beams_as_items_makes_no_search_error():
    frame = diagnose_hand_built(3, targets=[2, 0, 1])
    assert frame["class"].to_list() == [S.HIT] * 3


def test_two_beams_keep_the_pruned_path():
    """Two beams keep B alive: B B1 and A A1 come back, A A2 is below the second one, a model error."""
    frame = diagnose_hand_built(2, targets=[2, 0, 1])
    assert frame["class"].to_list() == [S.HIT, S.HIT, S.MODEL_ERROR]


def test_classify_and_rates():
    classes = S.classify(np.array([True, False, False, False, False]), np.array([True, True, True, False, True]),
                         np.array([np.nan, -1.0, -3.0, np.nan, -9.0]), np.array([-2.0, -2.0, -2.0, -2.0, -np.inf]))
    # a ground truth tied with the K-th is not one an exact search must return: a model error
    assert classes == [S.HIT, S.SEARCH_ERROR, S.MODEL_ERROR, S.UNREACHABLE, S.SEARCH_ERROR]
    assert S.classify([False], [True], [-2.0], [-2.0]) == [S.MODEL_ERROR]
    assert S.rates(classes) == {S.HIT: 0.2, S.SEARCH_ERROR: 0.4, S.MODEL_ERROR: 0.2, S.UNREACHABLE: 0.2}
