"""Read user-drawn regions (a QuPath export, any GeoJSON) as one level-0 geometry.

``hwsi analyze --regions FILE`` limits an analysis to what a pathologist outlined. QuPath
exports a FeatureCollection, a bare list of features, or a single feature; other tools write a
bare geometry. All are accepted; only areas count (points and lines are refused, since they
select no patch), and anything malformed is a one-line :class:`GeoJSONError` naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import shapely
from shapely.errors import GEOSException
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from omero_hwsi.errors import GeoJSONError

__all__ = ["read_region_geometry"]

_AREAS = {"Polygon", "MultiPolygon"}


def _geometries(doc: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(doc, list):
        return [g for item in doc for g in _geometries(item, where)]
    if not isinstance(doc, dict) or "type" not in doc:
        raise GeoJSONError(f"{where}: expected a GeoJSON object with a 'type'")
    kind = doc["type"]
    if kind == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise GeoJSONError(f"{where}: FeatureCollection without a 'features' list")
        return [g for item in features for g in _geometries(item, where)]
    if kind == "Feature":
        geometry = doc.get("geometry")
        if geometry is None:
            return []
        return _geometries(geometry, where)
    if kind == "GeometryCollection":
        return [g for item in doc.get("geometries", []) for g in _geometries(item, where)]
    return [doc]


def read_region_geometry(path: str | os.PathLike[str]) -> BaseGeometry:
    """The union of the areas in a GeoJSON file, in its coordinates (level-0 pixels for QuPath).

    Raises:
        GeoJSONError: the file is missing, not JSON, not GeoJSON, holds no area, or holds a
            point or line (which would select nothing).
    """
    file = Path(path)
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise GeoJSONError(f"{file}: regions file not found") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GeoJSONError(f"{file}: not a readable JSON file ({err})") from err
    shapes: list[BaseGeometry] = []
    for geometry in _geometries(doc, str(file)):
        kind = geometry.get("type")
        if kind not in _AREAS:
            raise GeoJSONError(f"{file}: a {kind} selects no area; draw polygons or rectangles")
        try:
            parsed = shape(geometry)
        except (GEOSException, ValueError, TypeError, KeyError, IndexError) as err:
            raise GeoJSONError(f"{file}: malformed {kind} coordinates ({err})") from err
        shapes.append(shapely.make_valid(parsed))
    union = shapely.union_all(shapes) if shapes else None
    if union is None or union.is_empty or union.area <= 0:
        raise GeoJSONError(f"{file}: no polygon with an area in the file")
    return union
