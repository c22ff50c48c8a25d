"""The text-free assistant's node masses and step scores, checked by hand and by brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from decode_helpers import brute_force_node_mass

from igdrec.assistant import MassTree, guided_step, node_mass, tfa_log_share
from igdrec.ig import build_catalog_trie

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
