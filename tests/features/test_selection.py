"""Label-free patch selection: diversity candidates, relevance, selection and re-ranking."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from omero_hwsi.features.selection import (
    PatchSelection,
    diversity_candidates,
    relevance_scores,
    rerank,
    select_patches,
)


def _clusters(
    n_clusters: int, per_cluster: int, dim: int = 16, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Tight clusters around orthogonal centres; returns embeddings and cluster labels."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:n_clusters] * 5.0
    labels = np.repeat(np.arange(n_clusters), per_cluster)
    emb = centres[labels] + rng.normal(0, 0.2, (labels.size, dim))
    perm = rng.permutation(labels.size)  # clusters interleaved, not in index order
    return emb[perm].astype(np.float32), labels[perm]


# ---------------------------------------------------------------------------------------
# diversity_candidates
# ---------------------------------------------------------------------------------------


def test_diversity_picks_one_per_cluster_first() -> None:
    emb, labels = _clusters(5, 12)
    picks = diversity_candidates(emb, n_candidates=5)
    assert picks.dtype == np.int64 and picks.shape == (5,)
    assert sorted(labels[picks].tolist()) == [0, 1, 2, 3, 4]
    more = diversity_candidates(emb, n_candidates=20)
    np.testing.assert_array_equal(more[:5], picks)  # greedy: a prefix of a longer run
    assert len(set(more.tolist())) == 20


def test_diversity_seed_is_the_outlier() -> None:
    rng = np.random.default_rng(1)
    emb = np.ones((10, 4)) + rng.normal(0, 0.05, (10, 4))
    emb[7] = [-1.0, 0.0, 0.0, 1.0]
    assert diversity_candidates(emb, 3)[0] == 7


def test_diversity_matches_the_rule_step_by_step() -> None:
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(40, 8))
    picks = diversity_candidates(emb, 10)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = unit @ unit.T
    mean_other = (sim.sum(1) - 1.0) / 39
    assert picks[0] == np.argmin(mean_other)
    for j in range(1, 10):
        cover = sim[:, picks[:j]].max(axis=1)
        cover[picks[:j]] = np.inf
        assert picks[j] == np.argmin(cover)


def test_diversity_ties_go_to_lowest_index_and_is_deterministic() -> None:
    same = np.tile([1.0, 2.0, 3.0], (9, 1))
    np.testing.assert_array_equal(diversity_candidates(same, 4), [0, 1, 2, 3])
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(50, 12)).astype(np.float32)
    np.testing.assert_array_equal(
        diversity_candidates(emb, 32), diversity_candidates(emb.copy(), 32)
    )


def test_diversity_edge_cases() -> None:
    assert diversity_candidates(np.zeros((0, 8), np.float32)).shape == (0,)
    np.testing.assert_array_equal(diversity_candidates(np.ones((1, 8))), [0])
    np.testing.assert_array_equal(np.sort(diversity_candidates(np.eye(3), 32)), [0, 1, 2])
    zeros = np.zeros((5, 4))
    zeros[2] = [1, 0, 0, 0]
    picks = diversity_candidates(zeros, 5)  # zero vectors: no NaN, every item once
    assert sorted(picks.tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        diversity_candidates(np.ones((3, 2)), 0)
    with pytest.raises(ValueError):
        diversity_candidates(np.ones(3))
    with pytest.raises(ValueError):
        diversity_candidates(np.array([[np.nan, 1.0]]))


# ---------------------------------------------------------------------------------------
# relevance_scores
# ---------------------------------------------------------------------------------------


def test_relevance_is_max_cosine() -> None:
    emb = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0], [-1.0, 0.0]])
    queries = np.array([[3.0, 0.0], [0.0, 1.0]])
    scores = relevance_scores(emb, queries)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, [1.0, 1.0, np.sqrt(0.5), 0.0, 0.0], atol=1e-6)
    assert relevance_scores(np.zeros((0, 2)), queries).shape == (0,)
    with pytest.raises(ValueError, match="dimension"):
        relevance_scores(emb, np.ones((1, 3)))
    with pytest.raises(ValueError):
        relevance_scores(emb, np.zeros((0, 2)))


# ---------------------------------------------------------------------------------------
# select_patches
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "n_cand", "k", "m", "kept"),
    [
        (200, 32, 16, 32, 16),
        (20, 32, 16, 20, 16),
        (10, 32, 16, 10, 10),
        (1, 32, 16, 1, 1),
        (50, 8, 16, 8, 8),
    ],
)
def test_selection_sizes(n: int, n_cand: int, k: int, m: int, kept: int) -> None:
    rng = np.random.default_rng(n)
    emb = rng.normal(size=(n, 12)).astype(np.float32)
    queries = rng.normal(size=(3, 12)).astype(np.float32)
    sel = select_patches(emb, queries, n_candidates=n_cand, k=k)
    assert isinstance(sel, PatchSelection)
    assert sel.candidates.shape == (m,) and sel.candidates.dtype == np.int64
    assert sel.relevance.shape == (m,) and sel.relevance.dtype == np.float32
    assert sel.selected.shape == (kept,) and sel.selected.dtype == np.int64
    assert set(sel.selected.tolist()) <= set(sel.candidates.tolist())
    assert len(set(sel.candidates.tolist())) == m
    np.testing.assert_array_equal(sel.candidates, diversity_candidates(emb, n_cand))
    np.testing.assert_allclose(sel.relevance, relevance_scores(emb[sel.candidates], queries))
    # Best relevance first, and the kept ones are the most relevant candidates.
    rel_of = dict(zip(sel.candidates.tolist(), sel.relevance.tolist(), strict=True))
    kept_scores = [rel_of[i] for i in sel.selected.tolist()]
    assert kept_scores == sorted(kept_scores, reverse=True)
    assert min(kept_scores) >= max(
        [s for i, s in rel_of.items() if i not in set(sel.selected.tolist())], default=-2
    )


def test_selection_of_nothing_is_empty() -> None:
    sel = select_patches(np.zeros((0, 8), np.float32), np.ones((2, 8), np.float32))
    assert sel.candidates.shape == sel.relevance.shape == sel.selected.shape == (0,)
    assert sel.candidates.dtype == sel.selected.dtype == np.int64
    assert sel.relevance.dtype == np.float32


def test_selection_ties_prefer_lower_input_index() -> None:
    emb = np.tile([1.0, 0.0, 0.0], (6, 1))
    sel = select_patches(emb, np.array([[1.0, 0.0, 0.0]]), n_candidates=6, k=3)
    np.testing.assert_array_equal(sel.selected, [0, 1, 2])
    emb = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    sel = select_patches(emb, np.array([[1.0, 1.0]]), n_candidates=4, k=4)
    np.testing.assert_array_equal(sel.selected, [0, 1, 2, 3])


def test_selection_with_zero_vectors_has_no_nan() -> None:
    emb = np.zeros((20, 6), np.float32)
    emb[::4, 0] = 1.0
    sel = select_patches(emb, np.ones((2, 6), np.float32), k=5)
    assert np.all(np.isfinite(sel.relevance))
    assert sel.selected.shape == (5,)
    with pytest.raises(ValueError):
        select_patches(emb, np.zeros((2, 6), np.float32), k=0)


def test_selection_is_frozen() -> None:
    sel = select_patches(np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32))
    with pytest.raises(dataclasses.FrozenInstanceError):
        sel.selected = np.zeros(0, np.int64)  # type: ignore[misc]


def test_selection_keeps_a_rare_relevant_cluster() -> None:
    # 60 patches of one kind and 3 of a rare kind matching the query: diversity lets the
    # rare kind in (once: its members cover each other), relevance puts it first.
    rng = np.random.default_rng(4)
    common = np.array([1.0, 0.0, 0.0, 0.0]) + rng.normal(0, 0.05, (60, 4))
    rare = np.array([0.0, 1.0, 0.0, 0.0]) + rng.normal(0, 0.05, (3, 4))
    emb = np.concatenate([common, rare]).astype(np.float32)
    sel = select_patches(emb, np.array([[0.0, 1.0, 0.0, 0.0]], np.float32), n_candidates=8, k=2)
    assert set(sel.candidates[:2].tolist()) & {60, 61, 62}
    assert sel.selected[0] in {60, 61, 62}
    assert sel.selected[1] < 60


# ---------------------------------------------------------------------------------------
# rerank
# ---------------------------------------------------------------------------------------


def test_rerank_only_permutes_stored_candidates() -> None:
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(100, 10)).astype(np.float32)
    queries = rng.normal(size=(4, 10)).astype(np.float32)
    sel = select_patches(emb, queries, n_candidates=32, k=16)
    stored = emb[sel.candidates]
    # Same queries: reproduces the selection (no ties with random data).
    pos, scores = rerank(stored, queries, 16)
    np.testing.assert_array_equal(sel.candidates[pos], sel.selected)
    np.testing.assert_allclose(scores, sel.relevance[pos])
    # A new question: a permutation of positions into the stored list, best first.
    question = rng.normal(size=(1, 10)).astype(np.float32)
    pos, scores = rerank(stored, question, 32)
    assert pos.dtype == np.int64 and scores.dtype == np.float32
    assert sorted(pos.tolist()) == list(range(32))
    assert np.all(np.diff(scores) <= 0)
    pos5, scores5 = rerank(stored, question, 5)
    np.testing.assert_array_equal(pos5, pos[:5])
    np.testing.assert_array_equal(scores5, scores[:5])
    assert rerank(stored, question, 100)[0].shape == (32,)


def test_rerank_edge_cases() -> None:
    pos, scores = rerank(np.zeros((0, 3), np.float32), np.ones((1, 3), np.float32), 4)
    assert pos.shape == scores.shape == (0,)
    pos, _ = rerank(np.tile([1.0, 0.0], (3, 1)), np.array([[1.0, 0.0]]), 3)
    np.testing.assert_array_equal(pos, [0, 1, 2])  # ties: lower position first
    with pytest.raises(ValueError):
        rerank(np.ones((3, 2)), np.ones((1, 2)), 0)
