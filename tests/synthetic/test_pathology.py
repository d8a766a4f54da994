"""Synthetic pathology: reproducible slides whose truth, texts and questions agree with them."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import shapely
from shapely.geometry import box, shape

from omero_hwsi.features.encoders.builtin import _HED_SCALE, HED_FEATURE_NAMES, hed_descriptor_raw
from omero_hwsi.slide.grid import GridSpec
from omero_hwsi.slide.hierarchy import build_hierarchy, patch_hid
from omero_hwsi.slide.local import open_slide
from omero_hwsi.slide.nuclei import NUCLEUS_DESCRIPTOR_NAMES, ClassicalNucleusSegmenter
from omero_hwsi.synthetic import (
    CLASS_NAMES,
    TISSUE_CLASSES,
    ArtefactSpec,
    DatasetManifest,
    SlideSpec,
    generate_dataset,
    paint_slide,
    render_slide,
    write_truth_geojson,
)
from omero_hwsi.synthetic.pathology import region_location
from omero_hwsi.training.batching import read_corpus
from omero_hwsi.training.data import read_wsibench_test, read_wsibench_train
from omero_hwsi.training.texts import read_scale_texts

SIX = ("normal", "tumour", "stroma", "necrosis", "epithelioid", "spindle")
TINY_GRID = GridSpec(region_px=256, patch_px=128)
"""Regions of 128 um: questions and balance do not depend on size, so big sets paint fast."""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def train_set(tmp_path_factory: pytest.TempPathFactory) -> DatasetManifest:
    return generate_dataset(tmp_path_factory.mktemp("train"), n_slides=3, seed=1)


@pytest.fixture(scope="module")
def test_set(tmp_path_factory: pytest.TempPathFactory) -> DatasetManifest:
    return generate_dataset(tmp_path_factory.mktemp("test"), n_slides=3, seed=1, split="test")


@pytest.fixture(scope="module")
def big_set(tmp_path_factory: pytest.TempPathFactory) -> DatasetManifest:
    """Many small slides, for balance and the truth of every question and report."""
    return generate_dataset(
        tmp_path_factory.mktemp("big"), n_slides=40, seed=3, split="test", grid=TINY_GRID,
        truth_nuclei=False,
    )


def _rows(manifest: DatasetManifest) -> list[dict[str, Any]]:
    text = manifest.instructions.read_text(encoding="utf-8")
    if manifest.split == "train":
        return list(json.loads(text))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _slides(manifest: DatasetManifest) -> dict[str, dict[str, Any]]:
    data = json.loads(manifest.manifest.read_text(encoding="utf-8"))
    return {s["slide_id"]: s for s in data["slides"]}


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------
def test_same_seed_gives_byte_identical_dataset(
    tmp_path: Path, train_set: DatasetManifest
) -> None:
    again = generate_dataset(tmp_path / "again", n_slides=3, seed=1)
    first, second = _tree(train_set.out_dir), _tree(again.out_dir)
    assert set(first) >= {"train.json", "scale_texts.jsonl", "corpus.txt", "dataset.json"}
    assert len([k for k in first if k.startswith("slides/")]) == 3
    assert first == second


def test_other_seed_or_split_gives_disjoint_slides(
    tmp_path: Path, train_set: DatasetManifest, test_set: DatasetManifest
) -> None:
    other = generate_dataset(tmp_path / "other", n_slides=2, seed=2)
    assert not set(other.slide_ids) & set(train_set.slide_ids)
    assert not set(test_set.slide_ids) & set(train_set.slide_ids)
    for a, b in zip(train_set.slide_ids, other.slide_ids):
        assert _sha(train_set.slide_path(a)) != _sha(other.slide_path(b))
    assert _sha(other.scale_texts) != _sha(train_set.scale_texts)


def test_slide_file_depends_only_on_spec(tmp_path: Path) -> None:
    spec = SlideSpec("s", 1, 2, ("tumour", "stroma"), seed=4, artefacts=(ArtefactSpec("pen"),))
    a = render_slide(spec, tmp_path / "a.svs")
    render_slide(spec, tmp_path / "b.svs")
    render_slide(SlideSpec("s", 1, 2, ("tumour", "stroma"), seed=5), tmp_path / "c.svs")
    assert _sha(tmp_path / "a.svs") == _sha(tmp_path / "b.svs") != _sha(tmp_path / "c.svs")
    write_truth_geojson(a, tmp_path / "a.geojson")
    write_truth_geojson(a, tmp_path / "b.geojson")
    assert _sha(tmp_path / "a.geojson") == _sha(tmp_path / "b.geojson")


# --------------------------------------------------------------------------------------------
# Pixels: the shape pair differs in nuclear shape only
# --------------------------------------------------------------------------------------------
_COLOUR = ("h_mean", "e_mean", "od_mean", "nuclear_frac", "h_share", "r_mean", "g_mean", "b_mean")


def _region_patches(rgb: npt.NDArray[np.uint8], col: int, side: int = 1024) -> npt.NDArray[np.uint8]:
    """The 2 x 2 central 256 px patches of region ``col`` of a one-row slide (clear of edges)."""
    x0 = col * side
    return np.stack([
        rgb[y : y + 256, x0 + x : x0 + x + 256] for y in (256, 512) for x in (256, 512)
    ])


def _colour_z(by_class: dict[str, list[npt.NDArray[np.float32]]], a: str, b: str) -> dict[str, float]:
    """Mean patch colour difference of two classes, in the descriptor's reference SDs."""
    diff = (np.mean(by_class[a], axis=0) - np.mean(by_class[b], axis=0)) / _HED_SCALE
    return {n: float(abs(diff[HED_FEATURE_NAMES.index(n)])) for n in _COLOUR}


