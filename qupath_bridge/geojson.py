"""Read QuPath GeoJSON into typed objects; refuse malformed or hostile files in one line.

Why: pathologists hand over what they drew or detected in QuPath as GeoJSON (File > Export
objects as GeoJSON, Copy as GeoJSON, scripts), and ``hwsi analyze --regions`` and ``hwsi qupath
regions`` need it as level-0 shapely geometry. QuPath's layout drifted between versions, so
this reader accepts what QuPath's own reader (``PathObjectTypeAdapters``, ``GsonTools``) accepts:

- a FeatureCollection, a bare array of features (QuPath's default export), one Feature, or a
  bare geometry;
- the object type as ``objectType`` (0.4+), ``object_type`` or ``type`` in the properties, or
  as a Java class name in the feature ``id`` (``PathAnnotationObject``, the 0.2 layout);
- measurements as a name -> number map (0.4+) or a list of ``{name, value}`` (before 0.4);
  NaN as the string ``"NaN"`` (our writer) or a bare ``NaN`` token (Gson);
- colours as ``[r, g, b]`` / ``[r, g, b, a]`` or a packed signed ARGB int, as Java writes it;
- classifications as ``{name | names, color}``, a plain string (``"Tumor: Positive"``), or the
  pre-0.4 ``{name, colorRGB, parentClass}``;
- ``plane`` (``{c, z, t}``) inside the geometry object and ``nucleusGeometry`` beside it (cells).

It is stricter than QuPath about geometry, because a wrong area silently changes an analysis:
unknown geometry types, degenerate rings and non-finite coordinates are refused, and
self-intersections are repaired (``shapely.make_valid``, logged) or refused, as the
``invalid_geometry`` option says. Size caps (the file size is checked before reading; features;
vertices) bound the work a hostile file can cause. Pure Python (json, geojson, numpy, shapely):
no paquo, no JVM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, get_args

import geojson.geometry
import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from omero_hwsi.errors import GeoJSONError
from omero_hwsi.results.geojson import feature_id, qupath_feature, write_feature_collection

if TYPE_CHECKING:
    from omero_hwsi.settings import Settings

__all__ = [
    "LEGACY_TYPE_IDS",
    "InvalidGeometryPolicy",
    "QuPathObject",
    "QuPathObjectType",
    "ReadOptions",
    "analysis_regions",
    "parse_objects",
    "read_objects",
    "read_regions",
    "region_features",
    "write_regions",
]

logger = logging.getLogger(__name__)

QuPathObjectType = Literal["annotation", "detection", "cell", "tile", "tmaCore", "root"]
"""Object types as QuPath 0.4+ writes them in ``objectType``."""

InvalidGeometryPolicy = Literal["repair", "refuse"]
"""What to do with a self-intersecting polygon: repair it (logged) or refuse the file."""

RGB = tuple[int, int, int]

LEGACY_TYPE_IDS: dict[str, QuPathObjectType] = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "TMACoreObject": "tmaCore",
    "PathRootObject": "root",
}
"""QuPath 0.2 wrote the Java class name as the feature ``id``; it names the object type."""

_TYPE_NAMES: dict[str, QuPathObjectType] = {
    **{name: name for name in get_args(QuPathObjectType)},
    "tma_core": "tmaCore",
    **LEGACY_TYPE_IDS,
}
_TYPE_KEYS = ("objectType", "object_type", "type")  # QuPath's reader tries them in this order
_SPECIAL_NUMBERS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_DEFAULT_PLANE = {"c": -1, "z": 0, "t": 0}
_AREA_TYPES = (Polygon, MultiPolygon)
_AREA_TYPE_IDS = (shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON)


@dataclass(frozen=True, slots=True, kw_only=True)
class QuPathObject:
    """One QuPath object (annotation, detection, cell, tile, ...) read from GeoJSON.

    Attributes:
        id: the feature's UUID (QuPath 0.4+), or None (0.2 files, hand-made files).
        object_type: QuPath's object type; files without one are annotations, as in QuPath.
        name: the object's name.
        classification: class names, base first (``("Tumor", "Positive")`` = "Tumor: Positive").
        class_color: the classification's colour.
        color: the object's own colour, when set.
        geometry: the ROI in level-0 pixels (origin top-left), valid when polygonal.
        nucleus_geometry: a cell's nucleus, in the same coordinates.
        measurements: name -> value; NaN kept (QuPath writes missing values as NaN).
        metadata: QuPath's string metadata map.
        plane: ``{"c", "z", "t"}`` when the ROI is not on the default plane, else None.
        locked: QuPath's ``isLocked``.
        properties: every other property, as read (e.g. our ``hid``, ``box``).
    """

    id: str | None = None
    object_type: QuPathObjectType = "annotation"
    name: str | None = None
    classification: tuple[str, ...] = ()
    class_color: RGB | None = None
    color: RGB | None = None
    geometry: BaseGeometry
    nucleus_geometry: BaseGeometry | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    plane: dict[str, int] | None = None
    locked: bool = False
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def class_name(self) -> str | None:
        """The classification as QuPath displays it (``"Tumor: Positive"``), or None."""
        return ": ".join(self.classification) or None


@dataclass(frozen=True, slots=True)
class ReadOptions:
    """How strictly to read: the geometry policy and the caps against hostile files.

    Attributes:
        invalid_geometry: ``repair`` self-intersecting polygons (logged) or ``refuse`` them.
        max_file_mb: largest file read, in MB (10^6 bytes); checked before reading.
        max_features: most features in one file.
        max_vertices: most positions in one file, all geometries together.
    """

    invalid_geometry: InvalidGeometryPolicy = "repair"
    max_file_mb: float = 200.0
    max_features: int = 1_000_000
    max_vertices: int = 10_000_000

    def __post_init__(self) -> None:
        if self.invalid_geometry not in get_args(InvalidGeometryPolicy):
            raise ValueError(f"invalid_geometry must be repair or refuse, got {self.invalid_geometry!r}")
        if not (self.max_file_mb > 0 and self.max_features >= 1 and self.max_vertices >= 1):
            raise ValueError(f"read limits must be positive, got {self!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> ReadOptions:
        """The options set by ``HWSI_QUPATH_*`` (see docs/configuration.md)."""
        return cls(invalid_geometry=settings.qupath_invalid_geometry,
                   max_file_mb=settings.qupath_max_file_mb,
                   max_features=settings.qupath_max_features,
                   max_vertices=settings.qupath_max_vertices)


@dataclass(slots=True)
class _Context:
    """Where errors point to, and the vertex budget spent so far."""

    source: str
    options: ReadOptions
    vertices: int = 0

    def fail(self, where: str, problem: str) -> NoReturn:
        raise GeoJSONError(f"{self.source}: {where}: {problem}")

    def spend(self, count: int) -> None:
        self.vertices += count
        if self.vertices > self.options.max_vertices:
            raise GeoJSONError(
                f"{self.source}: more than {self.options.max_vertices} vertices; raise "
                "HWSI_QUPATH_MAX_VERTICES if the file is trusted")


# -- files and documents --------------------------------------------------------------------


def read_objects(
    path: str | os.PathLike[str], *, options: ReadOptions | None = None
) -> list[QuPathObject]:
    """Every object in a QuPath GeoJSON file, in file order.

    Raises:
        GeoJSONError: the file is missing, too large, not UTF-8 JSON, not GeoJSON, or holds a
            malformed object or geometry (the message names the file and the feature index).
    """
    options = options or ReadOptions()
    file = Path(path)
    objects = parse_objects(_read_text(file, options), source=str(file), options=options)
    logger.info("%s: %d QuPath object(s)", file, len(objects))
    return objects


def parse_objects(
    text: str, *, source: str = "<text>", options: ReadOptions | None = None
) -> list[QuPathObject]:
    """The objects in a QuPath GeoJSON text; ``source`` names it in error messages.

    Raises:
        GeoJSONError: as :func:`read_objects`, except for the file checks.
    """
    ctx = _Context(source, options or ReadOptions())
    items = _feature_items(_load_json(text, source), source)
    if len(items) > ctx.options.max_features:
        raise GeoJSONError(f"{source}: {len(items)} features, more than the limit of "
                           f"{ctx.options.max_features}; raise HWSI_QUPATH_MAX_FEATURES if the "
                           "file is trusted")
    objects = [_object(ctx, item, index) for index, item in enumerate(items)]
    return _with_valid_areas(ctx, objects)


def _read_text(file: Path, options: ReadOptions) -> str:
    """The file's text, refusing before reading anything larger than the cap."""
    limit = int(options.max_file_mb * 1_000_000)
    try:
        if file.is_dir():
            raise GeoJSONError(f"{file}: is a folder, not a GeoJSON file")
        size = file.stat().st_size
        if size > limit:
            raise GeoJSONError(f"{file}: {size / 1e6:.3g} MB, over the {options.max_file_mb:g} MB "
                               "limit for GeoJSON files; raise HWSI_QUPATH_MAX_FILE_MB if the "
                               "file is trusted")
        with file.open("rb") as handle:
            data = handle.read(limit + 1)  # the file may have grown since stat()
    except FileNotFoundError as err:
        raise GeoJSONError(f"{file}: GeoJSON file not found") from err
    except OSError as err:
        raise GeoJSONError(f"{file}: cannot read the file ({err.strerror or err})") from err
    if len(data) > limit:
        raise GeoJSONError(f"{file}: over the {options.max_file_mb:g} MB limit for GeoJSON files")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise GeoJSONError(f"{file}: not a readable JSON file (not UTF-8 at byte {err.start})") from err


