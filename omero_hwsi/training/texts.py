"""Texts of each granularity for the hierarchical contrastive loss.

The paper pairs word <-> cell, phrase <-> patch, sentence <-> region and report <-> WSI. Real
instruction data has only a report (an answer) per slide, so:

* with a ``scale_texts`` JSONL file (the synthetic-data generator writes one), every scale
  gets its own texts, keyed by hierarchy ids::

      {"slide_id": "S1", "wsi": "report", "regions": {"r12": "sentence"},
       "patches": {"r12.p40": "phrase"}, "cells": {"r12.p40": "word"}}

  (``cells`` is keyed by patch id: CCAF makes one cell token per patch);
* without an entry, the WSI is paired with the sample's answer (the report) and, when the
  report has several sentences, each sentence with the region whose alignment embedding is
  most similar (:func:`assign_sentences`). That assignment is an approximation: it is
  computed without gradient from the current heads, so early in training it is close to
  random and it sharpens as the alignment improves.

Only the parsing and bookkeeping live here (pure Python and numpy); the embeddings are made
by the training objective.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from omero_hwsi._types import Scale
from omero_hwsi.slide.hierarchy import parse_hid
from omero_hwsi.training.data import DatasetError, json_objects

__all__ = [
    "BatchTexts",
    "SlideTexts",
    "assign_sentences",
    "batch_texts",
    "read_scale_texts",
    "split_sentences",
    "texts_by_slide",
]

logger = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")
_WORD = re.compile(r"\w")


@dataclass(frozen=True, slots=True)
class SlideTexts:
    """Per-scale texts of one slide (from the ``scale_texts`` file).

    Attributes:
        wsi: the slide's report, or None to use each sample's answer.
        regions: region grid index ``i`` -> sentence.
        patches: ``(i, j)`` (region, patch slot) -> phrase.
        cells: ``(i, j)`` -> word describing the cells of that patch.
    """

    wsi: str | None = None
    regions: dict[int, str] = field(default_factory=dict)
    patches: dict[tuple[int, int], str] = field(default_factory=dict)
    cells: dict[tuple[int, int], str] = field(default_factory=dict)


def split_sentences(text: str) -> list[str]:
    """Sentences of a report: split after ``.``, ``!``, ``?`` or ``;`` followed by space.

    Pieces without a letter or digit are dropped. Abbreviations ("approx. 3 mm") split too;
    for the region assignment that only makes a sentence shorter, never wrong in kind.
    """
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if _WORD.search(s)]


def _text(where: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: {key} must be a non-empty string")
    return value.strip()


def _ids(where: str, key: str, table: Any, *, depth: int) -> dict[Any, str]:
    """``{"r12": text}`` (depth 1) or ``{"r12.p40": text}`` (depth 2) with parsed keys."""
    if not isinstance(table, dict):
        raise DatasetError(f"{where}: {key!r} must be an object keyed by hierarchy ids")
    out: dict[Any, str] = {}
    for hid, value in table.items():
        try:
            i, j, k = parse_hid(str(hid))
        except ValueError as err:
            raise DatasetError(f"{where}: {key}: {err}") from None
        if (depth == 1 and j is not None) or (depth == 2 and (j is None or k is not None)):
            wanted = "r<i>" if depth == 1 else "r<i>.p<j>"
            raise DatasetError(f"{where}: {key}: id {hid!r} is not a {wanted} id")
        out[i if depth == 1 else (i, j)] = _text(where, f"{key}[{hid!r}]", value)
    return out


def read_scale_texts(path: str | os.PathLike[str]) -> dict[str, SlideTexts]:
    """Read a ``scale_texts`` JSONL file: slide id -> :class:`SlideTexts`.

    Blank lines are skipped; every key but ``slide_id`` is optional.

    Raises:
        DatasetError: unreadable file, a line that is not a JSON object, a missing slide id,
            a slide listed twice, an unknown key, an id of the wrong level or an empty text;
            the message names the file and line.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{file}: cannot read the scale texts ({err})") from err
    out: dict[str, SlideTexts] = {}
    for where, record in json_objects(file, text):
        unknown = sorted(set(record) - {"slide_id", "wsi", "regions", "patches", "cells"})
        if unknown:
            raise DatasetError(f"{where}: unknown key(s) {', '.join(unknown)}")
        slide_id = _text(where, "slide_id", record.get("slide_id"))
        if slide_id in out:
            raise DatasetError(f"{where}: slide {slide_id!r} is listed twice")
        out[slide_id] = SlideTexts(
            wsi=_text(where, "wsi", record["wsi"]) if "wsi" in record else None,
            regions=_ids(where, "regions", record.get("regions", {}), depth=1),
            patches=_ids(where, "patches", record.get("patches", {}), depth=2),
            cells=_ids(where, "cells", record.get("cells", {}), depth=2),
        )
    return out


