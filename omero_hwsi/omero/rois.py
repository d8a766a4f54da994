"""Evidence regions as OMERO ROIs that QuPath's OMERO extension imports as classified annotations.

Why this layout: QuPath (0.6+, OMERO extension) reads each shape's ``textValue`` as
``<Type>:<Class>:<uuid>:<parent uuid or NoParent>:<name or NoName>`` and joins the shapes that
share a uuid into one object; a polygon with holes is written as one shape per ring (exterior
and each hole), and a multi-part geometry as one shape per part. OMERO polygons have a single
ring, so this is also the only way to keep holes. ``:`` separates the fields, so a class path
(``Tumor: Positive``) is written with ``&`` between its parts and names have ``:`` replaced.

Colours are OMERO's signed 32-bit RGBA ints (red in the top byte). Coordinates are level-0
pixels, as everywhere in omero-hwsi; an OMERO polygon's ring is implicitly closed, so the
repeated closing point of a GeoJSON ring is dropped.

The plain shape specs (:class:`RoiSpec`, :class:`RoiShape`) are pure data with their own tests;
only :func:`to_omero_roi` and :func:`roi_to_geometry` touch ``omero.model`` (imported lazily, so
this module imports without omero-py).
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid as uuidlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import shapely
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon, box, shape
from shapely.geometry.base import BaseGeometry

from omero_hwsi.errors import InputError
from omero_hwsi.omero.annotations import is_ours
from omero_hwsi.omero.images import unwrap

__all__ = [
    "FILL_ALPHA",
    "NO_CLASS",
    "NO_NAME",
    "NO_PARENT",
    "RGBA",
    "RoiShape",
    "RoiSpec",
    "ShapeText",
    "geometry_shapes",
    "image_regions",
    "regions_digest",
    "omero_int_to_rgba",
    "parse_points",
    "parse_shape_text",
    "points_string",
    "rgba_to_omero_int",
    "roi_specs_from_features",
    "roi_to_geometry",
    "shape_text",
    "to_omero_roi",
]

RGBA = tuple[int, int, int, int]
NO_CLASS, NO_PARENT, NO_NAME = "NoClass", "NoParent", "NoName"
FILL_ALPHA = 48
"""Fill opacity (0-255) of evidence ROIs: the tissue under them stays visible."""
_TYPES = {"annotation": "Annotation", "detection": "Detection"}


@dataclass(frozen=True, slots=True)
class ShapeText:
    """The fields of a shape's text in QuPath's OMERO convention."""

    object_type: Literal["annotation", "detection"]
    classes: tuple[str, ...]
    uuid: str
    parent: str | None
    name: str | None


@dataclass(frozen=True, slots=True)
class RoiShape:
    """One OMERO shape: a polygon ring (open: no repeated closing point) or a rectangle.

    Attributes:
        kind: ``polygon`` or ``rectangle``.
        points: polygon vertices, or the rectangle's ``(x, y)`` and ``(x + w, y + h)``.
        text: the QuPath text (:func:`shape_text`).
        stroke, fill: RGBA colours (0-255 each).
    """

    kind: Literal["polygon", "rectangle"]
    points: tuple[tuple[float, float], ...]
    text: str
    stroke: RGBA
    fill: RGBA


@dataclass(frozen=True, slots=True)
class RoiSpec:
    """One ROI to write: its shapes (all sharing one QuPath uuid), name and description."""

    name: str
    description: str
    shapes: tuple[RoiShape, ...]


def _clean(text: str) -> str:
    """A text field without the ``:`` delimiter (and without line breaks)."""
    return " ".join(text.replace(":", "-").split())


def shape_text(object_type: Literal["annotation", "detection"], classes: Sequence[str],
               object_id: str, *, name: str | None = None, parent: str | None = None) -> str:
    """The ``textValue`` QuPath reads back as a classified object.

    Raises:
        InputError: ``object_id`` (or ``parent``) is not a UUID.
    """
    for value in (object_id, parent):
        if value is not None:
            try:
                uuidlib.UUID(value)
            except ValueError as err:
                raise InputError(f"{value!r} is not a UUID; QuPath ids in ROI texts are") from err
    parts = [_clean(c).replace("&", "and") for c in classes if c.strip()]
    return ":".join([_TYPES[object_type], "&".join(parts) if parts else NO_CLASS, object_id,
                     parent or NO_PARENT, _clean(name) if name and name.strip() else NO_NAME])


def parse_shape_text(text: str | None) -> ShapeText | None:
    """The fields of a shape text written in QuPath's convention; None for any other text."""
    if not text:
        return None
    fields = text.split(":")
    if len(fields) < 3 or fields[0] not in _TYPES.values():
        return None
    try:
        object_id = str(uuidlib.UUID(fields[2]))
    except ValueError:
        return None
    object_type: Literal["annotation", "detection"] = (
        "annotation" if fields[0] == "Annotation" else "detection")
    classes = () if fields[1] == NO_CLASS else tuple(fields[1].split("&"))
    parent = fields[3] if len(fields) > 3 and fields[3] != NO_PARENT else None
    name = fields[4] if len(fields) > 4 and fields[4] != NO_NAME else None
    return ShapeText(object_type, classes, object_id, parent, name)


