"""Beam search: exhaustive scoring, transformers' generate, and jump-forward must all agree with it."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from decode_helpers import CacheIgnoringModel, exhaustive_ranking, fixture_trie, save_peaked_model
from fixtures import TITLES, synthetic_dataset
from reference_decoder import dict_trie, reference_generate

from igdrec import prompt
from igdrec.beam import BeamSearch, CacheMismatchError, TrieTensors, dead_nodes
from igdrec.config import DecodeConfig
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


def search(setup, **kwargs) -> tuple[list, BeamSearch]:
    tokenizer, model, trie, prompts = setup
    kwargs.setdefault("trie", TrieTensors.from_trie(trie))
    beam = beam_search(model, tokenizer, **kwargs)
    return beam.search(prompts), beam


def beam_search(model, tokenizer, **settings) -> BeamSearch:
    """A search with `settings` and, for the decode options not given, the decode stage's defaults."""
    return BeamSearch.from_config(model, tokenizer.eos_token_id, tokenizer.pad_token_id, DecodeConfig(), **({"share_prefix": True} | settings))


def assert_same_hypotheses(results, expected) -> None:
    """Same lists per prompt; scores and per-token log p equal up to float noise of other batch shapes."""
    for a, b in zip(results, expected, strict=True):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-5)
        for ha, hb in zip(a, b):
            np.testing.assert_allclose(ha.step_logprobs, hb.step_logprobs, rtol=1e-5, atol=1e-5)