def _load_json(text: str, source: str) -> Any:
    """Parsed JSON; bare NaN and Infinity tokens (Gson's) are accepted."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise GeoJSONError(f"{source}: not a readable JSON file ({err})") from err
    except RecursionError as err:
        raise GeoJSONError(f"{source}: not a readable JSON file (nested too deeply)") from err


def _feature_items(doc: Any, source: str) -> list[Any]:
    """The feature-like items of a document: FeatureCollection, array, Feature or geometry."""
    if isinstance(doc, list):
        return doc
    kind = doc.get("type") if isinstance(doc, dict) else None
    kind = kind if isinstance(kind, str) else None
    if kind == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise GeoJSONError(f"{source}: FeatureCollection without a 'features' array")
        return features
    if kind is not None and _is_geometry_or_feature(kind):
        return [doc]
    if kind is not None:
        raise GeoJSONError(f"{source}: unknown GeoJSON type {kind!r}")
    raise GeoJSONError(f"{source}: expected a GeoJSON object with a 'type' (FeatureCollection, "
                       f"Feature or geometry) or an array of features, got {_json_kind(doc)}")


def _is_geometry_or_feature(kind: str) -> bool:
    return kind == "Feature" or kind == "GeometryCollection" or kind in _BUILDERS


def _json_kind(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


# -- one feature ----------------------------------------------------------------------------


def _object(ctx: _Context, item: Any, index: int) -> QuPathObject:
    """One feature (or bare geometry) as a :class:`QuPathObject`."""
    where = f"feature {index}"
    if not isinstance(item, dict):
        ctx.fail(where, f"expected a Feature object, got {_json_kind(item)}")
    kind = item.get("type")
    if isinstance(kind, str) and kind != "Feature" and _is_geometry_or_feature(kind):
        item = {"type": "Feature", "geometry": item}
    elif kind != "Feature":
        ctx.fail(where, f"expected a Feature, got type {kind!r}")
    props = item.get("properties")
    if props is None:
        props = {}
    elif not isinstance(props, dict):
        ctx.fail(where, f"'properties' must be an object, got {_json_kind(props)}")
    fid, legacy_type = _feature_id(ctx, where, item.get("id"))
    raw_geometry = item.get("geometry")
    if raw_geometry is None:
        ctx.fail(where, "no geometry (a QuPath object needs one)")
    raw_nucleus = item.get("nucleusGeometry")
    object_type, type_key = _object_type(ctx, where, props, legacy_type)
    names, class_color = _classification(ctx, where, props.get("classification"))
    consumed = {type_key, "name", "color", "classification", "isLocked", "measurements", "metadata"}
    return QuPathObject(
        id=fid,
        object_type=object_type,
        name=_name(ctx, where, props.get("name")),
        classification=names,
        class_color=class_color,
        color=_color(ctx, where, "color", props.get("color")),
        geometry=_geometry(ctx, where, raw_geometry, validate=False),
        nucleus_geometry=(None if raw_nucleus is None else
                          _geometry(ctx, f"{where} nucleusGeometry", raw_nucleus, validate=False)),
        measurements=_measurements(ctx, where, props.get("measurements")),
        metadata=_metadata(ctx, where, props.get("metadata")),
        plane=_plane(ctx, where, raw_geometry),
        locked=_flag(ctx, where, "isLocked", props.get("isLocked", False)),
        properties={k: v for k, v in props.items() if k not in consumed},
    )


def _feature_id(ctx: _Context, where: str, raw: Any) -> tuple[str | None, QuPathObjectType | None]:
    """(UUID or other id, object type named by a 0.2 class-name id)."""
    if raw is None:
        return None, None
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        ctx.fail(where, f"'id' must be a string or a number, got {_json_kind(raw)}")
    text = str(raw)
    legacy = LEGACY_TYPE_IDS.get(text)
    return (None, legacy) if legacy is not None else (text, None)


def _object_type(
    ctx: _Context, where: str, props: dict[str, Any], legacy: QuPathObjectType | None
) -> tuple[QuPathObjectType, str | None]:
    """(object type, the property key it came from); QuPath's defaults and aliases."""
    for key in _TYPE_KEYS:
        if key not in props:
            continue
        value = props[key]
        if not isinstance(value, str):
            ctx.fail(where, f"'{key}' must be a string, got {_json_kind(value)}")
        known = _TYPE_NAMES.get(value)
        if known is None:
            logger.warning("%s: %s: unknown object type %r read as an annotation, as QuPath does",
                           ctx.source, where, value)
            return "annotation", key
        return known, key
    return legacy or "annotation", None