def test_shape_pair_matches_in_colour_but_not_in_nuclear_shape() -> None:
    segmenter = ClassicalNucleusSegmenter()
    described: dict[str, list[npt.NDArray[np.float32]]] = {}
    nuclei: dict[str, list[npt.NDArray[np.float32]]] = {}
    # Both orders with one seed: the slow stain drift across the slide cancels out.
    for order in (("epithelioid", "spindle", "tumour"), ("spindle", "epithelioid", "tumour")):
        rgb, _ = paint_slide(SlideSpec("pair", 1, 3, order, seed=11))
        for col, name in enumerate(order):
            patches = _region_patches(rgb, col)
            described.setdefault(name, []).append(hed_descriptor_raw(patches).mean(axis=0))
            for patch in patches[:2]:
                nuclei.setdefault(name, []).append(segmenter.segment(patch, mpp=0.5).descriptors)

    pair = _colour_z(described, "epithelioid", "spindle")
    assert max(pair.values()) < 0.2, pair
    # The same measure does separate classes that differ in stain (so it can fail).
    assert max(_colour_z(described, "epithelioid", "tumour").values()) > 1.0

    col = {n: i for i, n in enumerate(NUCLEUS_DESCRIPTOR_NAMES)}
    rnd, spn = np.concatenate(nuclei["epithelioid"]), np.concatenate(nuclei["spindle"])
    assert len(rnd) > 100 and len(spn) > 100
    assert abs(len(rnd) - len(spn)) < 0.15 * len(rnd)
    assert np.median(rnd[:, col["eccentricity"]]) < 0.5 < 0.85 < np.median(spn[:, col["eccentricity"]])
    assert np.median(spn[:, col["solidity"]]) < np.median(rnd[:, col["solidity"]])
    area_r, area_s = np.median(rnd[:, col["area_um2"]]), np.median(spn[:, col["area_um2"]])
    assert abs(area_r - area_s) < 0.15 * area_r


# --------------------------------------------------------------------------------------------
# Truth
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mpp", [0.5, 0.25])
def test_truth_geojson_is_valid_and_matches_the_hierarchy(tmp_path: Path, mpp: float) -> None:
    rows, cols, classes = (2, 3, SIX) if mpp == 0.5 else (1, 2, ("spindle", "necrosis"))
    artefacts = (ArtefactSpec("pen"), ArtefactSpec("fold", 1), ArtefactSpec("bubble", 0))
    spec = SlideSpec("truth", rows, cols, classes, mpp=mpp, seed=2, artefacts=artefacts)
    truth = render_slide(spec, tmp_path / "truth.svs")
    assert truth.dimensions == (cols * 1024 * round(0.5 / mpp), rows * 1024 * round(0.5 / mpp))
    write_truth_geojson(truth, tmp_path / "truth.geojson")

    doc = json.loads((tmp_path / "truth.geojson").read_text())
    assert doc["type"] == "FeatureCollection"
    slide_rect = box(0, 0, *truth.dimensions)
    kinds: Counter[str] = Counter()
    regions: dict[str, str] = {}
    for feature in doc["features"]:
        geometry = shape(feature["geometry"])
        assert geometry.is_valid and geometry.area > 0
        assert slide_rect.contains(geometry)
        props = feature["properties"]
        name = props["classification"]["name"]
        if props["objectType"] == "detection":
            kinds["nucleus"] += 1
            assert name in CLASS_NAMES and name != "necrosis"
            assert spec.classes[int(props["region"][1:])] == name
        elif name == "artefact":
            kinds[props["kind"]] += 1
        else:
            regions[props["name"]] = name
    assert kinds["nucleus"] == len(truth.nuclei) > 1000
    assert (kinds["pen"], kinds["fold"], kinds["bubble"]) == (1, 1, 1)
    assert regions == {f"r{i}": c for i, c in enumerate(classes)}

    pen = next(a for a in truth.artefacts if a.kind == "pen")
    assert pen.region is None and pen.geometry.intersection(truth.tissue).area == 0
    assert truth.regions[1].artefacts == ("fold",) and truth.regions[0].artefacts == ("bubble",)

    with open_slide(tmp_path / "truth.svs") as slide:
        assert slide.mpp == pytest.approx(mpp, rel=1e-3)
        hierarchy = build_hierarchy(slide, spec.grid)
    assert hierarchy.region_ids == list(regions)
    # Tissue found by our detector is the truth's tissue (the ink mark is left out).
    overlap = hierarchy.tissue.intersection(truth.tissue).area
    assert overlap > 0.97 * truth.tissue.area and overlap > 0.97 * hierarchy.tissue.area
    # Every nucleus lies in its own region's box.
    for n in range(0, len(truth.nuclei), 97):
        x, y, w, h = truth.regions[int(truth.nuclei.region[n])].box
        assert box(x, y, x + w, y + h).contains(shapely.Polygon(truth.nuclei.polygons[n]))