def plain_logprobs(model, prompt_ids: list[int], tokens: list[int]) -> np.ndarray:
    """The model's log p of each of `tokens` after the prompt, from one plain forward pass (no cache)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + tokens])).logits[0]
    return torch.log_softmax(logits.double(), -1)[len(prompt_ids) - 1:-1].gather(1, torch.tensor(tokens)[:, None])[:, 0].numpy()


def leaf_groups(trie) -> dict[int, int]:
    return dict(zip(trie.item_leaf.tolist(), trie.item_title_group.tolist()))


@pytest.mark.parametrize("alpha", [0.0, 0.2])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_enough_beams_rank_like_exhaustive_scoring(setup, alpha, length_penalty):
    _, model, trie, prompts = setup
    distinct = len(set(trie.item_title_group.tolist()))
    results, _ = search(setup, num_beams=distinct, alpha=alpha, length_penalty=length_penalty)
    groups = leaf_groups(trie)
    for prompt_ids, hyps in zip(prompts, results):
        expected = exhaustive_ranking(model, prompt_ids, trie, alpha, length_penalty)
        assert [groups[h.nodes[-1]] for h in hyps] == [g for g, _ in expected]
        np.testing.assert_allclose([h.score for h in hyps], [s for _, s in expected], rtol=1e-5)


def test_more_beams_than_items_returns_every_item_once(setup):
    _, model, trie, prompts = setup
    distinct = len(set(trie.item_title_group.tolist()))
    results, _ = search(setup, num_beams=distinct + 6, alpha=0.2, length_penalty=1.0)
    expected = exhaustive_ranking(model, prompts[0], trie, 0.2, 1.0)
    assert [leaf_groups(trie)[h.nodes[-1]] for h in results[0]] == [g for g, _ in expected]


def test_hypotheses_carry_model_logprobs_and_trie_nodes(setup):
    _, model, trie, prompts = setup
    results, _ = search(setup, num_beams=4, alpha=0.2, length_penalty=1.0)
    hyp = results[0][0]
    np.testing.assert_allclose(hyp.step_logprobs, plain_logprobs(model, prompts[0], hyp.tokens), rtol=1e-5, atol=1e-4)
    assert trie.token[hyp.nodes].tolist() == hyp.tokens
    weights = 1 - 0.2 * trie.ig_norm[hyp.nodes]
    assert hyp.score == pytest.approx(float(np.dot(weights, hyp.step_logprobs)) / len(hyp.tokens), rel=1e-5)


@pytest.mark.parametrize("jump_fill", [0.0, 1.0])
def test_jump_forward_changes_nothing_but_forward_calls(setup, jump_fill):
    on, with_jump = search(setup, num_beams=5, alpha=0.2, length_penalty=1.0, jump_forward=True, jump_fill=jump_fill)
    off, without = search(setup, num_beams=5, alpha=0.2, length_penalty=1.0, jump_forward=False)
    assert_same_hypotheses(on, off)
    assert without.stats.forward_calls_saved == 0
    assert with_jump.stats.forward_calls + with_jump.stats.forward_calls_saved == without.stats.forward_calls
    assert with_jump.stats.forward_calls_saved > 0


@pytest.mark.parametrize("alpha,length_penalty", [(0.0, 1.0), (0.2, 0.0), (0.2, 1.0)])
def test_constrained_search_equals_generate_with_trie_processor(setup, alpha, length_penalty):
    tokenizer, model, trie, prompts = setup
    results, _ = search(setup, num_beams=5, alpha=alpha, length_penalty=length_penalty)
    reference = reference_generate(model, prompts, num_beams=5, length_penalty=length_penalty, alpha=alpha,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                   max_new_tokens=trie.max_depth, root=dict_trie(trie))
    for hyps, ref in zip(results, reference):
        assert [h.tokens for h in hyps] == [tokens for tokens, _ in ref]
        np.testing.assert_allclose([h.score for h in hyps], [s for _, s in ref], rtol=1e-5)


def test_unconstrained_search_equals_generate(setup):
    tokenizer, model, _, prompts = setup
    results, _ = search(setup, trie=None, num_beams=4, length_penalty=1.0, max_new_tokens=6)
    reference = reference_generate(model, prompts, num_beams=4, length_penalty=1.0, max_new_tokens=6,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    for hyps, ref in zip(results, reference):
        assert [h.tokens for h in hyps] == [tokens for tokens, _ in ref]
        np.testing.assert_allclose([h.score for h in hyps], [s for _, s in ref], rtol=1e-5)
        assert all(h.nodes == [-1] * len(h.tokens) for h in hyps)


def test_self_check_raises_when_the_model_ignores_the_cache(setup):
    tokenizer, model, trie, prompts = setup
    beam = beam_search(CacheIgnoringModel(model), tokenizer, num_beams=4,
                      trie=TrieTensors.from_trie(trie), self_check=True)
    with pytest.raises(CacheMismatchError) as caught:
        beam.search(prompts)
    message = str(caught.value)
    assert "\n" not in message and str(model.config._name_or_path) in message
    assert f"torch {torch.__version__}" in message and "transformers " in message


def test_self_check_passes_once_and_changes_nothing(setup):
    tokenizer, model, trie, prompts = setup
    plain_passes = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: plain_passes.append(kwargs.get("use_cache") is False), with_kwargs=True)
    try:
        checked, beam = search(setup, num_beams=4, alpha=0.2, self_check=True)
        assert plain_passes.count(True) == 1 and beam.cache_check_gap is not None
        assert beam.cache_check_gap < 1e-3
        beam.search(prompts)  # a second search does not check again
        assert plain_passes.count(True) == 1
    finally:
        hook.remove()
    unchecked, plain = search(setup, num_beams=4, alpha=0.2)
    assert plain.cache_check_gap is None
    assert [[(h.tokens, h.score) for h in hyps] for hyps in checked] == [[(h.tokens, h.score) for h in hyps] for hyps in unchecked]
    assert beam.stats.forward_calls == 2 * plain.stats.forward_calls  # the check's pass is not decoding work


def test_dead_nodes_are_those_whose_every_item_is_excluded(setup):
    _, _, trie, _ = setup
    rng = np.random.default_rng(0)
    exclude = [rng.choice(len(trie.item_ids), size=n, replace=False) for n in (0, 1, 5, 12, len(trie.item_ids))]
    dead = dead_nodes(TrieTensors.from_trie(trie), exclude).tolist()
    paths = [trie.item_path_nodes[trie.item_path_ptr[r]:trie.item_path_ptr[r + 1]] for r in range(len(trie.item_ids))]
    expected = []
    for s, rows in enumerate(exclude):
        excluded_leaves = {int(trie.item_leaf[r]) for r in rows}
        for node in range(trie.num_nodes):
            under = [path[-1] for path in paths if node == 0 or node in path]
            if all(leaf in excluded_leaves for leaf in under):
                expected.append(s * trie.num_nodes + node)
    assert dead == sorted(expected)
    assert dead_nodes(TrieTensors.from_trie(trie), [[], []]) is None


@pytest.mark.parametrize("num_beams", [2, 4])
def test_excluded_items_are_searched_like_a_catalog_without_them(setup, num_beams):
    """Masking items in the trie is the search over a catalog trie built without them (with α = 0, where the
    step scores, log p over the full vocabulary, do not depend on the catalog), for beams narrower than it."""
    tokenizer, model, trie, prompts = setup
    items, _ = synthetic_dataset()
    rng = np.random.default_rng(1)
    excluded = [rng.choice(items.height, size=n, replace=False) for n in (3, 8, 13)]
    beam = beam_search(model, tokenizer, num_beams=num_beams, length_penalty=1.0, trie=TrieTensors.from_trie(trie))
    masked = beam.search(prompts, exclude=[trie.item_index(ids) for ids in excluded])
    for prompt_ids, ids, hyps in zip(prompts, excluded, masked):
        groups = {int(g) for g in trie.item_title_group[trie.item_index(ids)]}
        kept = items.filter(~pl.col("item_id").is_in([i for i, g in zip(trie.item_ids, trie.item_title_group) if g in groups]))
        smaller = beam_search(model, tokenizer, num_beams=num_beams, length_penalty=1.0,
                              trie=TrieTensors.from_trie(fixture_trie(tokenizer, kept)))
        assert_same_hypotheses([hyps], smaller.search([prompt_ids]))
        assert len(hyps) == num_beams and not groups & {leaf_groups(trie)[h.nodes[-1]] for h in hyps}


def random_assistant_probs(trie, samples: int, seed: int = 0) -> np.ndarray:
    scores = np.random.default_rng(seed).normal(scale=2.0, size=(samples, len(trie.item_ids)))
    q = np.exp(scores)
    return q / q.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("alpha", [0.0, 0.2])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_assistant_guided_search_ranks_like_exhaustive_scoring(setup, alpha, length_penalty):
    _, model, trie, prompts = setup
    q = random_assistant_probs(trie, len(prompts))
    distinct = len(set(trie.item_title_group.tolist()))
    tokenizer = setup[0]
    beam = beam_search(model, tokenizer, num_beams=distinct, alpha=alpha,
                      length_penalty=length_penalty, trie=TrieTensors.from_trie(trie), tfa_guidance=0.7)
    results = beam.search(prompts, assistant_probs=torch.tensor(q))
    groups = leaf_groups(trie)
    for prompt_ids, hyps, probs in zip(prompts, results, q):
        expected = exhaustive_ranking(model, prompt_ids, trie, alpha, length_penalty, assistant_probs=probs, guidance=0.7)
        assert [groups[h.nodes[-1]] for h in hyps] == [g for g, _ in expected]
        np.testing.assert_allclose([h.score for h in hyps], [s for _, s in expected], rtol=1e-5)
        # the assistant's term is really there: the scores are not just g times the unguided ones
        unguided = dict(exhaustive_ranking(model, prompt_ids, trie, alpha, length_penalty))
        assert not np.allclose([s for _, s in expected], [0.7 * unguided[g] for g, _ in expected], rtol=1e-3)
    # hypotheses keep the model's own log-probs: the same as an unguided search's for the same item
    plain = {tuple(h.tokens): h.step_logprobs for h in search(setup, num_beams=distinct, alpha=alpha)[0][0]}
    for hyp in results[0]:
        np.testing.assert_allclose(hyp.step_logprobs, plain[tuple(hyp.tokens)], rtol=1e-5, atol=1e-5)


def test_assistant_with_jump_forward_off_gives_the_same_hypotheses(setup):
    _, _, trie, prompts = setup
    q = random_assistant_probs(trie, len(prompts), seed=1)
    tokenizer, model = setup[0], setup[1]
    outputs = []
    for jump in (True, False):
        beam = beam_search(model, tokenizer, num_beams=4, alpha=0.2,
                          trie=TrieTensors.from_trie(trie), tfa_guidance=0.5, jump_forward=jump)
        outputs.append(beam.search(prompts, assistant_probs=q))
    for a, b in zip(*outputs):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-5)


def test_shared_prompt_prefix_changes_nothing_but_prefill_work(setup):
    """The prompts' common prefix encoded once (and kept for later batches) gives the lists, scores and log p
    of a search that encodes every prompt in full."""
    tokenizer, model, trie, prompts = setup
    common = next(i for i in range(min(map(len, prompts))) if len({p[i] for p in prompts}) > 1)
    assert common > 10  # the template's instruction
    shared, with_prefix = search(setup, num_beams=5, alpha=0.2, length_penalty=1.0)
    full, without = search(setup, num_beams=5, alpha=0.2, length_penalty=1.0, share_prefix=False)
    assert_same_hypotheses(shared, full)
    assert with_prefix.stats.prefix_passes == 1 and without.stats.prefix_passes == 0
    assert with_prefix.stats.prefix_tokens_saved == (len(prompts) - 1) * common
    assert with_prefix.stats.forward_calls == without.stats.forward_calls
    # later searches, a single prompt included, reuse the kept prefix: no second prefix pass, same result
    alone = with_prefix.search([prompts[1]])
    assert with_prefix.stats.prefix_passes == 1 and with_prefix.stats.prefix_tokens_saved == len(prompts) * common
    assert [(h.tokens, round(h.score, 4)) for h in alone[0]] == [(h.tokens, round(h.score, 4)) for h in full[1]]


def test_prompts_without_a_common_start_are_encoded_in_full(setup):
    tokenizer, model, trie, prompts = setup
    different = [prompts[0], [prompts[1][1]] + prompts[1]]  # differ at the first token
    beam = beam_search(model, tokenizer, num_beams=3, trie=TrieTensors.from_trie(trie))
    beam.search(different)
    assert beam.stats.prefix_passes == 0 and beam.stats.prefix_tokens_saved == 0


@pytest.mark.parametrize("extra_beams", [0, 6])
def test_dropping_dead_rows_changes_nothing_but_pass_sizes(setup, extra_beams):
    """With as many beams as items or more, beams die; passes without their rows give the same search."""
    tokenizer, model, trie, prompts = setup
    K = len(set(trie.item_title_group.tolist())) + extra_beams
    sizes = {True: [], False: []}
    results = {}
    for drop in (True, False):
        hook = model.register_forward_pre_hook(lambda _, args, kwargs: sizes[drop].append(kwargs["input_ids"].shape[0]), with_kwargs=True)
        try:
            results[drop], beam = search(setup, num_beams=K, alpha=0.2, length_penalty=1.0, self_check=True, drop_dead_rows=drop)
        finally:
            hook.remove()
        assert beam.cache_check_gap is not None and beam.cache_check_gap < 1e-3
    assert_same_hypotheses(results[True], results[False])
    for prompt_ids, hyps in zip(prompts, results[True]):  # every token's log p is the one of its own context
        for hyp in hyps:
            np.testing.assert_allclose(hyp.step_logprobs, plain_logprobs(model, prompt_ids, hyp.tokens), atol=1e-4)
    step_passes = {drop: [size for size in sizes[drop][2:] if size > 1] for drop in sizes}  # after the prefix and prefill
    assert all(size % K == 0 for size in step_passes[False])  # every pass carries K rows per sample
    assert any(size % K for size in step_passes[True])  # some passes left dead beams out


def test_a_cache_layout_that_cannot_be_expanded_turns_prefix_sharing_off(setup, monkeypatch):
    """A model whose cache layers are not plain (batch, heads, positions, dim) ones (sliding windows...)
    pays one wasted prefix pass, then encodes prompts in full; results are unchanged."""
    import igdrec.beam

    tokenizer, model, trie, prompts = setup
    monkeypatch.setattr(igdrec.beam, "_plain_layers", lambda cache: False)
    results, beam = search(setup, num_beams=5, alpha=0.2, length_penalty=1.0)
    expected, _ = search(setup, num_beams=5, alpha=0.2, length_penalty=1.0, share_prefix=False)
    assert_same_hypotheses(results, expected)
    assert beam.stats.prefix_passes == 1 and not beam.share_prefix and beam.stats.prefix_tokens_saved < 0
    beam.search(prompts)
    assert beam.stats.prefix_passes == 1
