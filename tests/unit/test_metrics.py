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


def test_popularity_by_hand():
    # training frequencies of five items: 10 training targets; the head (20% of 5 items) is item 0 alone
    counts = {0: 6, 1: 3, 2: 1, 3: 0, 4: 0}
    summary, per_list = M.popularity([[0], [0, 0]], counts, head_share=0.2)  # only the most popular item
    assert summary["average_popularity"] == 6.0 and summary["long_tail_share"] == 0.0 and summary["unseen_share"] == 0.0
    assert summary["novelty"] == pytest.approx(-math.log2(0.6))
    assert (summary["head_items"], summary["items"], summary["lists"]) == (1, 5, 2)

    summary, per_list = M.popularity([[0, 3], [2, 1], []], counts, head_share=0.2)  # item 3: never a training target
    assert per_list["average_popularity"] == [3.0, 2.0, None]
    assert per_list["long_tail_share"] == [0.5, 1.0, None]
    assert per_list["unseen_share"] == [0.5, 0.0, None]
    # an unseen item counts as seen once: p = 1/10, as novel as item 2
    novelty = [(-math.log2(0.6) - math.log2(0.1)) / 2, (-math.log2(0.1) - math.log2(0.3)) / 2]
    np.testing.assert_allclose(per_list["novelty"][:2], novelty)
    assert summary["novelty"] == pytest.approx(sum(novelty) / 2)  # the empty list counts in no mean
    assert summary["average_popularity"] == 2.5 and summary["long_tail_share"] == 0.75 and summary["lists"] == 2

    assert M.popularity([[2, 1]], counts, head_share=1.0)[0]["long_tail_share"] == 0.0  # every seen item is head
    assert M.popularity([[], []], counts, head_share=0.2)[0]["novelty"] is None
    with pytest.raises(KeyError):
        M.popularity([[7]], counts, head_share=0.2)


def test_popularity_head_keeps_ties_and_never_takes_unseen_items():
    counts = {0: 5, 1: 5, 2: 1, 3: 1, 4: 0, 5: 0, 6: 0, 7: 0, 8: 0, 9: 0}
    assert M.popularity_head(counts, 0.1) == {0, 1}  # one item asked for; its tie joins it
    assert M.popularity_head(counts, 0.3) == {0, 1, 2, 3}
    assert M.popularity_head(counts, 0.6) == {0, 1, 2, 3}  # the cut falls among the unseen items
    assert M.popularity_head(counts, 0.0) == set()
    distinct = {i: 10 - i for i in range(10)}
    assert M.popularity_head(distinct, 0.3) == {0, 1, 2}
    hundred = {i: 100 - i for i in range(100)}
    assert M.popularity_head(hundred, 0.07) == set(range(7))  # 0.07 * 100 is 7.000000000000001 in floats
    assert M.popularity_head(distinct, 0.25) == {0, 1, 2}  # ⌈2.5⌉


def test_popularity_head_against_its_definition_by_rank():
    """An item is head iff it was seen and fewer than ⌈h·n⌉ items are strictly more frequent."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        counts = {i: int(c) for i, c in enumerate(rng.integers(0, 6, size=n))}
        h = float(rng.choice([0.0, 0.1, 0.2, 0.5, 0.7, 1.0]))
        n_head = math.ceil(round(h * n, 9))
        expected = {i for i, c in counts.items() if c > 0 and sum(d > c for d in counts.values()) < n_head}
        assert M.popularity_head(counts, h) == expected, (counts, h)