def rgba_to_omero_int(rgba: Sequence[int]) -> int:
    """``(r, g, b, a)`` -> OMERO's signed 32-bit colour int (red in the top byte).

    Raises:
        ValueError: not four channels in 0-255.
    """
    if len(rgba) != 4 or any(not 0 <= int(c) <= 255 for c in rgba):
        raise ValueError(f"a colour is four channels in 0-255, got {tuple(rgba)!r}")
    r, g, b, a = (int(c) for c in rgba)
    value = (r << 24) | (g << 16) | (b << 8) | a
    return value - (1 << 32) if value >= 1 << 31 else value


def omero_int_to_rgba(value: int) -> RGBA:
    """OMERO's signed 32-bit colour int -> ``(r, g, b, a)``."""
    value &= 0xFFFFFFFF
    return (value >> 24) & 0xFF, (value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF


def _number(value: float) -> str:
    """A coordinate as OMERO stores it: integers without a decimal point, else up to 0.001 px."""
    rounded = round(float(value), 3)
    return str(int(rounded)) if rounded.is_integer() else f"{rounded:.3f}".rstrip("0")


def points_string(points: Iterable[tuple[float, float]]) -> str:
    """``[(x, y), ...]`` -> OMERO's ``"x1,y1 x2,y2 ..."``."""
    return " ".join(f"{_number(x)},{_number(y)}" for x, y in points)


def parse_points(text: str) -> list[tuple[float, float]]:
    """OMERO's ``"x1,y1 x2,y2 ..."`` -> ``[(x, y), ...]`` (also ``x,y, x,y`` with commas).

    Raises:
        InputError: a point that is not two finite numbers.
    """
    points: list[tuple[float, float]] = []
    for token in re.split(r"\s+", text.strip().replace(", ", " ")):
        if not token:
            continue
        fields = token.strip(",").split(",")
        try:
            x, y = (float(v) for v in fields)
        except ValueError as err:
            raise InputError(f"ROI points {token!r}: not an x,y pair of numbers") from err
        if not (math.isfinite(x) and math.isfinite(y)):
            raise InputError(f"ROI points {token!r}: coordinates must be finite")
        points.append((x, y))
    return points


def _ring(coords: Iterable[Sequence[float]]) -> tuple[tuple[float, float], ...]:
    ring = [(float(c[0]), float(c[1])) for c in coords]
    if len(ring) > 1 and ring[0] == ring[-1]:
        ring.pop()
    return tuple(ring)


def _is_axis_aligned_rectangle(polygon: Polygon) -> bool:
    return not polygon.interiors and polygon.equals(box(*polygon.bounds))


def geometry_shapes(geometry: BaseGeometry, *, text: str, stroke: RGBA,
                    fill: RGBA) -> list[RoiShape]:
    """The shapes of one object: a rectangle for an axis-aligned box, else one polygon per ring.

    Polygons and multi-polygons only (evidence regions); other parts are ignored.
    """
    parts: list[Polygon]
    if isinstance(geometry, Polygon):
        parts = [geometry]
    elif isinstance(geometry, MultiPolygon):
        parts = list(geometry.geoms)
    else:
        parts = [g for g in getattr(geometry, "geoms", ()) if isinstance(g, Polygon)]
    shapes: list[RoiShape] = []
    for part in parts:
        if part.is_empty:
            continue
        if _is_axis_aligned_rectangle(part):
            x0, y0, x1, y1 = part.bounds
            shapes.append(RoiShape("rectangle", ((x0, y0), (x1, y1)), text, stroke, fill))
            continue
        for ring in (part.exterior, *part.interiors):
            shapes.append(RoiShape("polygon", _ring(ring.coords), text, stroke, fill))
    return shapes


def roi_specs_from_features(features: Iterable[Mapping[str, Any]], *,
                            description: str) -> list[RoiSpec]:
    """ROIs for the ``annotation`` features of an evidence GeoJSON (the regions).

    Patches and nuclei stay in the GeoJSON attachment: viewers slow down with thousands of
    ROIs. Each ROI keeps the feature's uuid (so QuPath's object id is the GeoJSON id), class
    and class colour; its name carries the hierarchy id and the score measurements.
    """
    specs: list[RoiSpec] = []
    for feature in features:
        props = feature.get("properties") or {}
        if props.get("objectType") != "annotation":
            continue
        cls = props.get("classification") or {}
        classes = tuple(str(cls["name"]).split(":")) if cls.get("name") else ()
        r, g, b = (int(c) for c in list(cls.get("color", (255, 200, 0)))[:3])
        measurements = props.get("measurements") or {}
        score = "; ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in measurements.items())
        name = f"{props.get('name', '')} ({score})" if score else str(props.get("name", ""))
        text = shape_text("annotation", [c.strip() for c in classes], str(feature["id"]),
                          name=name)
        shapes = geometry_shapes(shape(feature["geometry"]), text=text,
                                 stroke=(r, g, b, 255), fill=(r, g, b, FILL_ALPHA))
        if shapes:
            specs.append(RoiSpec(name=_clean(name), description=description, shapes=tuple(shapes)))
    return specs


def to_omero_roi(spec: RoiSpec, image_id: int, *, z: int = 0, t: int = 0) -> Any:
    """An unsaved ``omero.model.RoiI`` with the spec's shapes, linked to image ``image_id``."""
    from omero.model import ImageI, LengthI, PolygonI, RectangleI, RoiI
    from omero.model.enums import UnitsLength
    from omero.rtypes import rdouble, rint, rstring

    roi = RoiI()
    roi.setName(rstring(spec.name))
    roi.setDescription(rstring(spec.description))
    roi.setImage(ImageI(image_id, False))
    for item in spec.shapes:
        if item.kind == "rectangle":
            (x0, y0), (x1, y1) = item.points
            omero_shape: Any = RectangleI()
            omero_shape.setX(rdouble(x0))
            omero_shape.setY(rdouble(y0))
            omero_shape.setWidth(rdouble(x1 - x0))
            omero_shape.setHeight(rdouble(y1 - y0))
        else:
            omero_shape = PolygonI()
            omero_shape.setPoints(rstring(points_string(item.points)))
        omero_shape.setTextValue(rstring(item.text))
        omero_shape.setStrokeColor(rint(rgba_to_omero_int(item.stroke)))
        omero_shape.setFillColor(rint(rgba_to_omero_int(item.fill)))
        omero_shape.setStrokeWidth(LengthI(2, UnitsLength.PIXEL))
        omero_shape.setTheZ(rint(z))
        omero_shape.setTheT(rint(t))
        roi.addShape(omero_shape)
    return roi


def roi_to_geometry(roi: Any) -> BaseGeometry:
    """An OMERO ROI's area as one shapely geometry (level-0 px), for restricting an analysis.

    Rectangles, ellipses and polygons count; points, lines and labels have no area and are
    skipped. Shapes sharing a QuPath uuid are joined as QuPath joins them (rings XOR-ed, so a
    hole written as its own polygon stays a hole); the objects are then united.
    """
    groups: dict[str, BaseGeometry] = {}
    for n, item in enumerate(roi.copyShapes()):
        kind = type(item).__name__.removesuffix("I")
        if kind == "Rectangle":
            x, y = unwrap(item.getX()), unwrap(item.getY())
            geom: BaseGeometry = box(x, y, x + unwrap(item.getWidth()),
                                     y + unwrap(item.getHeight()))
        elif kind == "Ellipse":
            cx, cy = unwrap(item.getX()), unwrap(item.getY())
            rx, ry = unwrap(item.getRadiusX()), unwrap(item.getRadiusY())
            geom = affinity.scale(shapely.Point(cx, cy).buffer(1.0, 64), rx, ry)
        elif kind == "Polygon":
            points = parse_points(unwrap(item.getPoints()) or "")
            if len(points) < 3:
                continue
            geom = shapely.make_valid(Polygon(points))
        else:
            continue
        fields = parse_shape_text(unwrap(item.getTextValue()))
        key = fields.uuid if fields is not None else f"shape-{n}"
        groups[key] = groups[key].symmetric_difference(geom) if key in groups else geom
    return shapely.union_all(list(groups.values())) if groups else Polygon()


def _user_area(conn: Any, image_id: int) -> BaseGeometry | None:
    """The union of an image's own ROIs (ours excluded), level-0 px; None without any area."""
    rois = [roi for roi in conn.getRoiService().findByImage(image_id, None).rois
            if not is_ours(unwrap(roi.getDescription()))]
    area = shapely.union_all([roi_to_geometry(roi) for roi in rois]) if rois else Polygon()
    return None if area.is_empty or area.area <= 0 else area


def _area_digest(area: BaseGeometry) -> str:
    return hashlib.sha256(shapely.normalize(area).wkb).hexdigest()


def regions_digest(conn: Any, image_id: int) -> str | None:
    """SHA-256 of the image's own ROI area (normalised WKB); None when no ROI has an area.

    Part of an OMERO job's key when the analysis is restricted to the ROIs: editing them
    makes another job, and a worker can tell that they changed after submission.
    """
    area = _user_area(conn, image_id)
    return None if area is None else _area_digest(area)


def image_regions(conn: Any, image_id: int, path: Path) -> tuple[Path, str] | None:
    """The area of an image's own ROIs (not ours) as a regions GeoJSON at ``path``.

    Returns the file and the area's :func:`regions_digest`, or None when no ROI has an area.
    The file is what ``hwsi analyze --regions`` reads, so an OMERO restriction goes through the
    same ``restrict_to`` as a QuPath one.
    """
    from qupath_bridge.geojson import write_regions

    area = _user_area(conn, image_id)
    if area is None:
        return None
    write_regions(area, path)
    return path, _area_digest(area)
