"""What the synthetic slides say at each scale: words, phrases, sentences and reports.

Every statement is computed from a :class:`~omero_hwsi.synthetic.pathology.SlideTruth`,
never drawn at random: a class is named only when a region of it exists, a location only
where that class is, a nucleus word only for a patch whose truth nuclei (or, for necrosis,
fragments) are there. That is what makes the texts usable as contrastive pairs at every
scale (cell word, patch phrase, region sentence, slide report) and the answers checkable.

The per-scale texts follow the ``scale_texts`` JSONL of
:func:`~omero_hwsi.training.texts.read_scale_texts`: a phrase and a word per patch that
touches tissue (keyed ``r<i>.p<j>``, a superset of the patches our tissue detector keeps),
a sentence per region, the report per slide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely

from omero_hwsi.slide.grid import SUBDIVISIONS, block_mean, coverage_raster
from omero_hwsi.slide.hierarchy import patch_hid
from omero_hwsi.synthetic.classes import LESION_CLASSES, TISSUE_CLASSES
from omero_hwsi.synthetic.pathology import RegionTruth, SlideTruth

__all__ = [
    "NO_TUMOUR",
    "PatchFact",
    "caption",
    "diagnosis",
    "join_words",
    "ordered_classes",
    "patch_facts",
    "region_sentence",
    "report",
    "scale_texts",
]

NO_TUMOUR = "no tumour"
"""The diagnosis of a slide without a lesion class."""

_EDGE_FRACTION = 0.9
"""A patch with less tissue than this is "at the tissue edge"."""
_DENSE_PER_1000UM2 = 4.5
_MODERATE_PER_1000UM2 = 1.8
_ARTEFACT_WORDS = {"fold": "a tissue fold", "bubble": "an air bubble", "pen": "an ink mark"}


@dataclass(frozen=True, slots=True)
class PatchFact:
    """What the truth says about one patch slot of a region.

    Attributes:
        hid: ``r<i>.p<j>``.
        region: Region grid index ``i``.
        slot: Patch slot ``j`` (row-major in the region).
        tissue_fraction: Share of the patch box on tissue (the hierarchy's raster rule).
        n_nuclei: Truth nuclei whose centre lies in the patch.
        artefacts: Kinds of artefact overlapping the patch.
    """

    hid: str
    region: int
    slot: int
    tissue_fraction: float
    n_nuclei: int
    artefacts: tuple[str, ...]


def join_words(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def patch_facts(truth: SlideTruth) -> list[PatchFact]:
    """Facts of every patch touching tissue, region by region, slot by slot.

    Tissue fractions use the same raster rule as :func:`~omero_hwsi.slide.hierarchy.
    build_hierarchy` (cells of 1/8 patch, centre inside), applied to the true tissue.
    """
    spec = truth.spec
    pps = spec.grid.patches_per_side
    patch_l0 = spec.grid.patch_px * spec.level0_per_px
    cell = patch_l0 / SUBDIVISIONS
    raster = coverage_raster(
        truth.tissue, cell, (spec.rows * pps * SUBDIVISIONS, spec.cols * pps * SUBDIVISIONS)
    )
    fractions = block_mean(raster, SUBDIVISIONS)  # (rows * pps, cols * pps)
    table = truth.nuclei
    gx = np.floor(table.centroids[:, 0] / patch_l0).astype(np.int64)
    gy = np.floor(table.centroids[:, 1] / patch_l0).astype(np.int64)
    counts = np.zeros(fractions.shape, dtype=np.int64)
    np.add.at(counts, (gy, gx), 1)
    flagged = [(a.kind, a.geometry) for a in truth.artefacts if a.region is not None]

    facts: list[PatchFact] = []
    for region in truth.regions:
        for j in range(pps * pps):
            pr, pc = divmod(j, pps)
            gr, gc = region.row * pps + pr, region.col * pps + pc
            fraction = float(fractions[gr, gc])
            if fraction <= 0.0:
                continue
            x0, y0 = gc * patch_l0, gr * patch_l0
            cell_box = shapely.box(x0, y0, x0 + patch_l0, y0 + patch_l0)
            kinds = tuple(kind for kind, g in flagged if g.intersection(cell_box).area > 0.0)
            facts.append(PatchFact(
                patch_hid(region.index, j), region.index, j, fraction, int(counts[gr, gc]), kinds
            ))
    return facts


def _density_words(n: int, tissue_um2: float) -> str:
    per_1000 = 1000.0 * n / max(tissue_um2, 1e-9)
    if per_1000 >= _DENSE_PER_1000UM2:
        return "densely packed"
    if per_1000 >= _MODERATE_PER_1000UM2:
        return "moderately dense"
    return "sparse"


def patch_phrase(fact: PatchFact, truth: SlideTruth) -> str:
    """A phrase for a patch: its class, its nuclei as counted, and what overlies it."""
    tc = TISSUE_CLASSES[truth.regions[fact.region].tissue_class]
    spec = truth.spec
    side_um = spec.grid.patch_px * spec.grid.target_mpp
    tissue_um2 = fact.tissue_fraction * side_um * side_um
    if tc.nuclei is None:
        text = f"{tc.phrase} with nuclear debris and no intact nuclei"
    elif fact.n_nuclei == 0:
        text = f"{tc.phrase} without nuclei"
    else:
        text = f"{tc.phrase} with {_density_words(fact.n_nuclei, tissue_um2)} {tc.nucleus_word} nuclei"
    if fact.tissue_fraction < _EDGE_FRACTION:
        text += " at the tissue edge"
    for kind in fact.artefacts:
        text += f", under {_ARTEFACT_WORDS[kind]}"
    return text


def cell_word(fact: PatchFact, truth: SlideTruth) -> str:
    """One word for a patch's nuclei: the class's nucleus word, or ``none`` if it has none."""
    tc = TISSUE_CLASSES[truth.regions[fact.region].tissue_class]
    if tc.nuclei is None:
        return tc.nucleus_word  # fragments, drawn throughout necrosis
    return tc.nucleus_word if fact.n_nuclei > 0 else "none"


def region_sentence(region: RegionTruth, truth: SlideTruth) -> str:
    """One sentence for a region: where it is, its class and look, and any artefact on it."""
    tc = TISSUE_CLASSES[region.tissue_class]
    where = "The slide" if truth.spec.n_regions == 1 else f"The {region.location} region"
    text = f"{where} shows {tc.label}: {tc.detail}."
    for kind in region.artefacts:
        verb = "crosses" if kind == "fold" else "overlies"
        text += f" {_capital(_ARTEFACT_WORDS[kind])} {verb} it."
    return text


def diagnosis(truth: SlideTruth) -> str:
    """The slide's diagnosis: its lesion class label(s), or :data:`NO_TUMOUR`."""
    lesions = [TISSUE_CLASSES[c].label for c in truth.classes_present() if c in LESION_CLASSES]
    return join_words(lesions) if lesions else NO_TUMOUR


def ordered_classes(truth: SlideTruth) -> list[str]:
    """Present classes, lesions first, each group in vocabulary order (the report's order)."""
    present = truth.classes_present()
    return [c for c in present if c in LESION_CLASSES] + [
        c for c in present if c not in LESION_CLASSES
    ]


def _locations(regions: tuple[RegionTruth, ...], n_regions: int) -> str:
    if len(regions) == n_regions:
        return "throughout the slide" if n_regions > 1 else "on the slide"
    words = join_words([r.location for r in regions])
    return f"in the {words} region" + ("s" if len(regions) > 1 else "")


def caption(truth: SlideTruth) -> str:
    """A one-line caption: the main finding, then the other tissue present."""
    ordered = [TISSUE_CLASSES[c].label for c in ordered_classes(truth)]
    head, rest = ordered[0], ordered[1:]
    if not any(c in LESION_CLASSES for c in truth.classes_present()):
        head = f"benign {head}"
    text = _capital(head)
    if rest:
        text += " with " + join_words(rest)
    return text + "."


def report(truth: SlideTruth) -> str:
    """The slide's report: diagnosis, one finding per class present, then artefacts."""
    n = truth.spec.n_regions
    parts = [f"Diagnosis: {diagnosis(truth)}."]
    for name in ordered_classes(truth):
        tc = TISSUE_CLASSES[name]
        parts.append(
            f"{_capital(tc.label)} {_locations(truth.regions_of(name), n)}: {tc.detail}."
        )
    for artefact in truth.artefacts:
        what = _capital(_ARTEFACT_WORDS[artefact.kind])
        if artefact.region is None:
            parts.append(f"{what} lies on the glass beside the tissue.")
        else:
            region = next(r for r in truth.regions if r.hid == artefact.region)
            where = "the slide" if n == 1 else f"the {region.location} region"
            verb = "crosses" if artefact.kind == "fold" else "overlies"
            parts.append(f"{what} {verb} {where}.")
    return " ".join(parts)


def scale_texts(truth: SlideTruth) -> dict[str, Any]:
    """The slide's ``scale_texts`` record (one JSONL line)."""
    facts = patch_facts(truth)
    return {
        "slide_id": truth.slide_id,
        "wsi": report(truth),
        "regions": {r.hid: region_sentence(r, truth) for r in truth.regions},
        "patches": {f.hid: patch_phrase(f, truth) for f in facts},
        "cells": {f.hid: cell_word(f, truth) for f in facts},
    }