@dataclass(slots=True)
class BatchTexts:
    """The texts of one micro-batch, tied to visual elements.

    Attributes:
        pairs: scale -> ``(owner, text)`` with ``owner`` the flat row of the scale's visual
            embeddings (see :class:`~omero_hwsi.model.losses.ScaleTexts`): ``b`` for the
            WSI, ``b * R + r`` for regions, ``(b * R + r) * C + c`` for patches and cells.
        unassigned: ``(b, sentences)`` of slides whose report must be spread over their
            regions by similarity (:func:`assign_sentences`).
    """

    pairs: dict[Scale, list[tuple[int, str]]]
    unassigned: list[tuple[int, list[str]]]


def batch_texts(
    reports: Sequence[str],
    slide_texts: Sequence[SlideTexts | None],
    region_index: npt.NDArray[np.int64],
    patch_index: npt.NDArray[np.int64],
) -> BatchTexts:
    """Collect the per-scale texts of a micro-batch of B slides.

    Args:
        reports: each slide's sample answer (its WSI text when ``scale_texts`` has none).
        slide_texts: each slide's ``scale_texts`` entry, or None.
        region_index: ``(B, R)`` region grid index per slot, -1 = padding (from
            :func:`~omero_hwsi.model.processing_hwsi.collate_visual`).
        patch_index: ``(B, R, C)`` patch slot ``j`` per selected slot, -1 = empty.

    Returns:
        The pairs, and the reports left for sentence assignment. Texts for regions or
        patches that are not in the batch (not on tissue, not selected) are skipped (DEBUG).
    """
    b_total, r_total = region_index.shape
    c_total = patch_index.shape[2]
    pairs: dict[Scale, list[tuple[int, str]]] = {"cell": [], "patch": [], "region": [], "wsi": []}
    unassigned: list[tuple[int, list[str]]] = []
    for b in range(b_total):
        entry = slide_texts[b]
        report = entry.wsi if entry is not None and entry.wsi is not None else reports[b]
        pairs["wsi"].append((b, report))
        slot_of = {int(i): r for r, i in enumerate(region_index[b]) if i >= 0}
        if entry is None or not entry.regions:
            sentences = split_sentences(report)
            if len(sentences) >= 2:
                unassigned.append((b, sentences))
        else:
            for i, text in entry.regions.items():
                if i in slot_of:
                    pairs["region"].append((b * r_total + slot_of[i], text))
                else:
                    logger.debug("slide %d: region r%d has a text but no features", b, i)
        if entry is None:
            continue
        scale_tables: tuple[tuple[Scale, dict[tuple[int, int], str]], ...] = (
            ("patch", entry.patches), ("cell", entry.cells))
        for scale, table in scale_tables:
            for (i, j), text in table.items():
                r = slot_of.get(i)
                slots = np.flatnonzero(patch_index[b, r] == j) if r is not None else None
                if r is None or slots is None or slots.size == 0:
                    logger.debug("slide %d: patch r%d.p%d has a %s text but is not selected",
                                 b, i, j, scale)
                    continue
                pairs[scale].append(((b * r_total + r) * c_total + int(slots[0]), text))
    return BatchTexts(pairs=pairs, unassigned=unassigned)


def assign_sentences(similarity: npt.NDArray[np.floating[Any]]) -> list[int]:
    """Give each sentence its own region, most similar pairs first (greedy matching).

    A one-to-one assignment keeps every sentence usable as a contrastive pair (two sentences
    on one region would make one a false negative of the other's region). Sentences beyond
    the number of regions get -1.

    Args:
        similarity: ``(S, R)`` sentence-region cosine similarities of one slide's real regions.

    Returns:
        Region column per sentence, -1 when none is left.
    """
    sim = np.array(similarity, dtype=np.float64, copy=True)
    n_sentences, n_regions = sim.shape
    out = [-1] * n_sentences
    for _ in range(min(n_sentences, n_regions)):
        s, r = np.unravel_index(int(np.argmax(sim)), sim.shape)
        out[int(s)] = int(r)
        sim[s, :] = -np.inf
        sim[:, r] = -np.inf
    return out


def texts_by_slide(
    slide_ids: Sequence[str], table: Mapping[str, SlideTexts]
) -> list[SlideTexts | None]:
    """Each slide's entry in the ``scale_texts`` table (None when it has none)."""
    return [table.get(slide_id) for slide_id in slide_ids]
