"""Beam search with static shapes: the same hypotheses as the default search, a bounded number of reads
from the device per batch whatever the number of steps, and the same results through torch.compile."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from decode_helpers import exhaustive_ranking, fixture_trie, save_peaked_model
from fixtures import TITLES, synthetic_dataset
from reference_decoder import dict_trie, reference_generate

import igdrec
from igdrec import prompt
from igdrec.beam import BeamSearch, TrieTensors, forced_chains
from igdrec.config import DecodeConfig
from igdrec.modeling import load_model, load_tokenizer

# The tensor methods that make the host wait for the device's value (int(), float() and indexing a Python
# sequence with a tensor go through __int__, __float__ and __index__).
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = save_peaked_model(tmp_path_factory.mktemp("peaked"))
    tokenizer = load_tokenizer(str(directory))
    model = load_model(str(directory))
    items, splits = synthetic_dataset()
    trie = fixture_trie(tokenizer, items, splits["train"])
    histories = splits["test"]["history_item_ids"].to_list()[:3]
    prompts = [prompt.encode_prompt(tokenizer, [TITLES[i] for i in h], "movies", 512)[0] for h in histories]
    return tokenizer, model, trie, prompts, items


def beam_search(setup, **settings) -> BeamSearch:
    tokenizer, model, trie, _, _ = setup
    settings = {"share_prefix": True, "trie": TrieTensors.from_trie(trie)} | settings
    return BeamSearch.from_config(model, tokenizer.eos_token_id, tokenizer.pad_token_id, DecodeConfig(), **settings)


def assert_same_hypotheses(results, expected) -> None:
    for a, b in zip(results, expected, strict=True):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.nodes for h in a] == [h.nodes for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-5)
        for ha, hb in zip(a, b):
            np.testing.assert_allclose(ha.step_logprobs, hb.step_logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha,length_penalty", [(0.0, 1.0), (0.2, 0.0), (0.2, 1.0)])
def test_static_search_ranks_like_exhaustive_scoring(setup, alpha, length_penalty):
    _, model, trie, prompts, _ = setup
    distinct = len(set(trie.item_title_group.tolist()))
    results = beam_search(setup, num_beams=distinct, alpha=alpha, length_penalty=length_penalty, static_shapes=True).search(prompts)
    groups = dict(zip(trie.item_leaf.tolist(), trie.item_title_group.tolist()))
    for prompt_ids, hyps in zip(prompts, results):
        expected = exhaustive_ranking(model, prompt_ids, trie, alpha, length_penalty)
        assert [groups[h.nodes[-1]] for h in hyps] == [g for g, _ in expected]
        np.testing.assert_allclose([h.score for h in hyps], [s for _, s in expected], rtol=1e-5)


@pytest.mark.parametrize("alpha,length_penalty", [(0.0, 1.0), (0.2, 0.0)])
def test_static_search_equals_generate_with_trie_processor(setup, alpha, length_penalty):
    tokenizer, model, trie, prompts, _ = setup
    results = beam_search(setup, num_beams=5, alpha=alpha, length_penalty=length_penalty, static_shapes=True).search(prompts)
    reference = reference_generate(model, prompts, num_beams=5, length_penalty=length_penalty, alpha=alpha,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                   max_new_tokens=trie.max_depth, root=dict_trie(trie))
    for hyps, ref in zip(results, reference):
        assert [h.tokens for h in hyps] == [tokens for tokens, _ in ref]
        np.testing.assert_allclose([h.score for h in hyps], [s for _, s in ref], rtol=1e-5)


@pytest.mark.parametrize("num_beams", [3, 26])  # 26: more beams than items, so beams die
def test_static_search_equals_the_default_one(setup, num_beams):
    """Same lists, scores and log p as the default (dynamic) search, with an assistant and excluded items too,
    and unconstrained; the static search keeps finished samples in the batch, the default one drops them."""
    _, _, trie, prompts, _ = setup
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.ones(len(trie.item_ids)), size=len(prompts))
    exclude = [rng.choice(len(trie.item_ids), size=n, replace=False) for n in (0, 2, 5)]
    for settings, extra in [({}, {}), ({"alpha": 0.2, "tfa_guidance": 0.5}, {"assistant_probs": q, "exclude": exclude}),
                            ({"trie": None, "max_new_tokens": 7}, {})]:
        dynamic = beam_search(setup, num_beams=num_beams, self_check=True, **settings)
        static = beam_search(setup, num_beams=num_beams, self_check=True, static_shapes=True, **settings)
        assert_same_hypotheses(static.search(prompts, **extra), dynamic.search(prompts, **extra))
        assert static.cache_check_gap is not None and static.cache_check_gap < 1e-3


def test_forced_chains_are_those_of_a_walk_down_the_trie(setup):
    _, _, trie, _, _ = setup
    chain_len, forced_next = forced_chains(trie)
    eos = int(trie.token[trie.item_leaf[0]])
    for node in range(trie.num_nodes):
        length, current = 0, node
        while trie.child_count[current] == 1 and trie.token[trie.child_start[current]] != eos:
            current = trie.child_start[current]
            length += 1
        assert chain_len[node] == length
        assert forced_next[node] == (trie.child_start[node] if length else node)
    assert chain_len.max() > 1  # the fixture has chains to find


def count_reads(monkeypatch, everything: bool) -> dict:
    """Count, by method, the reads from the device that igdrec's own code makes, or with `everything` those
    of the model's forward (transformers' code) too."""
    package = igdrec.__path__[0]
    counts: dict[str, int] = {}

    def counting(name, method):
        def read(*args, **kwargs):
            if everything or sys._getframe(1).f_code.co_filename.startswith(package):
                counts[name] = counts.get(name, 0) + 1
            return method(*args, **kwargs)
        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "nonzero", counting("torch.nonzero", torch.nonzero))
    return counts


def test_a_static_search_reads_from_the_device_a_bounded_number_of_times_per_batch(setup, monkeypatch):
    """Short titles and the same titles four times as long (four times the steps): a static search, the
    model's forward passes included, reads the same few times per batch for both; igdrec's own code in the
    default search reads more often for the longer one."""
    tokenizer, model, _, prompts, items = setup
    long_items = items.with_columns(items["title"].map_elements(lambda t: " / ".join([t] * 4), return_dtype=str).alias("title"))
    tries = {"short": fixture_trie(tokenizer, items), "long": fixture_trie(tokenizer, long_items)}
    reads, steps = {}, {}
    for static in (True, False):
        for length, trie in tries.items():
            search = beam_search(setup, num_beams=4, alpha=0.2, length_penalty=1.0, trie=TrieTensors.from_trie(trie),
                                 static_shapes=static)
            search.search(prompts)  # the first search encodes the shared prompt prefix
            with monkeypatch.context() as patch:
                counts = count_reads(patch, everything=static)
                search.search(prompts)
            reads[static, length], steps[static, length] = sum(counts.values()), search.stats.steps
    assert steps[True, "long"] > 3 * steps[True, "short"]
    assert reads[True, "long"] == reads[True, "short"] <= 16  # collecting the results: a few per field
    assert reads[False, "long"] > reads[False, "short"] + steps[False, "long"] // 2  # the test sees reads


@pytest.mark.slow
def test_compiled_search_gives_the_same_hypotheses(setup):
    """torch.compile with dynamo's eager backend: the traced model, same results (what --compile runs with
    the inductor backend)."""
    if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not available here")
    _, _, _, prompts, _ = setup
    plain = beam_search(setup, num_beams=4, alpha=0.2, static_shapes=True)
    compiled = beam_search(setup, num_beams=4, alpha=0.2, static_shapes=True, compile_backend="eager")
    assert_same_hypotheses(compiled.search(prompts[:2]), plain.search(prompts[:2]))
    assert compiled._compiled is not None
