"""Benchmark metrics as pure functions: plain inputs in, numbers out, no model, no files.

Each function states its formula, so a number in ``metrics.json`` can be checked by hand
(``docs/evaluation.md`` collects them). Text metrics are corpus-level where the metric is
defined that way (BLEU) and means of per-pair scores otherwise (ROUGE-L, METEOR).

METEOR here is deliberately restricted to exact and Porter-stem matches: the official
metric's synonym (WordNet) and paraphrase stages need downloaded resources that a locked-down
machine does not have, and numbers computed with and without them are not comparable. It is
therefore labelled ``meteor_exact_stem`` everywhere it is reported.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from omero_hwsi._deps import require

__all__ = [
    "METEOR_ALPHA",
    "METEOR_BETA",
    "METEOR_GAMMA",
    "PointingOutcome",
    "accuracy",
    "balanced_accuracy",
    "bleu",
    "findings_recall",
    "meteor_exact_stem",
    "meteor_sentence",
    "named_labels",
    "pointing_game",
    "pointing_outcome",
    "recall_at_k",
    "rouge_l",
]

METEOR_ALPHA = 0.9
"""Weight of recall in METEOR's harmonic F-mean (Lavie & Agarwal 2007 defaults, as nltk)."""
METEOR_BETA = 3.0
"""Exponent of the fragmentation penalty."""
METEOR_GAMMA = 0.5
"""Largest fraction of the F-mean the fragmentation penalty can take away."""

_WORD = re.compile(r"[a-z0-9]+")


