"""`metrics` against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from igdrec import metrics as M
from igdrec.ig import build_catalog_trie


def test_ranks_match_stripped_titles_and_any_id_of_a_title():
    predicted = [["A", "B ", "C"], ["X", "Y"], [" Fargo", "Z"], []]
    targets = ["B", "Q", "Fargo ", "A"]
    ranks = M.match_ranks(predicted, targets)
    assert ranks.tolist() == [1, -1, 0, -1]
    values = M.ranking_metrics(ranks, [1, 3])
    assert values["HR@1"].tolist() == [0, 0, 1, 0]
    assert values["HR@3"].tolist() == [1, 0, 1, 0]
    np.testing.assert_allclose(values["NDCG@3"], [1 / math.log2(3), 0, 1, 0])
    np.testing.assert_allclose(values["NDCG@1"], [0, 0, 1, 0])
    assert values["NDCG@3"].mean() == pytest.approx((1 / math.log2(3) + 1) / 4)


def test_diversity_by_hand():
    lists = [[0, 1], [1, 2], [3]]
    first_token = {0: 5, 1: 5, 2: 6, 3: 7}
    got = M.diversity(lists, first_token, catalog_size=8)
    p = np.array([1, 2, 1, 1]) / 5
    assert got["item_coverage"] == pytest.approx(4 / 8)
    assert got["same_first_token_share"] == pytest.approx(2 / 3)  # [0, 1] and [3]
    assert got["recommended_item_entropy"] == pytest.approx(float(-(p * np.log(p)).sum()))


def test_entropy_per_step_by_hand():
    # eos = 0; item 0: [5, 6, 0], item 1: [5, 7, 0], item 2: [8, 0]; p_r = 1/2, 1/4, 1/4
    trie = build_catalog_trie([0, 1, 2], [[5, 6, 0], [5, 7, 0], [8, 0]], [2, 1, 1])
    h = lambda *ps: -sum(p * math.log(p) for p in ps)  # noqa: E731
    got = M.entropy_per_step(trie, predicted=[[0, 2], [1]], targets=[2, 0])
    assert got["step"] == [1, 2, 3]
    np.testing.assert_allclose(got["predicted"][:2], [(h(.5, .25) * 2 + h(.25)) / 3, (h(.5) + h(.25) + h(.25)) / 3])
    assert got["predicted"][2] == pytest.approx((h(.5) + h(.25)) / 2)
    assert got["predicted_count"] == [3, 3, 2]
    np.testing.assert_allclose(got["ground_truth"], [(h(.25) + h(.5, .25)) / 2, (h(.25) + h(.5)) / 2, h(.5)])


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    a = rng.random(200)
    diff, lo, hi = M.paired_bootstrap(a, a + 0.1, resamples=300, seed=0)
    assert (diff, lo, hi) == pytest.approx((0.1, 0.1, 0.1))
    b = a + rng.normal(0.05, 0.2, size=200)
    diff, lo, hi = M.paired_bootstrap(a, b, resamples=500, seed=0)
    assert lo < diff < hi and diff == pytest.approx(float((b - a).mean()))
    se = float((b - a).std() / np.sqrt(200))
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.25)
    assert M.paired_bootstrap(a, b, 500, seed=0) == M.paired_bootstrap(a, b, 500, seed=0)