def test_spec_refuses_what_it_cannot_render() -> None:
    with pytest.raises(ValueError, match="unknown tissue class 'tumor'"):
        SlideSpec("s", 1, 1, ("tumor",))
    with pytest.raises(ValueError, match="one class per region"):
        SlideSpec("s", 2, 2, ("tumour",))
    with pytest.raises(ValueError, match="whole number"):
        SlideSpec("s", 1, 1, ("tumour",), mpp=0.3)
    with pytest.raises(ValueError, match="slide_id"):
        SlideSpec("a/b.c", 1, 1, ("tumour",))
    with pytest.raises(ValueError, match="on the glass"):
        ArtefactSpec("pen", 0)


# --------------------------------------------------------------------------------------------
# Language side
# --------------------------------------------------------------------------------------------
def test_files_parse_with_the_training_readers(
    train_set: DatasetManifest, test_set: DatasetManifest
) -> None:
    train = read_wsibench_train(train_set.instructions)
    test = read_wsibench_test(test_set.instructions)
    assert len(train) == len(_rows(train_set)) and len(test) == len(_rows(test_set))
    assert {s.slide_id for s in train} == set(train_set.slide_ids)
    assert {s.slide_id for s in test} == set(test_set.slide_ids)
    assert {s.task for s in test} >= {"Classification", "Morphology", "Caption", "Report"}
    assert all(train_set.slide_path(s).is_file() for s in train_set.slide_ids)
    assert all(train_set.truth_path(s).is_file() for s in train_set.slide_ids)

    texts = read_scale_texts(train_set.scale_texts)
    assert set(texts) == set(train_set.slide_ids)
    documents = read_corpus(train_set.corpus)
    assert len(documents) == 2 * len(train_set.slide_ids)
    reports = {s.answer for s in train if s.question.startswith("Write a pathology report")}
    assert reports <= set(documents)

    # A phrase and a word for every patch our pipeline keeps, a sentence for every region.
    sid = train_set.slide_ids[0]
    with open_slide(train_set.slide_path(sid)) as slide:
        hierarchy = build_hierarchy(slide, GridSpec(region_px=1024, patch_px=256))
    entry = texts[sid]
    assert set(entry.regions) == set(hierarchy.region_index.tolist())
    for r, i in enumerate(hierarchy.region_index.tolist()):
        for j in np.flatnonzero(hierarchy.patch_valid[r]).tolist():
            assert (i, j) in entry.patches, patch_hid(i, j)
            assert (i, j) in entry.cells