def _check_pairs(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


# -- closed questions -------------------------------------------------------------------------


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Closed-choice accuracy: ``(1/n) * sum_i [prediction_i == reference_i]``.

    Predictions are chosen options (never parsed from generated text), so equality is exact.
    An empty input gives NaN, which callers report as "no questions" rather than as 0.

    Raises:
        ValueError: the two sequences differ in length.
    """
    _check_pairs(predictions, references)
    if not references:
        return float("nan")
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def balanced_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean per-class recall: ``(1/|C|) * sum_{c in C} TP_c / n_c``, C = classes in references.

    Plain accuracy rewards a model that always answers the majority class of a skewed set;
    averaging the recall of each true class makes every class count equally (chance level is
    ``1/|C|`` whatever the skew). Classes that only appear among predictions have no recall
    and are not averaged (as scikit-learn's ``balanced_accuracy_score``).

    Raises:
        ValueError: the two sequences differ in length.
    """
    _check_pairs(predictions, references)
    if not references:
        return float("nan")
    recalls = []
    for cls in sorted(set(references)):
        idx = [i for i, r in enumerate(references) if r == cls]
        recalls.append(sum(predictions[i] == cls for i in idx) / len(idx))
    return float(np.mean(recalls))


# -- generated text ---------------------------------------------------------------------------


def bleu(predictions: Sequence[str], references: Sequence[str], *, max_order: int = 4) -> float:
    """Corpus BLEU-``max_order`` (0-100) by sacrebleu, one reference per prediction.

    ``BLEU-N = BP * exp(sum_{n=1..N} (1/N) * log p_n)`` with ``p_n`` the clipped n-gram
    precision pooled over the corpus and ``BP = min(1, exp(1 - r/c))`` (``r``, ``c``: total
    reference and prediction lengths). sacrebleu's own ``13a`` tokenisation and ``exp``
    smoothing are used, so the numbers match any other sacrebleu report with the same order.

    Raises:
        ValueError: the sequences differ in length or ``max_order`` is not 1-4.
        MissingExtraError: sacrebleu is not installed (the ``worker`` extra).
    """
    BLEU = require("sacrebleu.metrics.bleu", extra="worker", purpose="BLEU").BLEU
    _check_pairs(predictions, references)
    if not 1 <= max_order <= 4:
        raise ValueError(f"BLEU order must be 1-4, got {max_order}")
    if not references:
        return float("nan")
    scorer = BLEU(max_ngram_order=max_order)
    return float(scorer.corpus_score(list(predictions), [list(references)]).score)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (0-1) over pairs, by ``rouge-score``, without stemming.

    Per pair, with ``L`` the longest common subsequence of the two token lists:
    ``P = L/len(pred)``, ``R = L/len(ref)``, ``F = 2PR/(P+R)`` (0 when ``L`` is 0).
    Tokens are rouge-score's: lower-cased runs of letters and digits.

    Raises:
        ValueError: the two sequences differ in length.
        MissingExtraError: rouge-score is not installed (the ``worker`` extra).
    """
    rouge_scorer = require("rouge_score.rouge_scorer", extra="worker", purpose="ROUGE-L")
    _check_pairs(predictions, references)
    if not references:
        return float("nan")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure
              for pred, ref in zip(predictions, references, strict=True)]
    return float(np.mean(scores))


def _stemmer() -> Callable[[str], str]:
    # nltk's Porter stemmer is pure code (no download); rouge-score depends on nltk.
    porter = require("nltk.stem.porter", extra="worker", purpose="METEOR's stem matching")
    stem: Callable[[str], str] = porter.PorterStemmer().stem
    return stem


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _align(hyp: list[str], ref: list[str], stem: Callable[[str], str]) -> list[tuple[int, int]]:
    """Unigram alignment in two stages (exact, then Porter stem), greedy left to right.

    In each stage every still-unmatched hypothesis word, in order, takes the first
    still-unmatched reference word with the same key; each word is matched at most once.
    """
    pairs: list[tuple[int, int]] = []
    free_h = set(range(len(hyp)))
    free_r = set(range(len(ref)))
    for key in (lambda w: w, stem):
        keys_r = {j: key(ref[j]) for j in free_r}
        for i in sorted(free_h):
            k = key(hyp[i])
            for j in sorted(free_r):
                if keys_r[j] == k:
                    pairs.append((i, j))
                    free_h.discard(i)
                    free_r.discard(j)
                    break
    return sorted(pairs)


def meteor_sentence(prediction: str, reference: str, *,
                    stemmer: Callable[[str], str] | None = None) -> float:
    """METEOR (exact + Porter-stem matching only) of one prediction against one reference.

    With ``m`` aligned unigrams (exact matches first, then stem matches among the rest),
    ``P = m/len(pred)``, ``R = m/len(ref)``,
    ``F_mean = P*R / (alpha*P + (1-alpha)*R)`` with ``alpha = 0.9`` (recall-weighted),
    ``chunks`` = the number of runs of matches adjacent in both texts, and
    ``score = F_mean * (1 - gamma * (chunks/m)^beta)`` with ``gamma = 0.5``, ``beta = 3``;
    0 when nothing matches. Tokens: lower-cased runs of letters and digits.
    """
    stem = stemmer or _stemmer()
    hyp, ref = _tokens(prediction), _tokens(reference)
    pairs = _align(hyp, ref, stem)
    m = len(pairs)
    if m == 0:
        return 0.0
    precision, recall = m / len(hyp), m / len(ref)
    f_mean = precision * recall / (METEOR_ALPHA * precision + (1 - METEOR_ALPHA) * recall)
    chunks = 1 + sum(1 for (i0, j0), (i1, j1) in zip(pairs, pairs[1:])
                     if not (i1 == i0 + 1 and j1 == j0 + 1))
    penalty = METEOR_GAMMA * float((chunks / m) ** METEOR_BETA)
    return f_mean * (1 - penalty)


def meteor_exact_stem(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean of :func:`meteor_sentence` over pairs (0-1): METEOR without synonym matching.

    Raises:
        ValueError: the two sequences differ in length.
        MissingExtraError: nltk (its Porter stemmer) is not installed (the ``worker`` extra).
    """
    _check_pairs(predictions, references)
    if not references:
        return float("nan")
    stem = _stemmer()
    return float(np.mean([meteor_sentence(p, r, stemmer=stem)
                          for p, r in zip(predictions, references, strict=True)]))


def named_labels(text: str, vocabulary: Sequence[str]) -> set[str]:
    """The labels of ``vocabulary`` that ``text`` names, as whole words, case-insensitively.

    A label is named when its words appear consecutively, bounded by non-letters, so
    "carcinoma" is not found inside "carcinomatous" and "spindle cell neoplasm" needs all
    three words.
    """
    found = set()
    lowered = text.lower()
    for label in vocabulary:
        words = [re.escape(w) for w in label.lower().split()]
        if words and re.search(r"(?<![a-z0-9])" + r"\s+".join(words) + r"(?![a-z0-9])", lowered):
            found.add(label)
    return found


def findings_recall(reports: Sequence[str], truths: Sequence[set[str]],
                    vocabulary: Sequence[str]) -> float:
    """Share of ground-truth classes a report names: ``sum_i |N_i & T_i| / sum_i |T_i|``.

    ``T_i`` is report ``i``'s set of true class labels, ``N_i`` the vocabulary labels the
    generated report names (:func:`named_labels`). Pooled over reports (micro), so a slide
    with four classes weighs four times a slide with one. A closed vocabulary makes the
    check exact: n-gram overlap cannot tell "no carcinoma seen" from a wrong class name, a
    class name either appears or it does not.

    Raises:
        ValueError: the sequences differ in length, or a truth label is not in the vocabulary.
    """
    _check_pairs(reports, truths)
    known = set(vocabulary)
    hits = total = 0
    for report, truth in zip(reports, truths, strict=True):
        unknown = truth - known
        if unknown:
            raise ValueError(f"truth labels not in the vocabulary: {sorted(unknown)}")
        hits += len(named_labels(report, vocabulary) & truth)
        total += len(truth)
    return hits / total if total else float("nan")


# -- retrieval --------------------------------------------------------------------------------


def recall_at_k(similarity: npt.ArrayLike, k: int, *,
                targets: Sequence[int] | None = None) -> float:
    """Recall@K of retrieval: share of queries whose true item ranks in the top ``k``.

    ``similarity`` is ``(queries, items)``; query ``i``'s true item is ``targets[i]``
    (default ``i``: the diagonal). Its rank is ``#{j != t : s_ij >= s_it}`` (ties count
    against it, so a constant similarity never scores), and
    ``Recall@K = (1/n) * sum_i [rank_i < K]``. A uniformly random ranking scores
    ``min(K, items) / items``.

    Raises:
        ValueError: ``k`` < 1, the matrix is not 2-D, or a target is out of range.
    """
    matrix = np.asarray(similarity, dtype=float)
    if matrix.ndim != 2:
        raise ValueError(f"similarity must be 2-D, got shape {matrix.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n, m = matrix.shape
    if n == 0:
        return float("nan")
    true = np.arange(n) if targets is None else np.asarray(targets, dtype=int)
    if true.shape != (n,) or (true < 0).any() or (true >= m).any():
        raise ValueError("targets must give one item index in range per query")
    own = matrix[np.arange(n), true]
    rank = (matrix >= own[:, None]).sum(axis=1) - 1
    return float((rank < k).mean())


# -- grounding --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PointingOutcome:
    """The pointing game on one question.

    Attributes:
        hit: the top-scored region hits a target.
        chance: share of the candidate regions that would hit (a uniform random pick's
            expected hit rate).
        top: index (into the candidates) of the top-scored region.
    """

    hit: bool
    chance: float
    top: int


def _as_geometry(geometry: BaseGeometry | Mapping[str, Any]) -> BaseGeometry:
    if isinstance(geometry, BaseGeometry):
        return geometry
    return shape(dict(geometry))


def _hits(region: BaseGeometry, targets: Sequence[BaseGeometry]) -> bool:
    for target in targets:
        if target.is_empty:
            continue
        if region.covers(target.centroid):
            return True
        if target.area > 0 and shapely.area(shapely.intersection(region, target)) >= 0.5 * target.area:
            return True
    return False


def pointing_outcome(
    scores: Sequence[float],
    regions: Sequence[BaseGeometry | Mapping[str, Any]],
    targets: Sequence[BaseGeometry | Mapping[str, Any]],
) -> PointingOutcome:
    """Play the pointing game for one question.

    The top-scored region (first one on ties) hits when, for some target polygon, it contains
    the target's centroid or covers at least half of the target's area (either test alone
    fails on odd shapes: a C-shaped target's centroid can lie outside it, and a large
    target may have its centroid in a region holding only a sliver of it). ``chance`` is
    ``#{regions that hit} / #regions``. Geometries are shapely objects or GeoJSON mappings,
    all in one coordinate frame (level-0 pixels here).

    Raises:
        ValueError: no regions, no targets, or scores and regions differ in length.
    """
    if not regions or not targets:
        raise ValueError("the pointing game needs at least one region and one target")
    if len(scores) != len(regions):
        raise ValueError(f"{len(scores)} scores for {len(regions)} regions")
    shapes = [_as_geometry(g) for g in regions]
    goal = [_as_geometry(g) for g in targets]
    hits = [_hits(r, goal) for r in shapes]
    top = int(np.argmax(np.asarray(scores, dtype=float)))
    return PointingOutcome(hit=hits[top], chance=sum(hits) / len(hits), top=top)


def pointing_game(outcomes: Sequence[PointingOutcome]) -> dict[str, float]:
    """Hit rate and chance rate over questions: ``{"hit_rate", "chance", "n"}``.

    ``hit_rate = (1/n) * sum_i hit_i``; ``chance = (1/n) * sum_i chance_i``, the expected hit
    rate of picking a region uniformly at random, per question and averaged (it differs from
    ``1/#regions`` when questions have several target regions or slides differ in size).
    """
    if not outcomes:
        return {"hit_rate": float("nan"), "chance": float("nan"), "n": 0}
    return {
        "hit_rate": float(np.mean([o.hit for o in outcomes])),
        "chance": float(np.mean([o.chance for o in outcomes])),
        "n": len(outcomes),
    }
