"""The evidence of one analysis as QuPath GeoJSON (``evidence.geojson``).

Why: a pathologist judges an answer by looking at what the model relied on, in the viewer
they already use. Dropping this file on a slide open in QuPath (0.4+) adds:

- regions as ``annotation`` objects (class ``HWSI evidence region``),
- patches as ``tile`` objects (class ``HWSI evidence patch``),
- nuclei as ``detection`` objects whose geometry is the nucleus outline
  (class ``HWSI evidence nucleus``).

One class (and colour) per level keeps QuPath's class list short; the score is a measurement,
so QuPath's measurement maps colour objects by it. Measurement names are stable (see
:data:`MEASUREMENT_NAMES`, :data:`RANK_MEASUREMENT`): scripts and the QuPath bridge read them.
Feature ids are UUIDv5 of the slide checksum, the analysis time, the method and the hierarchy
id: re-importing the same result replaces its objects, another analysis adds its own. Every
geometry is clipped to the slide rectangle (grid boxes may pass the border).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import shapely
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from omero_hwsi.results.geojson import (
    ObjectType,
    feature_id,
    qupath_feature,
    write_feature_collection,
)

if TYPE_CHECKING:  # the result module's package needs torch at runtime; results/ must not
    from omero_hwsi.results.schema import AnalysisResult, EvidenceItem

__all__ = [
    "CLASSES",
    "MEASUREMENT_NAMES",
    "RANK_MEASUREMENT",
    "evidence_features",
    "evidence_ranks",
    "measurement_name",
    "truncate",
    "write_evidence_geojson",
]

MEASUREMENT_NAMES: dict[str, str] = {
    "occlusion": "HWSI evidence (occlusion dlogp)",
    "grad_x_input": "HWSI evidence (grad x input)",
    "attention": "HWSI evidence (attention)",
}
"""Evidence method -> the QuPath measurement holding its score."""

RANK_MEASUREMENT = "HWSI evidence rank"
"""Rank of the element's score within its level and method; 1 = strongest support."""

CLASSES: dict[str, tuple[str, ObjectType, tuple[int, int, int]]] = {
    "region": ("HWSI evidence region", "annotation", (230, 120, 20)),
    "patch": ("HWSI evidence patch", "tile", (220, 40, 120)),
    "cell": ("HWSI evidence nucleus", "detection", (20, 170, 200)),
}
"""Evidence level -> (QuPath class name, object type, class colour)."""

TEXT_LIMIT = 200
"""Question and answer are cut to this many characters in each feature's metadata."""


def measurement_name(method: str) -> str:
    """The measurement name of a method's score (unknown methods keep their own name)."""
    return MEASUREMENT_NAMES.get(method, f"HWSI evidence ({method})")


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis when something was cut."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: max(0, limit - 1)].rstrip() + "\u2026"


def evidence_ranks(result: AnalysisResult) -> list[int]:
    """Rank of each evidence item (same order as ``result.evidence``), 1 = highest score.

    Ranked within one level and method, since scores of different levels or methods are not
    comparable; ties go by id, non-finite scores last, so ranks are deterministic.
    """
    groups: dict[tuple[str, str], list[int]] = {}
    for n, item in enumerate(result.evidence):
        groups.setdefault((item.level, item.method), []).append(n)
    ranks = [0] * len(result.evidence)
    for members in groups.values():
        def key(n: int) -> tuple[bool, float, str]:
            score = float(result.evidence[n].score)
            finite = math.isfinite(score)
            return (not finite, -score if finite else 0.0, result.evidence[n].id)

        for rank, n in enumerate(sorted(members, key=key), start=1):
            ranks[n] = rank
    return ranks


def evidence_geometry(item: EvidenceItem) -> BaseGeometry:
    """The item's GeoJSON geometry as shapely, repaired when self-intersecting."""
    geometry = shape(item.geometry)
    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry)
    return geometry


def _metadata(result: AnalysisResult, item: EvidenceItem) -> dict[str, str]:
    """What QuPath shows under the object's metadata: strings only, as QuPath stores them."""
    model = result.model
    return {
        "HWSI hierarchy id": item.id,
        "HWSI parent": item.parent or "",
        "HWSI method": item.method,
        "HWSI task": result.task,
        "HWSI question": truncate(result.question, TEXT_LIMIT),
        "HWSI answer": truncate(result.answer, TEXT_LIMIT),
        "HWSI model": str(model.get("path", "")),
        "HWSI model config sha256": str(model.get("config_sha256", "")),
        "HWSI slide checksum": str(result.slide.get("checksum") or ""),
        "HWSI created": result.created,
    }


def evidence_features(
    result: AnalysisResult, slide_size: tuple[float, float]
) -> list[dict[str, Any]]:
    """QuPath features for every evidence item, regions first, then patches, then nuclei.

    Within a level, features follow their rank. Items whose geometry lies entirely outside
    the slide rectangle ``[0, W] x [0, H]`` (``slide_size = (W, H)``, level-0 px) are dropped.

    Raises:
        ValueError: a slide size that is not positive.
    """
    width, height = (float(v) for v in slide_size)
    if not (width > 0 and height > 0):
        raise ValueError(f"slide size must be positive, got {slide_size!r}")
    key = str(result.slide.get("checksum") or result.slide.get("slide_id") or "")
    ranks = evidence_ranks(result)
    levels = list(CLASSES)

    def position(n: int) -> tuple[int, str, int]:
        level = result.evidence[n].level
        depth = levels.index(level) if level in levels else len(levels)
        return (depth, result.evidence[n].method, ranks[n])

    order = sorted(range(len(result.evidence)), key=position)
    features = []
    for n in order:
        item = result.evidence[n]
        name, object_type, color = CLASSES.get(
            item.level, (f"HWSI evidence {item.level}", "detection", (128, 128, 128)))
        feature = qupath_feature(
            evidence_geometry(item), object_type=object_type, name=item.id,
            fid=feature_id(key, result.created, item.method, item.id),
            classification=name, color=color, clip_to=(width, height),
            measurements={measurement_name(item.method): float(item.score),
                          RANK_MEASUREMENT: float(ranks[n])},
            properties={"hid": item.id, "metadata": _metadata(result, item)},
        )
        if feature is not None:
            features.append(feature)
    return features


def write_evidence_geojson(
    result: AnalysisResult, slide_size: tuple[float, float], path: str | os.PathLike[str]
) -> int:
    """Write :func:`evidence_features` as a FeatureCollection, atomically; returns the count."""
    return write_feature_collection(path, evidence_features(result, slide_size))
