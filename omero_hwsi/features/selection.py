"""Label-free semantic patch selection: keep k of a region's on-tissue patches.

A region holds up to 256 on-tissue patches, far more than the model can attend to, and at
inference there are no labels to say which matter. Selection therefore uses only the patch
embeddings and the encoder's query bank, with the same rule at training and test time so
the model never sees a distribution it was not trained on:

1. **Diversity** (:func:`diversity_candidates`): greedy farthest-point sampling on cosine
   similarity picks ``n_candidates`` patches that cover the region's variety, so a small
   focus (a tumour nest in stroma) survives instead of being outvoted by the majority.
2. **Relevance** (:func:`relevance_scores`): each candidate is scored by its best cosine
   similarity to the query bank (text prompts, or morphology prototypes for encoders
   without a text tower); the ``k`` most relevant candidates are kept.

The candidates and their order are stored, so a question asked later can be answered by
:func:`rerank`, which reorders the stored candidates for new queries without re-reading
pixels or choosing new candidates.

All functions are deterministic: similarities are computed in float64, and ties are broken
by a stable sort (higher score first, then lower index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from omero_hwsi._types import FloatArray

__all__ = [
    "PatchSelection",
    "diversity_candidates",
    "relevance_scores",
    "rerank",
    "select_patches",
]

_EMPTY_INT = np.zeros(0, np.int64)
_EMPTY_FLOAT = np.zeros(0, np.float32)


@dataclass(frozen=True, slots=True)
class PatchSelection:
    """The outcome of :func:`select_patches` for one region.

    Attributes:
        candidates: ``(m,)`` indices into the input embeddings in diversity (pick) order,
            ``m = min(n_candidates, n)``; stored so later questions can :func:`rerank` them.
        relevance: ``(m,)`` relevance score of each candidate, aligned with ``candidates``.
        selected: ``(min(k, m),)`` indices into the input embeddings, most relevant first.
    """

    candidates: npt.NDArray[np.int64]
    relevance: npt.NDArray[np.float32]
    selected: npt.NDArray[np.int64]


def _as_matrix(x: FloatArray, name: str) -> npt.NDArray[np.float64]:
    """Validate a ``(n, d)`` finite array and return it as float64."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (n, dim), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} contain NaN or infinite values")
    return out


