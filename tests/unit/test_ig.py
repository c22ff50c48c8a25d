"""The catalog trie against brute force: entropy, IG, zero-IG, sibling normalisation, persistence."""

import math
import random

import numpy as np
import pytest

from igdrec.ig import CatalogTrie, build_catalog_trie, build_catalog_trie_flat, token_stats
from igdrec.prompt import item_token_sequences

EOS = 0


def random_catalog(rng: random.Random, n_items: int, alphabet: int = 4, max_len: int = 5):
    """Short sequences over a tiny alphabet (many shared prefixes, duplicates), each ending in EOS."""
    seqs = [[rng.randint(3, 3 + alphabet - 1) for _ in range(rng.randint(1, max_len))] + [EOS] for _ in range(n_items)]
    counts = [rng.choice([0, 0, 1, 2, 3, 7, 0.5]) for _ in range(n_items)]
    if sum(counts) == 0:
        counts[0] = 1
    ids = rng.sample(range(10 * n_items), n_items)
    return ids, seqs, counts


def brute_entropy(seqs, counts, prefix):
    total = sum(counts)
    return sum(
        -(c / total) * math.log(c / total)
        for s, c in zip(seqs, counts)
        if c > 0 and tuple(s[: len(prefix)]) == tuple(prefix)
    )


def brute_forced(seqs, counts, prefix, token):
    """Every positive-mass item under `prefix` continues with `token`."""
    under = [s for s, c in zip(seqs, counts) if c > 0 and tuple(s[: len(prefix)]) == tuple(prefix)]
    return all(s[len(prefix)] == token for s in under)


@pytest.mark.parametrize("seed", range(40))
def test_entropy_ig_and_zero_ig_equal_brute_force(seed):
    rng = random.Random(seed)
    ids, seqs, counts = random_catalog(rng, rng.randint(1, 14))
    trie = build_catalog_trie(ids, seqs, counts)
    h_root = brute_entropy(seqs, counts, [])
    assert trie.entropy[0] == pytest.approx(h_root, abs=1e-12)
    for item_id, seq in zip(ids, seqs):
        path = trie.path(item_id)
        assert trie.tokens(item_id).tolist() == seq
        for d, node in enumerate(path):
            h_before = brute_entropy(seqs, counts, seq[:d])
            h_after = brute_entropy(seqs, counts, seq[: d + 1])
            assert trie.entropy[node] == pytest.approx(h_after, abs=1e-12)
            assert trie.ig[node] == pytest.approx(h_before - h_after, abs=1e-12)
            forced = brute_forced(seqs, counts, seq[:d], seq[d])
            assert bool(trie.zero_ig[node]) == forced
            if forced:
                assert trie.ig[node] == 0.0  # exactly, not 1e-17
            assert trie.depth[node] == d + 1
        # IG telescopes along the path.
        h_leaf = brute_entropy(seqs, counts, seq)
        assert trie.ig[path].sum() == pytest.approx(h_root - h_leaf, abs=1e-12)
        assert trie.item_leaf[trie.item_index(np.array([item_id]))[0]] == path[-1]


@pytest.mark.parametrize("seed", range(20))
def test_node_layout_and_sibling_normalisation(seed):
    rng = random.Random(100 + seed)
    ids, seqs, counts = random_catalog(rng, rng.randint(2, 16), alphabet=3)
    trie = build_catalog_trie(ids, seqs, counts)
    prefixes = {tuple(s[:d]) for s in seqs for d in range(len(s) + 1)}
    assert trie.num_nodes == len(prefixes)
    assert trie.parent[0] == -1 and trie.token[0] == -1 and trie.depth[0] == 0
    assert (np.diff(trie.depth) >= 0).all()  # numbered level by level
    for v in range(trie.num_nodes):
        children = np.arange(trie.child_start[v], trie.child_start[v] + trie.child_count[v])
        assert (trie.parent[children] == v).all()
        assert (np.diff(trie.token[children]) > 0).all()
        if len(children):
            # min-max over the siblings with reference mass; zero-mass branches get 0 (docs/method.md §4.1)
            known = np.array([
                any(c > 0 and tuple(s[: trie.depth[child]]) == tuple(_prefix(trie, child)) for s, c in zip(seqs, counts))
                for child in children
            ])
            expected = np.zeros(len(children))
            if known.any():
                lo, hi = trie.ig[children][known].min(), trie.ig[children][known].max()
                if hi > lo:
                    expected[known] = (trie.ig[children][known] - lo) / (hi - lo)
            np.testing.assert_allclose(trie.ig_norm[children], expected, atol=1e-12)
    assert (np.bincount(trie.parent[1:], minlength=trie.num_nodes) == trie.child_count).all()
    # mass under a node = sum of its children's mass; the root holds all of it
    total = sum(counts)
    assert trie.mass[0] == pytest.approx(1.0)
    for item_id, seq, c in zip(ids, seqs, counts):
        assert trie.mass[trie.item_leaf[trie.item_index(np.array([item_id]))[0]]] >= c / total - 1e-12


