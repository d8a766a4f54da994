"""GeoJSON that QuPath (0.4+) imports by drag and drop.

Each feature has a top-level ``id`` (a UUID), a geometry in level-0 pixels (origin top-left)
and ``properties`` with ``objectType`` (annotation, detection, tile, cell), ``name``,
``classification {name, color}`` and numeric ``measurements``. Feature ids are UUIDv5 of the
slide checksum and the hierarchy id, so reruns write identical files and re-imports replace
rather than duplicate.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import shapely
from shapely.geometry import mapping
from shapely.geometry.base import BaseGeometry

from omero_hwsi._io import write_bytes_atomic

__all__ = ["ObjectType", "feature_id", "qupath_feature", "write_feature_collection"]

ObjectType = Literal["annotation", "detection", "tile", "cell"]

_NAMESPACE = uuid.UUID("8d1c5f0e-3f5b-4c1e-9a59-2f3d0b6c7e11")


def feature_id(*parts: str) -> str:
    """Deterministic UUID for a feature, from e.g. the slide checksum and a hierarchy id."""
    return str(uuid.uuid5(_NAMESPACE, "/".join(parts)))


def _measurement(value: float) -> float | str:
    value = float(value)
    return value if math.isfinite(value) else "NaN"


def qupath_feature(
    geometry: BaseGeometry,
    *,
    object_type: ObjectType,
    name: str,
    fid: str,
    classification: str | None = None,
    color: tuple[int, int, int] | None = None,
    measurements: Mapping[str, float] | None = None,
    properties: Mapping[str, Any] | None = None,
    clip_to: tuple[float, float] | None = None,
) -> dict[str, Any] | None:
    """One QuPath feature, or ``None`` when the geometry is empty after clipping.

    ``clip_to = (width, height)`` clips the geometry to the slide rectangle ``[0, W] x [0, H]``
    (padded boxes stay in the store and in a ``box`` property, not in the drawn shape).
    """
    if clip_to is not None:
        geometry = shapely.clip_by_rect(geometry, 0, 0, clip_to[0], clip_to[1])
    if geometry.is_empty:
        return None
    props: dict[str, Any] = {"objectType": object_type, "name": name, "isLocked": False}
    if classification is not None:
        cls: dict[str, Any] = {"name": classification}
        if color is not None:
            cls["color"] = [int(c) for c in color]
        props["classification"] = cls
    if measurements:
        props["measurements"] = {k: _measurement(v) for k, v in measurements.items()}
    if properties:
        props.update(properties)
    return {"type": "Feature", "id": fid, "geometry": mapping(geometry), "properties": props}


def write_feature_collection(
    path: str | os.PathLike[str], features: Iterable[dict[str, Any] | None]
) -> int:
    """Write a FeatureCollection atomically; returns the number of features written."""
    kept = [f for f in features if f is not None]
    doc = {"type": "FeatureCollection", "features": kept}
    write_bytes_atomic(path, json.dumps(doc, allow_nan=False, separators=(",", ":")).encode("utf-8"))
    return len(kept)