def _unit_rows(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Rows scaled to unit length; zero rows stay zero, so their cosine with anything is 0."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(np.divide(x, norms, out=np.zeros_like(x), where=norms > 0), dtype=np.float64)


def _check_positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _rank_desc(scores: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    """Positions sorted by descending score, ties by ascending position (stable)."""
    # Negating a float32 is exact, so stability decides ties exactly as documented.
    return np.argsort(-scores, kind="stable").astype(np.int64)


def diversity_candidates(embeddings: FloatArray, n_candidates: int = 32) -> npt.NDArray[np.int64]:
    """Pick up to ``n_candidates`` mutually dissimilar items by greedy farthest-point search.

    The seed is the item least similar on average to the others (the region's most
    unusual patch); each next pick is the item whose highest similarity to the picks so
    far is lowest, i.e. the one worst covered by them. Ties go to the lowest index. Zero
    vectors have cosine 0 with everything, so they count as dissimilar to all.

    Args:
        embeddings: ``(n, dim)`` patch embeddings; ``n`` may be 0.
        n_candidates: How many to pick at most.

    Returns:
        ``(min(n_candidates, n),)`` int64 indices in pick order.

    Raises:
        ValueError: Bad shape, non-finite values, or ``n_candidates < 1``.
    """
    m_max = _check_positive(n_candidates, "n_candidates")
    x = _as_matrix(embeddings, "embeddings")
    n = x.shape[0]
    if n == 0:
        return _EMPTY_INT.copy()
    m = min(m_max, n)
    u = _unit_rows(x)
    # Rounded so that BLAS summation-order noise (~1e-16, differs between machines and
    # thread counts) cannot break an exact tie, e.g. between duplicate patches, differently.
    sim = np.round(u @ u.T, 12)
    if n == 1:
        return np.zeros(1, np.int64)
    mean_other = (sim.sum(axis=1) - np.diag(sim)) / (n - 1)
    picks = np.empty(m, np.int64)
    picks[0] = int(np.argmin(mean_other))  # argmin returns the first (lowest) index on ties
    chosen = np.zeros(n, bool)
    chosen[picks[0]] = True
    cover = sim[picks[0]].copy()  # highest similarity of each item to the picks so far
    for j in range(1, m):
        masked = np.where(chosen, np.inf, cover)
        nxt = int(np.argmin(masked))
        picks[j] = nxt
        chosen[nxt] = True
        np.maximum(cover, sim[nxt], out=cover)
    return picks


def relevance_scores(embeddings: FloatArray, queries: FloatArray) -> FloatArray:
    """Relevance of each item: its highest cosine similarity to any query.

    The maximum (not the mean) is used so that an item matching one prototype or prompt
    well counts as relevant even if it matches none of the others.

    Args:
        embeddings: ``(n, dim)``; ``n`` may be 0.
        queries: ``(q, dim)`` query vectors, ``q >= 1``, same ``dim``.

    Returns:
        ``(n,)`` float32 scores in ``[-1, 1]``; 0 for zero vectors.

    Raises:
        ValueError: Bad shapes, mismatched ``dim``, no queries, or non-finite values.
    """
    x = _as_matrix(embeddings, "embeddings")
    q = _as_matrix(queries, "queries")
    if q.shape[0] == 0:
        raise ValueError("queries must hold at least one vector")
    if q.shape[1] != x.shape[1]:
        raise ValueError(
            f"embeddings and queries differ in dimension: {x.shape[1]} != {q.shape[1]}"
        )
    if x.shape[0] == 0:
        return _EMPTY_FLOAT.copy()
    scores = (_unit_rows(x) @ _unit_rows(q).T).max(axis=1)
    return np.asarray(np.clip(scores, -1.0, 1.0), dtype=np.float32)


def select_patches(
    embeddings: FloatArray, queries: FloatArray, *, n_candidates: int = 32, k: int = 16
) -> PatchSelection:
    """Choose ``k`` patches of a region: diverse candidates first, then the most relevant.

    Args:
        embeddings: ``(n, dim)`` embeddings of the region's on-tissue patches; ``n`` may be
            0 (empty selection) or below ``k`` (all candidates are kept).
        queries: ``(q, dim)`` query bank of the encoder that made the embeddings.
        n_candidates: Size of the diverse candidate set that is stored for re-ranking.
        k: How many patches to keep.

    Returns:
        The :class:`PatchSelection`.

    Raises:
        ValueError: Bad shapes or values, or ``n_candidates`` / ``k`` below 1.
    """
    k = _check_positive(k, "k")
    candidates = diversity_candidates(embeddings, n_candidates)
    # The same scoring rerank() applies to stored candidates, so both give equal numbers.
    relevance = relevance_scores(np.asarray(embeddings)[candidates], queries)
    if candidates.size == 0:
        return PatchSelection(_EMPTY_INT.copy(), _EMPTY_FLOAT.copy(), _EMPTY_INT.copy())
    # Ties must go to the lower *input* index, so sort candidates by index before the
    # stable sort on score.
    by_index = np.argsort(candidates, kind="stable")
    order = by_index[_rank_desc(relevance[by_index])]
    selected = candidates[order[:k]]
    return PatchSelection(
        candidates=candidates.astype(np.int64), relevance=relevance, selected=selected
    )


def rerank(
    candidate_embeddings: FloatArray, queries: FloatArray, k: int
) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """Re-rank stored candidates for new queries (e.g. a user's question).

    Only the given candidates are considered, so a question can be answered from a
    feature store without re-reading the slide.

    Args:
        candidate_embeddings: ``(m, dim)`` embeddings of stored candidates, in stored order.
        queries: ``(q, dim)`` query vectors in the same space.
        k: How many to return at most.

    Returns:
        ``(positions, scores)``: ``(min(k, m),)`` int64 positions into
        ``candidate_embeddings``, most relevant first (ties: lower position first), and
        their float32 scores.

    Raises:
        ValueError: Bad shapes or values, or ``k < 1``.
    """
    k = _check_positive(k, "k")
    scores = relevance_scores(candidate_embeddings, queries)
    order = _rank_desc(scores)[:k]
    return order, scores[order]