def _prefix(trie, node):
    """Token sequence leading from the root to `node`."""
    tokens = []
    while node > 0:
        tokens.append(int(trie.token[node]))
        node = trie.parent[node]
    return tokens[::-1]


def test_zero_mass_branches_get_no_calibration_boost_by_hand():
    # Root children: token 5 (items A, B), token 6 (item C), token 7 (item D, never a training target).
    # counts A=3, B=1, C=1, D=0 -> p = 0.6, 0.2, 0.2, 0.
    trie = build_catalog_trie([0, 1, 2, 3], [[5, 9, EOS], [5, 8, EOS], [6, EOS], [7, EOS]], [3, 1, 1, 0])
    h = lambda *ps: -sum(p * math.log(p) for p in ps)  # noqa: E731
    a, c, d = (trie.path(i)[0] for i in (0, 2, 3))
    h_root = h(0.6, 0.2, 0.2)
    # raw IG is as defined: the unknown branch gets IG = H(root), the largest of its siblings
    assert trie.ig[a] == pytest.approx(h_root - h(0.6, 0.2))
    assert trie.ig[c] == pytest.approx(h_root - h(0.2))
    assert trie.ig[a] < trie.ig[c]
    assert trie.ig[d] == pytest.approx(h_root)
    assert trie.ig[d] > max(trie.ig[a], trie.ig[c])
    # IG~ is min-max over the known siblings 5 and 6 only; 7 gets 0 (w_d = 1)
    assert trie.ig_norm[a] == 0.0 and trie.ig_norm[c] == 1.0 and trie.ig_norm[d] == 0.0
    # below token 5, both children are known: plain min-max; IG(9) = H(5) - h(0.6) > IG(8) = H(5) - h(0.2)
    nine, eight = trie.path(0)[1], trie.path(1)[1]
    assert trie.ig[nine] == pytest.approx(h(0.6, 0.2) - h(0.6)) and trie.ig[eight] == pytest.approx(h(0.6, 0.2) - h(0.2))
    assert trie.ig_norm[nine] == 1.0 and trie.ig_norm[eight] == 0.0
    # a group whose only known child is forced: everything 0 (the unknown sibling included)
    lone = build_catalog_trie([0, 1], [[5, 6, EOS], [5, 7, EOS]], [3, 0])
    assert (lone.ig_norm == 0).all()
    assert lone.ig[lone.path(1)[1]] == pytest.approx(lone.entropy[lone.path(0)[0]])


def test_smoothing_leaves_unseen_branches_at_the_top_of_their_siblings():
    """Why zero-mass branches are excluded rather than smoothed (docs/method.md §4.1): with additive
    smoothing the unseen branch has mass > 0, so it takes part in min-max, but H(branch) is tiny and its
    IG = H(parent) - H(branch) stays close to H(parent), the largest among its siblings: IG~ = 1."""
    seqs = [[5, 9, EOS], [5, 8, EOS], [6, EOS], [7, EOS]]
    for smoothing in (0.01, 0.1, 1.0):
        trie = build_catalog_trie([0, 1, 2, 3], seqs, np.array([20, 10, 10, 0]) + smoothing)
        unseen = trie.path(3)[0]
        assert trie.ig_norm[unseen] == 1.0
        assert trie.ig[unseen] > 0.9 * trie.entropy[0]


def test_prefix_titles_are_separated_by_eos(tiny_tokenizer):
    titles = ["Heat", "Heat Wave", "Heat Wave 2"]
    seqs = item_token_sequences(tiny_tokenizer, titles)
    trie = build_catalog_trie([0, 1, 2], seqs, [1, 1, 1])
    leaves = trie.item_leaf
    assert len(set(leaves.tolist())) == 3
    assert (trie.child_count[leaves] == 0).all()
    assert (trie.token[leaves] == tiny_tokenizer.eos_token_id).all()
    # "Heat\n" lies on the path of the longer titles only if they share its tokens; each leaf's item is itself
    for item_id, seq in enumerate(seqs):
        assert trie.tokens(item_id).tolist() == seq
    # uniform over three items: H(root) = log 3 and every leaf has H = (1/3) log 3
    assert trie.entropy[0] == pytest.approx(math.log(3))
    np.testing.assert_allclose(trie.entropy[leaves], math.log(3) / 3)