def _name(ctx: _Context, where: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    ctx.fail(where, f"'name' must be a string, got {_json_kind(value)}")


def _flag(ctx: _Context, where: str, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    ctx.fail(where, f"'{key}' must be true or false, got {_json_kind(value)}")


def _color(ctx: _Context, where: str, key: str, value: Any) -> RGB | None:
    """``[r, g, b]``, ``[r, g, b, a]``, ``[packed]`` or a packed (A)RGB int -> (r, g, b)."""
    if value is None or value == []:
        return None
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, int) and not isinstance(value, bool):
        if not -(2**31) <= value < 2**32:
            ctx.fail(where, f"'{key}' {value} is not a packed RGB integer")
        packed = value & 0xFFFFFFFF  # Java ints are signed: opaque colours are negative
        return (packed >> 16) & 0xFF, (packed >> 8) & 0xFF, packed & 0xFF
    if isinstance(value, list) and len(value) in (3, 4) and all(_is_channel(c) for c in value):
        red, green, blue = (int(c) for c in value[:3])
        return red, green, blue
    ctx.fail(where, f"'{key}' must be [r, g, b] with values 0-255 or a packed RGB integer")


def _is_channel(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and float(value).is_integer() and 0 <= value <= 255)


def _classification(ctx: _Context, where: str, value: Any) -> tuple[tuple[str, ...], RGB | None]:
    """(class names base first, class colour) from any of QuPath's classification layouts."""
    if value is None:
        return (), None
    if isinstance(value, str):
        return _split_class(value), None
    if not isinstance(value, dict):
        ctx.fail(where, f"'classification' must be an object or a string, got {_json_kind(value)}")
    if not value:
        return (), None  # QuPath's NULL_CLASS
    if "colorRGB" in value or "parentClass" in value:
        return _legacy_classification(ctx, where, value)
    if "names" in value:
        names = value["names"]
        if not (isinstance(names, list) and names and all(isinstance(n, str) and n.strip()
                                                           for n in names)):
            ctx.fail(where, "classification 'names' must be a non-empty array of strings")
        parts: tuple[str, ...] = tuple(n.strip() for n in names)
    elif isinstance(value.get("name"), str) and value["name"].strip():
        parts = _split_class(value["name"])
    else:
        ctx.fail(where, "classification needs a 'name' or 'names'")
    return parts, _color(ctx, where, "classification color", value.get("color"))


def _legacy_classification(
    ctx: _Context, where: str, value: dict[str, Any]
) -> tuple[tuple[str, ...], RGB | None]:
    """Before 0.4: Gson's default form, ``{name, colorRGB, parentClass: {...}}``."""
    color = _color(ctx, where, "classification colorRGB", value.get("colorRGB"))
    names: list[str] = []
    node: Any = value
    while node is not None:  # a loop, not recursion: the parent chain is input
        if not isinstance(node, dict) or not isinstance(node.get("name"), str):
            ctx.fail(where, "classification 'parentClass' must be an object with a 'name'")
        names[:0] = _split_class(node["name"])
        node = node.get("parentClass")
    return tuple(names), color


def _split_class(text: str) -> tuple[str, ...]:
    """``"Tumor: Positive"`` -> ``("Tumor", "Positive")``, as QuPath's ``PathClass.fromString``."""
    return tuple(part.strip() for part in text.split(":") if part.strip())


def _measurements(ctx: _Context, where: str, value: Any) -> dict[str, float]:
    """A name -> number map (0.4+) or a list of ``{name, value}`` (before 0.4)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list):
        if not all(isinstance(e, dict) and isinstance(e.get("name"), str) and "value" in e
                   for e in value):
            ctx.fail(where, "measurement list entries must be {\"name\": ..., \"value\": ...}")
        pairs = [(e["name"], e["value"]) for e in value]
    else:
        ctx.fail(where, f"'measurements' must be an object or an array, got {_json_kind(value)}")
    return {name: _measurement(ctx, where, name, raw) for name, raw in pairs}


def _measurement(ctx: _Context, where: str, name: str, raw: Any) -> float:
    """A number; ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` and null (missing) allowed."""
    if raw is None:
        return math.nan
    if isinstance(raw, str) and raw in _SPECIAL_NUMBERS:
        return _SPECIAL_NUMBERS[raw]
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        try:
            return float(raw)
        except OverflowError:
            return math.inf if raw > 0 else -math.inf
    shown = json.dumps(raw)[:40]
    ctx.fail(where, f"measurement {name!r} is not a number ({shown})")


def _metadata(ctx: _Context, where: str, value: Any) -> dict[str, str]:
    """QuPath keeps string metadata; numbers and booleans become strings, others are skipped."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        ctx.fail(where, f"'metadata' must be an object, got {_json_kind(value)}")
    out: dict[str, str] = {}
    for key, item in value.items():
        if isinstance(item, bool):
            out[key] = "true" if item else "false"
        elif isinstance(item, str | int | float):
            out[key] = str(item)
    return out


def _plane(ctx: _Context, where: str, geometry: Any) -> dict[str, int] | None:
    """The ROI's ``plane`` (written inside the geometry object, only when not the default)."""
    raw = geometry.get("plane") if isinstance(geometry, dict) else None
    if raw is None:
        return None
    if not isinstance(raw, dict):
        ctx.fail(where, f"'plane' must be an object, got {_json_kind(raw)}")
    plane = dict(_DEFAULT_PLANE)
    for key in plane:
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int):
                ctx.fail(where, f"plane '{key}' must be an integer, got {_json_kind(value)}")
            plane[key] = value
    return plane


# -- geometry -------------------------------------------------------------------------------


def _geometry(ctx: _Context, where: str, obj: Any, *, validate: bool = True) -> BaseGeometry:
    """A GeoJSON geometry as shapely: structure checked, then coordinates, then validity.

    ``validate=False`` leaves the validity of a top-level polygon to :func:`_with_valid_areas`,
    which checks a whole file in one call.
    """
    if not isinstance(obj, dict):
        ctx.fail(where, f"geometry must be an object, got {_json_kind(obj)}")
    kind = obj.get("type")
    if kind == "GeometryCollection":
        parts = obj.get("geometries")
        if not isinstance(parts, list) or not parts:
            ctx.fail(where, "malformed GeometryCollection: 'geometries' must be a non-empty array")
        return shapely.GeometryCollection([_geometry(ctx, where, part) for part in parts])
    if not isinstance(kind, str) or kind not in _BUILDERS:
        ctx.fail(where, "geometry without a 'type'" if kind is None
                 else f"unknown geometry type {kind!r}")
    builder = _BUILDERS[kind]
    coords = obj.get("coordinates")
    problem = _structure_problem(kind, coords)
    if problem is not None:
        ctx.fail(where, f"malformed {kind}: {problem}")
    geometry = builder(ctx, where, kind, coords)
    if validate and isinstance(geometry, _AREA_TYPES) and not geometry.is_valid:
        return _valid_area(ctx, where, kind, geometry)
    return geometry


def _structure_problem(kind: str, coords: Any) -> str | None:
    """Nesting and ring rules of RFC 7946, checked by the geojson package (degenerate first)."""
    if not isinstance(coords, list):
        return "'coordinates' must be an array"
    if not coords:
        return "no coordinates (empty geometry)"
    polygons = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else []
    for rings in polygons:
        for ring in rings if isinstance(rings, list) else []:
            if isinstance(ring, list) and len(ring) < 4:
                return (f"degenerate ring with {len(ring)} position(s) "
                        "(a closed ring needs at least 4)")
    check = _STRUCTURE_CHECKS[kind]
    error = check(coords)
    if isinstance(error, list):
        error = error[0] if error else None
    return None if not error else str(error)[:1].lower() + str(error)[1:]


def _each(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A Multi* check from its single-part check: the first problem of any part."""
    def run(parts: Any) -> Any:
        for part in parts:
            error = check(part)
            if error:
                return error
        return None

    return run


_STRUCTURE_CHECKS: dict[str, Callable[[Any], Any]] = {
    "Point": geojson.geometry.check_point,
    "MultiPoint": _each(geojson.geometry.check_point),
    "LineString": geojson.geometry.check_line_string,
    "MultiLineString": _each(geojson.geometry.check_line_string),
    "Polygon": geojson.geometry.check_polygon,
    "MultiPolygon": _each(geojson.geometry.check_polygon),
}


def _positions(ctx: _Context, where: str, kind: str, seq: list[Any]) -> npt.NDArray[np.float64]:
    """Positions as an ``(n, 2)`` float array (z dropped); finite numbers only."""
    ctx.spend(len(seq))
    try:
        array = np.asarray(seq)
    except (ValueError, TypeError):
        array = np.empty(0, dtype=object)
    if array.dtype.kind not in "iuf" or array.ndim != 2 or array.shape[1] not in (2, 3):
        ctx.fail(where, f"malformed {kind}: positions must be arrays of 2 or 3 numbers")
    xy = array[:, :2].astype(np.float64)
    if not np.isfinite(xy).all():
        first = int(np.argmin(np.isfinite(xy).all(axis=1)))
        ctx.fail(where, f"{kind} has a non-finite coordinate (NaN or infinity) at position {first}")
    return xy


def _ring(ctx: _Context, where: str, kind: str, ring: list[Any]) -> npt.NDArray[np.float64]:
    """A ring's positions; a ring whose positions are all on one line encloses nothing.

    The shoelace sum is two dot products; only a zero-area ring (collinear, or a symmetric
    bow-tie whose lobes cancel) pays for the collinearity test that tells the two apart.
    """
    xy = _positions(ctx, where, kind, ring)
    x, y = xy[:, 0], xy[:, 1]
    twice_area = float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))
    if twice_area == 0 and _collinear(xy):
        ctx.fail(where, f"malformed {kind}: degenerate ring (zero area, its positions are collinear)")
    return xy


def _collinear(xy: npt.NDArray[np.float64]) -> bool:
    """Whether all positions lie on one line (or are one point)."""
    offsets = xy - xy[0]
    moved = np.flatnonzero(np.any(offsets != 0, axis=1))
    if moved.size == 0:
        return True
    dx, dy = offsets[moved[0]]
    return not np.any(dx * offsets[:, 1] - dy * offsets[:, 0] != 0)


def _point(ctx: _Context, where: str, kind: str, coords: Any) -> BaseGeometry:
    return shapely.Point(_positions(ctx, where, kind, [coords])[0])


def _multipoint(ctx: _Context, where: str, kind: str, coords: Any) -> BaseGeometry:
    return shapely.MultiPoint(_positions(ctx, where, kind, coords))


def _linestring(ctx: _Context, where: str, kind: str, coords: Any) -> BaseGeometry:
    return shapely.LineString(_positions(ctx, where, kind, coords))


def _multilinestring(ctx: _Context, where: str, kind: str, coords: Any) -> BaseGeometry:
    return shapely.MultiLineString([_positions(ctx, where, kind, line) for line in coords])


def _polygon(ctx: _Context, where: str, kind: str, rings: Any) -> Polygon:
    if not rings:
        ctx.fail(where, f"malformed {kind}: a polygon without rings")
    shell, *holes = [_ring(ctx, where, kind, ring) for ring in rings]
    return Polygon(shell, holes)


def _multipolygon(ctx: _Context, where: str, kind: str, coords: Any) -> BaseGeometry:
    return MultiPolygon([_polygon(ctx, where, kind, rings) for rings in coords])


_BUILDERS: dict[str, Callable[[_Context, str, str, Any], BaseGeometry]] = {
    "Point": _point,
    "MultiPoint": _multipoint,
    "LineString": _linestring,
    "MultiLineString": _multilinestring,
    "Polygon": _polygon,
    "MultiPolygon": _multipolygon,
}


def _with_valid_areas(ctx: _Context, objects: list[QuPathObject]) -> list[QuPathObject]:
    """The objects with every polygon (ROI and nucleus) valid, checked in one vectorised call.

    Shapely's per-call overhead is larger than the validity test of a cell outline, so a file
    of a million cells is checked as one array; the few invalid polygons are then repaired or
    refused one by one, in file order.
    """
    invalid: list[tuple[int, str]] = []
    for attr in ("geometry", "nucleus_geometry"):
        geometries = np.array([getattr(o, attr) for o in objects], dtype=object)
        polygonal = np.isin(shapely.get_type_id(geometries), _AREA_TYPE_IDS)
        bad = np.flatnonzero(polygonal & ~shapely.is_valid(geometries))
        invalid += [(int(i), attr) for i in bad]
    out = list(objects)
    for index, attr in sorted(invalid):
        geometry = getattr(out[index], attr)
        where = f"feature {index}" + (" nucleusGeometry" if attr == "nucleus_geometry" else "")
        out[index] = replace(out[index], **{attr: _valid_area(ctx, where, geometry.geom_type,
                                                              geometry)})
    return out


def _valid_area(ctx: _Context, where: str, kind: str, geometry: BaseGeometry) -> BaseGeometry:
    """An invalid polygonal geometry repaired (logged) or refused, as the options say."""
    reason = shapely.is_valid_reason(geometry)
    if ctx.options.invalid_geometry == "refuse":
        ctx.fail(where, f"invalid {kind} ({reason}); fix it in QuPath or set "
                        "HWSI_QUPATH_INVALID_GEOMETRY=repair")
    # "structure": overlapping parts are united and holes subtracted, as a person drawing
    # them means (the default "linework" would XOR overlaps away).
    repaired = _polygonal(shapely.make_valid(geometry, method="structure", keep_collapsed=False))
    if repaired.is_empty or repaired.area <= 0:
        ctx.fail(where, f"invalid {kind} ({reason}) with no area left after repair")
    logger.warning("%s: %s: repaired invalid %s (%s)", ctx.source, where, kind, reason)
    return repaired


def _polygonal(geometry: BaseGeometry) -> BaseGeometry:
    """The polygonal parts of a geometry (points and lines of a collection dropped)."""
    if isinstance(geometry, _AREA_TYPES):
        return geometry
    polygons = [p for part in shapely.get_parts(geometry) if isinstance(part, _AREA_TYPES)
                for p in shapely.get_parts(part)]
    if not polygons:
        return Polygon()
    return polygons[0] if len(polygons) == 1 else MultiPolygon(polygons)


# -- analysis regions -----------------------------------------------------------------------


def analysis_regions(
    objects: Iterable[QuPathObject], classes: Iterable[str] | None = None, *, source: str = "input"
) -> BaseGeometry:
    """The union of the annotation areas, optionally of some classes only (level-0 px).

    Only annotations count: detections, cells and tiles are results, not areas a pathologist
    chose. A class in ``classes`` matches an annotation whose full class name ("Tumor:
    Positive") or any of whose class names ("Tumor") equals it. Points and lines select no
    area: they are skipped (logged), and refused when nothing else remains.

    Raises:
        GeoJSONError: no annotation of the classes, or none with an area.
    """
    objects = list(objects)
    wanted = frozenset(classes or ())
    annotations = [o for o in objects if o.object_type == "annotation"]
    selected = [o for o in annotations if not wanted or _matches(o, wanted)]
    if wanted and not selected:
        found = sorted({o.class_name for o in annotations if o.class_name})
        raise GeoJSONError(f"{source}: no annotation of class {', '.join(sorted(wanted))}; "
                           f"annotation classes in the file: {', '.join(found) or 'none'}")
    areas: list[BaseGeometry] = []
    flat: list[str] = []  # geometry types of annotations without an area
    for obj in selected:
        area = _polygonal(obj.geometry)
        if area.is_empty or area.area <= 0:
            flat.append(obj.geometry.geom_type)
        else:
            areas.append(area)
    if not areas:
        if flat:
            raise GeoJSONError(f"{source}: a {flat[0]} selects no area; draw polygons or rectangles")
        others = sorted({o.object_type for o in objects if o.object_type != "annotation"})
        held = f" (it holds {', '.join(others)} objects only)" if others else ""
        raise GeoJSONError(f"{source}: no polygon with an area among the annotations in the "
                           f"file{held}")
    if flat:
        logger.warning("%s: skipped %d point or line annotation(s): they select no area",
                       source, len(flat))
    return _polygonal(shapely.union_all(areas))


def _matches(obj: QuPathObject, wanted: frozenset[str]) -> bool:
    return bool(obj.classification) and (
        obj.class_name in wanted or any(name in wanted for name in obj.classification))


def read_regions(
    path: str | os.PathLike[str],
    classes: Iterable[str] | None = None,
    *,
    options: ReadOptions | None = None,
) -> BaseGeometry:
    """:func:`analysis_regions` of a QuPath GeoJSON file: the areas to analyse, level-0 px.

    Raises:
        GeoJSONError: as :func:`read_objects` and :func:`analysis_regions`.
    """
    return analysis_regions(read_objects(path, options=options), classes, source=str(path))


def region_features(geometry: BaseGeometry, *, name: str = "HWSI region") -> list[dict[str, Any]]:
    """QuPath annotations, one per polygon of ``geometry``, with ids stable across reruns.

    The geometry is normalised first (part order, ring starts), so the same area gives the same
    file however it was built, including when a written file is read back and written again.
    """
    geometry = shapely.normalize(_polygonal(geometry))
    key = hashlib.sha256(shapely.to_wkb(geometry)).hexdigest()
    parts = [p for p in shapely.get_parts(geometry) if not p.is_empty]
    features = [qupath_feature(part, object_type="annotation", name=f"{name} {n}",
                               fid=feature_id("qupath-regions", key, str(n)))
                for n, part in enumerate(parts, start=1)]
    return [f for f in features if f is not None]


def write_regions(geometry: BaseGeometry, path: str | os.PathLike[str]) -> int:
    """Write :func:`region_features` as a FeatureCollection, atomically; returns the count."""
    return write_feature_collection(path, region_features(geometry))
