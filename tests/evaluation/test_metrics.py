"""Metrics on hand-made cases whose values are worked out in the comments."""

from __future__ import annotations

import math

import pytest
from shapely.geometry import MultiPolygon, box, mapping

from omero_hwsi.evaluation import metrics


def test_accuracy_and_balanced_accuracy_of_a_skewed_set():
    # 8 "a" and 2 "b"; always answering "a" is right 8/10 times, but recalls are a: 8/8, b: 0/2.
    refs = ["a"] * 8 + ["b"] * 2
    preds = ["a"] * 10
    assert metrics.accuracy(preds, refs) == pytest.approx(0.8)
    assert metrics.balanced_accuracy(preds, refs) == pytest.approx(0.5)
    # One b found: recalls 1 and 1/2 -> 0.75; a class only predicted does not count.
    preds2 = ["a"] * 7 + ["c", "b", "a"]
    assert metrics.balanced_accuracy(preds2, refs) == pytest.approx((7 / 8 + 1 / 2) / 2)
    assert math.isnan(metrics.accuracy([], []))
    with pytest.raises(ValueError, match="predictions"):
        metrics.accuracy(["a"], [])


def test_bleu_of_identical_and_of_a_known_pair():
    text = ["the cat sat on the mat", "dense fibrous stroma with sparse nuclei"]
    for order in range(1, 5):
        assert metrics.bleu(text, text, max_order=order) == pytest.approx(100.0)
    # Clipped unigram precision: "the" 1 of 2 kept, "cat" 1 of 2 -> 2/4; lengths equal, BP 1.
    assert metrics.bleu(["the cat the cat"], ["the cat sat down"], max_order=1) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="order"):
        metrics.bleu(text, text, max_order=5)


def test_rouge_l_of_a_known_pair():
    # LCS of "the cat sat on the mat" and "the cat is on the mat" is "the cat on the mat" (5):
    # P = R = 5/6, so F = 5/6. Identical texts give 1, disjoint 0.
    assert metrics.rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(5 / 6)
    assert metrics.rouge_l(["a b c", "x y"], ["a b c", "p q"]) == pytest.approx(0.5)


def test_meteor_exact_stem_worked_example():
    # hyp: the cats sat on the mat   ref: the cat sat on a mat   (6 words each)
    # exact stage: the-the (0,0), sat (2,2), on (3,3), mat (5,5); the second "the" finds no
    #   free "the" in the reference.  stem stage: cats -> cat matches cat (1,1).  "the" vs "a": no.
    # m = 5, P = R = 5/6, F_mean = P R / (0.9 P + 0.1 R) = 5/6.
    # chunks: (0,0)-(3,3) is one run, (5,5) another -> 2; penalty = 0.5 (2/5)^3 = 0.032.
    # score = 5/6 * (1 - 0.032) = 0.80666...
    value = metrics.meteor_sentence("the cats sat on the mat", "the cat sat on a mat")
    assert value == pytest.approx(5 / 6 * (1 - 0.5 * (2 / 5) ** 3))
    # Identical 6 words: m = 6, one chunk: 1 - 0.5 (1/6)^3.
    assert metrics.meteor_sentence("a b c d e f", "a b c d e f") == pytest.approx(1 - 0.5 / 216)
    # Recall-weighted: one of one predicted word matches (P 1), one of four reference words (R 1/4):
    # F_mean = 0.25 / (0.9 + 0.025) ; one chunk of one match: penalty 0.5.
    assert metrics.meteor_sentence("necrosis", "necrosis is present here") == pytest.approx(
        0.25 / 0.925 * 0.5)
    assert metrics.meteor_sentence("stroma", "necrosis") == 0.0
    assert metrics.meteor_exact_stem(["the cats sat on the mat", "stroma"],
                                     ["the cat sat on a mat", "necrosis"]) == pytest.approx(
        5 / 6 * 0.968 / 2)


def test_findings_recall_over_a_closed_vocabulary():
    vocab = ["carcinoma", "necrosis", "spindle cell neoplasm", "fibrous stroma"]
    assert metrics.named_labels("Carcinoma with necrosis.", vocab) == {"carcinoma", "necrosis"}
    # Whole words only, and a multi-word label needs all its words.
    assert metrics.named_labels("carcinomatous spindle cells", vocab) == set()
    reports = ["Diagnosis: carcinoma. Necrosis in the upper left.", "Fibrous stroma only."]
    truths = [{"carcinoma", "necrosis", "fibrous stroma"}, {"fibrous stroma"}]
    # named: {carcinoma, necrosis} and {fibrous stroma}: 3 of 4 true classes.
    assert metrics.findings_recall(reports, truths, vocab) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="vocabulary"):
        metrics.findings_recall(["x"], [{"glioma"}], vocab)


def test_recall_at_k_of_a_small_matrix():
    sim = [[0.9, 0.1, 0.0],    # own 0.9: rank 0
           [0.8, 0.5, 0.1],    # own 0.5: 0.8 above it -> rank 1
           [0.2, 0.3, 0.1]]    # own 0.1: two above -> rank 2
    assert metrics.recall_at_k(sim, 1) == pytest.approx(1 / 3)
    assert metrics.recall_at_k(sim, 2) == pytest.approx(2 / 3)
    assert metrics.recall_at_k(sim, 5) == pytest.approx(1.0)
    # Ties count against the true item: a constant similarity never retrieves.
    assert metrics.recall_at_k([[1.0, 1.0], [1.0, 1.0]], 1) == 0.0
    # Other targets: q0 wants item 1 (0.1, beaten), q1 item 0 (0.8, best), q2 item 0 (beaten).
    assert metrics.recall_at_k(sim, 1, targets=[1, 0, 0]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        metrics.recall_at_k(sim, 0)


def test_pointing_game_with_a_half_covered_target():
    regions = [box(0, 0, 10, 10), box(10, 0, 20, 10), box(20, 0, 30, 10)]
    # Target: two 2x2 squares, one in region 0 and one in region 1. Its centroid (8, 3) lies
    # in region 0; region 1 holds exactly half its area, so it hits too; region 2 misses.
    target = MultiPolygon([box(2, 2, 4, 4), box(12, 2, 14, 4)])
    out = metrics.pointing_outcome([0.1, 0.9, 0.3], regions, [mapping(target)])
    assert out.hit and out.top == 1
    assert out.chance == pytest.approx(2 / 3)
    miss = metrics.pointing_outcome([0.1, 0.2, 0.9], [mapping(r) for r in regions], [target])
    assert not miss.hit
    # A target mostly in region 0 (6 of 10 units) with its centroid (9, 5) there too:
    # region 1 holds 40 %, so only region 0 hits; chance 1/3.
    lopsided = metrics.pointing_outcome([1.0, 0.0, 0.0], regions, [box(4, 0, 14, 10)])
    assert lopsided.hit and lopsided.chance == pytest.approx(1 / 3)
    summary = metrics.pointing_game([out, miss, lopsided])
    assert summary["hit_rate"] == pytest.approx(2 / 3)
    assert summary["chance"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)
    assert summary["n"] == 3
    with pytest.raises(ValueError):
        metrics.pointing_outcome([], [], [target])


def test_metrics_import_without_torch():
    import subprocess
    import sys

    code = ("import sys, omero_hwsi.evaluation.metrics, omero_hwsi.evaluation; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
