"""Slide-distinct batch plans, corpus chunks, per-scale texts and the sentence assignment."""

from __future__ import annotations

import json

import numpy as np
import pytest

from omero_hwsi.training.batching import chunk_tokens, plan_batches, read_corpus, split_documents
from omero_hwsi.training.data import DatasetError
from omero_hwsi.training.texts import (
    SlideTexts,
    assign_sentences,
    batch_texts,
    read_scale_texts,
    split_sentences,
)


def test_batches_hold_distinct_slides_and_depend_only_on_seed_and_epoch():
    groups = ["a"] * 5 + ["b"] * 3 + ["c"] * 3 + ["d"] * 2
    plan = plan_batches(groups, 3, seed=1, epoch=0)
    assert plan == plan_batches(groups, 3, seed=1, epoch=0)
    assert plan != plan_batches(groups, 3, seed=1, epoch=1)
    assert sorted(i for b in plan for i in b) == list(range(len(groups)))
    for batch in plan:
        assert len({groups[i] for i in batch}) == len(batch)


def test_batches_of_too_few_slides_are_dropped_when_negatives_are_needed():
    groups = ["a"] * 4 + ["b"]
    plan = plan_batches(groups, 2, seed=0, epoch=0, min_groups=2)
    assert plan and all(len({groups[i] for i in b}) == 2 for b in plan)
    assert len([i for b in plan for i in b]) == 2  # only one batch can pair a with b


def test_validation_plan_keeps_the_given_order():
    assert plan_batches(["x", "y", "z"], 2, seed=0, epoch=0, shuffle=False) == [[0, 1], [2]]


def test_corpus_lines_or_blank_line_separated_documents(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("first doc\n\nsecond doc\nstill second\n\n\n", encoding="utf-8")
    assert read_corpus(lines) == ["first doc", "second doc\nstill second"]
    lines.write_text("one\ntwo\n  \n", encoding="utf-8")
    assert read_corpus(lines) == ["one", "two"]
    lines.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="no text"):
        read_corpus(lines)


def test_chunks_pack_documents_with_end_of_text():
    assert chunk_tokens([[1, 2], [3]], eos_id=0, max_length=3) == [[1, 2, 0], [3, 0]]
    assert chunk_tokens([[1, 2]], eos_id=0, max_length=2) == [[1, 2]]  # lone eos: nothing to learn
    train, val = split_documents(list("abcdefghij"), validation_fraction=0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == list("abcdefghij")


def test_scale_texts_file_is_parsed_by_hierarchy_id(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text(json.dumps({"slide_id": "S1", "wsi": "A report.", "regions": {"r12": "Left."},
                                "patches": {"r12.p40": "glands"}, "cells": {"r12.p40": "atypia"}})
                    + "\n\n" + json.dumps({"slide_id": "S2"}) + "\n", encoding="utf-8")
    table = read_scale_texts(path)
    assert table["S1"] == SlideTexts("A report.", {12: "Left."}, {(12, 40): "glands"}, {(12, 40): "atypia"})
    assert table["S2"] == SlideTexts()


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ({"slide_id": "S1", "regions": {"r1.p2": "x"}}, "not a r<i> id"),
        ({"slide_id": "S1", "patches": {"r1": "x"}}, r"not a r<i>\.p<j> id"),
        ({"slide_id": "S1", "cells": {"cell7": "x"}}, "not a hierarchy id"),
        ({"slide_id": "S1", "wsi": ""}, "wsi must be a non-empty string"),
        ({"slide_id": "S1", "notes": "x"}, "unknown key"),
        ({"wsi": "x"}, "slide_id must be"),
    ],
)
def test_bad_scale_texts_name_the_line(tmp_path, record, pattern):
    path = tmp_path / "texts.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=f"line 1: .*{pattern}"):
        read_scale_texts(path)


def test_batch_texts_map_ids_to_flat_visual_rows():
    # slide 0: regions r3, r5 (slots 0, 1); patch slots hold patches j = 7, 2, -1
    region_index = np.array([[3, 5], [9, -1]])
    patch_index = np.array([[[7, 2, -1], [1, 4, -1]], [[0, 1, 2], [-1, -1, -1]]])
    texts = [SlideTexts("Report zero.", {5: "Right side."}, {(5, 4): "phrase", (3, 99): "gone"},
                        {(3, 2): "word"}), None]
    out = batch_texts(["ignored", "One sentence. Another one!"], texts, region_index, patch_index)
    r, c = 2, 3
    assert out.pairs["wsi"] == [(0, "Report zero."), (1, "One sentence. Another one!")]
    assert out.pairs["region"] == [(0 * r + 1, "Right side.")]
    assert out.pairs["patch"] == [((0 * r + 1) * c + 1, "phrase")]  # r3.p99 is not selected
    assert out.pairs["cell"] == [((0 * r + 0) * c + 1, "word")]
    assert out.unassigned == [(1, ["One sentence.", "Another one!"])]


def test_sentences_and_their_one_to_one_assignment():
    assert split_sentences("Tumour is seen. Necrosis; mitoses! ...") == ["Tumour is seen.", "Necrosis;", "mitoses!"]
    sim = np.array([[0.9, 0.8], [0.95, 0.1], [0.5, 0.4]])
    assert assign_sentences(sim) == [1, 0, -1]