def test_correct_letters_and_answers_are_balanced(big_set: DatasetManifest) -> None:
    letters: dict[str, Counter[str]] = {}
    answers: dict[str, Counter[str]] = {}
    presence: dict[str, Counter[str]] = {}
    labels = {c.label: name for name, c in TISSUE_CLASSES.items()}
    for row in _rows(big_set):
        match = re.fullmatch(r"([A-D])\) (.+)", row["T-answer"])
        if match is None:
            continue
        letters.setdefault(row["template"], Counter())[match[1]] += 1
        answers.setdefault(row["template"], Counter())[match[2]] += 1
        if row["template"] == "presence":
            stem = row["question"].split(" A) ")[0]
            (asked,) = [name for label, name in labels.items()
                        if re.search(rf" {re.escape(label)}[ ?]", stem)]
            presence.setdefault(asked, Counter())[match[2]] += 1
        options = re.findall(r"([A-D])\) ", row["question"])
        assert options == list("ABCD"[: len(options)]) and match[1] in options
    assert set(letters) == {"diagnosis", "presence", "location", "nuclear_shape"}
    for template, counts in letters.items():
        n_options = 2 if template in ("presence", "nuclear_shape") else 4
        full = [counts.get(letter, 0) for letter in "ABCD"[:n_options]]
        assert max(full) - min(full) <= 1, (template, counts)
    # The answers themselves are balanced too: yes/no per class (so neither the class asked
    # about nor the answer's prior tells the answer), and one diagnosis per slide in turn.
    assert set(presence) == set(TISSUE_CLASSES)
    for name, counts in presence.items():
        assert abs(counts["yes"] - counts["no"]) <= 1, (name, counts)
    assert max(answers["diagnosis"].values()) - min(answers["diagnosis"].values()) <= 1
    data = json.loads(big_set.manifest.read_text())
    per_class = data["counts"]["regions_per_class"]
    assert min(per_class.values()) >= 0.5 * max(per_class.values()), per_class


def test_every_statement_follows_from_the_truth(big_set: DatasetManifest) -> None:
    slides = _slides(big_set)
    labels = {name: c.label for name, c in TISSUE_CLASSES.items()}
    located = 0
    for row in _rows(big_set):
        slide = slides[row["question_id"].rsplit("-", 1)[0]]
        classes = slide["classes"]
        present = set(classes)
        answer, template = row["T-answer"], row["template"]
        if template in ("report", "caption", "tissue_types"):
            for name, label in labels.items():
                assert (label in answer.lower()) == (name in present), (label, answer)
        if template == "location":
            located += 1
            label = re.search(r"is the ([^?]+)\? A\)", row["question"])
            assert label is not None
            name = next(n for n, lab in labels.items() if lab == label[1])
            where = [i for i, c in enumerate(classes) if c == name]
            assert len(where) == 1
            target = row["evidence_target"]
            assert target["region_ids"] == [f"r{where[0]}"]
            assert shape(target["polygons"][0]).is_valid
            assert answer.split(") ", 1)[1] == region_location(*divmod(where[0], 2), 2, 2)
        if template == "nuclear_shape":
            lesion = next(c for c in present if c in ("epithelioid", "spindle"))
            assert answer.endswith("round" if lesion == "epithelioid" else "spindle-shaped")
            lesion_regions = [f"r{i}" for i, c in enumerate(classes) if c == lesion]
            if len(lesion_regions) == 1:
                assert row["evidence_target"]["region_ids"] == lesion_regions
            else:  # a finding spread over regions is not localisable
                assert "evidence_target" not in row
        if template == "diagnosis":
            assert answer.split(") ", 1)[1] == slide["diagnosis"]
    assert located >= 20


@pytest.mark.slow
def test_extraction_sees_each_class_nuclei(tmp_path: Path) -> None:
    from omero_hwsi.features.extract import ExtractionConfig, extract_slide
    from omero_hwsi.features.store import load_features

    spec = SlideSpec("classes", 2, 3, SIX, seed=5)
    render_slide(spec, tmp_path / "classes.svs")
    result = extract_slide(
        tmp_path / "classes.svs", tmp_path / "features", grid=spec.grid,
        config=ExtractionConfig(workers=0, n_candidates=8, k=4),
    )
    features = load_features(result.path)
    assert features.region_ids == [f"r{i}" for i in range(6)]
    ecc = NUCLEUS_DESCRIPTOR_NAMES.index("eccentricity")
    per_patch: dict[str, float] = {}
    shape_of: dict[str, float] = {}
    for position, i in enumerate(features.region_index.tolist()):
        chosen = features.nuclei.region == position
        per_patch[SIX[i]] = chosen.sum() / (features.candidates[position] >= 0).sum()
        shape_of[SIX[i]] = float(np.median(features.nuclei.descriptor[chosen, ecc]))
    assert per_patch["necrosis"] < 3
    assert per_patch["stroma"] < 25 < per_patch["normal"] < 60
    assert min(per_patch["tumour"], per_patch["epithelioid"], per_patch["spindle"]) > 60
    assert shape_of["epithelioid"] < 0.5 and shape_of["spindle"] > 0.85 and shape_of["stroma"] > 0.85