def test_duplicate_titles_share_a_leaf_and_title_group(tiny_tokenizer):
    titles = ["Fargo (1996)", "Heat", "Fargo (1996)", "Fargo (1996)"]
    ids = [7, 3, 5, 9]
    trie = build_catalog_trie(ids, item_token_sequences(tiny_tokenizer, titles), [2, 1, 0, 1])
    rows = trie.item_index(np.array([7, 5, 9, 3]))
    assert len(set(trie.item_leaf[rows[:3]].tolist())) == 1
    assert trie.item_title_group[rows].tolist() == [5, 5, 5, 3]
    # the shared leaf holds both positive-mass copies: H(leaf) = -(1/2 log 1/4 ... ) computed by hand
    p = np.array([2, 1]) / 4
    leaf = trie.item_leaf[rows[0]]
    assert trie.entropy[leaf] == pytest.approx(float(-(p * np.log(p)).sum()))
    assert trie.ig[trie.path(7)].sum() == pytest.approx(trie.entropy[0] - trie.entropy[leaf])


def test_zero_mass_items_do_not_make_tokens_informative():
    # only item 0 has mass: every token of its path is forced (zero IG), even where item 1 branches off
    trie = build_catalog_trie([0, 1], [[5, 6, EOS], [5, 7, EOS]], [3, 0])
    assert trie.zero_ig[trie.path(0)].all()
    assert (trie.ig[trie.path(0)] == 0).all()
    # item 1's branching token is not forced: its subtree carries none of the parent's reference items
    assert not trie.zero_ig[trie.path(1)[1]]


def test_flat_entry_point_equals_lists_and_ignores_input_order():
    rng = random.Random(7)
    ids, seqs, counts = random_catalog(rng, 30)
    a = build_catalog_trie(ids, seqs, counts)
    order = rng.sample(range(30), 30)
    flat = np.array([t for i in order for t in seqs[i]])
    b = build_catalog_trie_flat(np.array(ids)[order], flat, np.array([len(seqs[i]) for i in order]), np.array(counts)[order])
    for name in ("parent", "token", "depth", "child_start", "child_count", "mass", "entropy", "ig", "ig_norm", "zero_ig",
                 "item_ids", "item_leaf", "item_path_ptr", "item_path_nodes", "item_title_group", "item_reference_count"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_save_load_round_trip(tmp_path):
    rng = random.Random(3)
    ids, seqs, counts = random_catalog(rng, 25)
    trie = build_catalog_trie(ids, seqs, counts)
    trie.save(tmp_path / "n.parquet", tmp_path / "i.parquet")
    loaded = CatalogTrie.load(tmp_path / "n.parquet", tmp_path / "i.parquet")
    for name in ("parent", "token", "child_start", "child_count", "entropy", "ig", "ig_norm", "zero_ig",
                 "item_ids", "item_leaf", "item_path_ptr", "item_path_nodes", "item_title_group"):
        np.testing.assert_array_equal(getattr(trie, name), getattr(loaded, name), err_msg=name)


def test_token_stats_by_hand():
    # items: A = [5, 9, EOS], B = [5, 8, EOS], C = [6, EOS]; train targets A, A, B, C, and an unknown 99
    trie = build_catalog_trie([0, 1, 2], [[5, 9, EOS], [5, 8, EOS], [6, EOS]], [2, 1, 1])
    stats = token_stats(trie, np.array([0, 0, 1, 2, 99]))
    # per-token zero-IG: A: 5 informative, 9 informative, EOS forced; B likewise; C: 6 informative, EOS forced
    assert stats["tokens"] == 3 + 3 + 3 + 2
    assert stats["zero_ig_tokens"] == 1 + 1 + 1 + 1
    assert stats["zero_ig_share"] == pytest.approx(4 / 11)
    assert stats["zero_ig_share_by_position"] == [0.0, pytest.approx(1 / 4), 1.0]
    assert stats["train_outside_catalog"] == 1


def test_bad_input_is_rejected():
    with pytest.raises(ValueError):
        build_catalog_trie([], [], [])
    with pytest.raises(ValueError):
        build_catalog_trie([0, 0], [[1, EOS], [2, EOS]], [1, 1])
    with pytest.raises(ValueError):
        build_catalog_trie([0], [[]], [1])
    with pytest.raises(ValueError):
        build_catalog_trie([0], [[1, EOS]], [-1])
