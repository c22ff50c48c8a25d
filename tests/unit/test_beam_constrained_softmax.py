"""decode --constrained-softmax (docs/method.md §6.8): step probabilities normalised over the trie children."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from decode_helpers import fixture_trie, save_peaked_model

from fixtures import TITLES, synthetic_dataset
from igdrec import options, prompt
from igdrec.beam import BeamSearch, TrieTensors
from igdrec.config import DecodeConfig
from igdrec.errors import IgdrecError
from igdrec.modeling import load_model, load_tokenizer
from igdrec.stages import decode


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = save_peaked_model(tmp_path_factory.mktemp("peaked"), scale=3.0)  # mild peaks: the renormalisation matters
    tokenizer = load_tokenizer(str(directory))
    model = load_model(str(directory))
    items, splits = synthetic_dataset()
    trie = fixture_trie(tokenizer, items, splits["train"])
    histories = splits["test"]["history_item_ids"].to_list()[:3]
    prompts = [prompt.encode_prompt(tokenizer, [TITLES[i] for i in h], "movies", 512)[0] for h in histories]
    return tokenizer, model, trie, prompts


def search(setup, **settings) -> BeamSearch:
    tokenizer, model, trie, _ = setup
    values = {"share_prefix": True, "trie": TrieTensors.from_trie(trie), "constrained_softmax": True} | settings
    return BeamSearch.from_config(model, tokenizer.eos_token_id, tokenizer.pad_token_id, DecodeConfig(), **values)


def renormalised_ranking(model, prompt_ids, trie, alpha, length_penalty):
    """Teacher-force every distinct catalog sequence; each step's log p is a log-softmax over the logits of
    its parent node's children only. (Σ w_d log p) / L^lp, best first, as (title_group, score)."""
    scored = {}
    for row in range(len(trie.item_ids)):
        group = int(trie.item_title_group[row])
        if group in scored:
            continue
        nodes = trie.item_path_nodes[trie.item_path_ptr[row]:trie.item_path_ptr[row + 1]]
        tokens = trie.token[nodes].tolist()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids + tokens])).logits[0].double()
        total = 0.0
        for k, node in enumerate(nodes):
            parent = trie.parent[node]
            children = trie.token[trie.child_start[parent]:trie.child_start[parent] + trie.child_count[parent]].tolist()
            lp = torch.log_softmax(logits[len(prompt_ids) - 1 + k, children], dim=-1)[children.index(tokens[k])]
            total += (1.0 - alpha * trie.ig_norm[node]) * float(lp)
        scored[group] = total / len(tokens) ** length_penalty
    return sorted(scored.items(), key=lambda kv: -kv[1])


def test_step_probabilities_sum_to_one_over_the_allowed_children(setup, monkeypatch):
    rows_seen = []
    original = BeamSearch._candidates

    def recording(self, rows, beams, mass, dead):
        candidates = original(self, rows, beams, mass, dead)
        live = torch.isfinite(beams.running).flatten()
        allowed = torch.isfinite(candidates.step_score)
        probs = torch.where(allowed, candidates.model_lp.double().exp(), 0.0).sum(dim=1)
        rows_seen.append(probs[live])
        return candidates

    monkeypatch.setattr(BeamSearch, "_candidates", recording)
    search(setup, num_beams=4, alpha=0.0).search(setup[3])
    sums = torch.cat(rows_seen)
    assert len(sums) > 20
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5)


def test_without_the_option_the_children_hold_less_than_all_the_mass(setup, monkeypatch):
    """The check above can fail: over the whole vocabulary the children's probabilities do not sum to one."""
    sums = []
    original = BeamSearch._candidates

    def recording(self, rows, beams, mass, dead):
        candidates = original(self, rows, beams, mass, dead)
        allowed = torch.isfinite(candidates.step_score)
        sums.append(torch.where(allowed, candidates.model_lp.double().exp(), 0.0).sum(dim=1)[torch.isfinite(beams.running).flatten()])
        return candidates

    monkeypatch.setattr(BeamSearch, "_candidates", recording)
    search(setup, num_beams=4, alpha=0.0, constrained_softmax=False).search(setup[3])
    assert float(torch.cat(sums).min()) < 0.99


@pytest.mark.parametrize("alpha", [0.0, 0.2])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
@pytest.mark.parametrize("jump_forward", [True, False])
def test_enough_beams_rank_like_exhaustive_renormalised_scoring(setup, alpha, length_penalty, jump_forward):
    _, model, trie, prompts = setup
    distinct = len(set(trie.item_title_group.tolist()))
    results = search(setup, num_beams=distinct, alpha=alpha, length_penalty=length_penalty, jump_forward=jump_forward).search(prompts)
    groups = dict(zip(trie.item_leaf.tolist(), trie.item_title_group.tolist()))
    for prompt_ids, hyps in zip(prompts, results):
        expected = renormalised_ranking(model, prompt_ids, trie, alpha, length_penalty)
        assert [groups[h.nodes[-1]] for h in hyps] == [g for g, _ in expected]
        np.testing.assert_allclose([h.score for h in hyps], [s for _, s in expected], rtol=1e-4, atol=1e-6)


def test_the_option_needs_a_constrained_search_and_stays_out_of_default_keys():
    with pytest.raises(IgdrecError) as info:
        options.check(DecodeConfig(sft="x", constrained=False, constrained_softmax=True))
    assert str(info.value) == ("--constrained-softmax normalises over the trie's children: it needs a constrained search "
                               "(drop --unconstrained)")
    assert "constrained_softmax" not in options.key_params(DecodeConfig(sft="x"))
    assert options.key_params(DecodeConfig(sft="x", constrained_softmax=True))["constrained_softmax"] is True
    # its decodes get a name of their own, so they never meet a plain decode of the same settings
    assert decode.default_name("m", DecodeConfig(constrained_softmax=True)) == "m-test-b10-lp1-a0-cs"
    assert decode.default_name("m", DecodeConfig()) == "m-test-b10-lp1-a0"
