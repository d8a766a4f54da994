"""The rasteriser behind :mod:`omero_hwsi.synthetic.pathology`: layouts, stain maps, colour.

Why a whole-picture painter instead of :class:`~omero_hwsi.synthetic.svs.SyntheticTissue`'s
per-pixel fields: ground truth must be *the* polygons that were drawn, nuclei must be laid
out per region (class by class) without overlapping, and a demo renders ~60 slides on two
cores. So nuclei are placed as polygons first (vectorised numpy), then drawn with OpenCV's
anti-aliased polygon fill into stain concentration maps, and colour comes from Beer-Lambert
with the Ruifrok-Johnston stain vectors that our segmenter and patch descriptor unmix with.
Synthetic pathology slides hold a few regions, so the whole level 0 fits in memory.

Coordinates are level-0 pixels with pixel *edges* at integers (pixel ``(r, c)`` covers
``[c, c + 1] x [r, r + 1]``), as in :mod:`omero_hwsi.slide.nuclei`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt
import shapely
from scipy import ndimage
from shapely.geometry import LineString, Point, Polygon, box
from shapely.geometry.base import BaseGeometry

from omero_hwsi.synthetic.classes import NucleusLook, TissueClass
from omero_hwsi.synthetic.svs import _Waves

__all__: list[str] = []

# Unit optical-density vectors (base 10) of haematoxylin and eosin, RGB order: the same
# Ruifrok-Johnston vectors the segmenter and the hed_texture descriptor unmix with.
_H_VEC = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
_E_VEC = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])
_GLASS_OD = 0.018
"""Achromatic OD of glass and mountant: bare glass renders at about 243 grey."""

_H_SCALE = 1.6
"""Haematoxylin OD of level 255 in the nucleus canvas."""
_H_STEP = 4
"""Nuclei are drawn in haematoxylin levels quantised to this many canvas units."""
_VERTICES = 12
"""Vertices per nucleus outline: smooth at 0.25 um/px, small in GeoJSON."""
_SHIFT = 4
"""Sub-pixel bits of OpenCV's polygon fill."""
_TABLE = (251, 257)
"""Prime sides of the noise tables: their repeat never lines up with patches."""

_FOLD_GAIN = 0.8
"""A fold doubles the section: concentrations there are multiplied by 1 + this."""
_BUBBLE_GAIN = -0.2
_PEN_RGB = {"green": (34, 139, 84), "blue": (40, 62, 168)}
_RIM_RGB = (96, 96, 100)

_GLAND_PITCH_UM = 70.0
_GLAND_RADIUS_UM = (19.0, 25.0)
_GLAND_WALL_UM = 8.5


Float32 = npt.NDArray[np.float32]
Float64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Nuclei:
    """Nuclei placed in one region: outlines and what they were drawn with."""

    polygons: Float64  # (N, V, 2) level-0 px
    centroids: Float64  # (N, 2)
    semi_axes_um: Float64  # (N, 2)
    haematoxylin: Float64  # (N,)


def empty_nuclei() -> Nuclei:
    """No nuclei, with correctly shaped arrays."""
    return Nuclei(
        np.zeros((0, _VERTICES, 2)), np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0)
    )


def concat_nuclei(parts: Sequence[Nuclei]) -> Nuclei:
    """All nuclei of several regions, in the given order."""
    if not parts:
        return empty_nuclei()
    return Nuclei(
        np.concatenate([p.polygons for p in parts]),
        np.concatenate([p.centroids for p in parts]),
        np.concatenate([p.semi_axes_um for p in parts]),
        np.concatenate([p.haematoxylin for p in parts]),
    )


# --------------------------------------------------------------------------------------------
# Tissue outline and artefact shapes
# --------------------------------------------------------------------------------------------
def tissue_outline(
    rng: np.random.Generator, width: int, height: int, margins: tuple[float, float, float, float]
) -> Polygon:
    """One tissue section: the slide inset by ``(left, top, right, bottom)`` px, edges wavy.

    The outline is a rounded rectangle whose boundary is pushed in and out along its normal
    by a smooth periodic wobble smaller than half the narrowest margin, so the section never
    reaches the slide border and the glass around it is always visible.
    """
    left, top, right, bottom = margins
    amp = 0.45 * min(margins)
    core = box(left + amp, top + amp, width - right - amp, height - bottom - amp)
    rounded = core.buffer(2.0 * amp, join_style="round", quad_segs=8)
    ring = shapely.segmentize(rounded.exterior, max(4.0, amp / 3.0))
    pts = np.asarray(ring.coords)[:-1]
    n = len(pts)
    tangent = np.roll(pts, -1, axis=0) - np.roll(pts, 1, axis=0)
    normal = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9)
    t = np.arange(n) / n * 2.0 * math.pi
    wobble = np.zeros(n)
    for freq in (3, 5, 8, 13):
        wobble += rng.uniform(0.5, 1.0) * np.cos(freq * t + rng.uniform(0.0, 2.0 * math.pi))
    wobble *= amp / max(float(np.abs(wobble).max()), 1e-9)
    outline = Polygon(pts + normal * wobble[:, None])
    if not outline.is_valid:
        outline = Polygon(pts)
    # Half a pixel of simplification: the drawn outline (and the truth) stays the same to the
    # eye, with a fraction of the vertices in every GeoJSON that carries it.
    simple = outline.simplify(0.5, preserve_topology=True)
    return simple if isinstance(simple, Polygon) and simple.is_valid else outline


def fold_band(
    rng: np.random.Generator, region: Polygon, tissue: BaseGeometry, px_um: float
) -> BaseGeometry:
    """A tissue fold: a straight band 25-45 um wide crossing the region, on tissue only."""
    x0, y0, x1, y1 = region.bounds
    cx, cy = rng.uniform(x0 + 0.3 * (x1 - x0), x1 - 0.3 * (x1 - x0)), rng.uniform(
        y0 + 0.3 * (y1 - y0), y1 - 0.3 * (y1 - y0)
    )
    angle = rng.uniform(0.0, math.pi)
    reach = 2.0 * max(x1 - x0, y1 - y0)
    dx, dy = math.cos(angle) * reach, math.sin(angle) * reach
    line = LineString([(cx - dx, cy - dy), (cx + dx, cy + dy)])
    band = line.buffer(rng.uniform(12.5, 22.5) * px_um, cap_style="flat")
    return band.intersection(region).intersection(tissue)


def bubble_disc(rng: np.random.Generator, region: Polygon) -> Polygon:
    """An air bubble: a disc of 15-25 % of the region side, inside the region."""
    x0, y0, x1, y1 = region.bounds
    side = x1 - x0
    radius = rng.uniform(0.15, 0.25) * side
    cx = rng.uniform(x0 + radius + 0.05 * side, x1 - radius - 0.05 * side)
    cy = rng.uniform(y0 + radius + 0.05 * side, y1 - radius - 0.05 * side)
    disc: Polygon = Point(cx, cy).buffer(radius, quad_segs=16)
    return disc


def pen_stroke(
    rng: np.random.Generator,
    width: int,
    height: int,
    side: int,
    margin: float,
    tissue: BaseGeometry,
) -> BaseGeometry:
    """An ink stroke on the glass along slide side ``side`` (0 left, 1 top, 2 right, 3 bottom).

    It runs in the middle of that side's margin, a quarter of the margin thick, and is cut
    away from the tissue so that it lies on background only.
    """
    length = width if side in (1, 3) else height
    start = rng.uniform(0.1, 0.3) * length
    stop = start + rng.uniform(0.4, 0.6) * length
    s = np.linspace(start, stop, 24)
    offset = margin * (0.5 + 0.08 * np.sin(np.linspace(0.0, math.pi, 24) * rng.uniform(1, 2)))
    if side == 0:
        pts = np.stack([offset, s], axis=1)
    elif side == 1:
        pts = np.stack([s, offset], axis=1)
    elif side == 2:
        pts = np.stack([width - offset, s], axis=1)
    else:
        pts = np.stack([s, height - offset], axis=1)
    stroke = LineString(pts).buffer(margin / 8.0, quad_segs=4)
    return stroke.difference(tissue)


# --------------------------------------------------------------------------------------------
# Nuclei layout
# --------------------------------------------------------------------------------------------
def _extent(look: NucleusLook, angle_jitter: float) -> tuple[float, float]:
    """Largest half-extent (um) of a nucleus along and across the main direction."""
    a = look.semi_major_um * (1.0 + look.size_jitter) * (1.0 + look.irregularity)
    b = a * look.aspect[1]
    phi = min(abs(angle_jitter), math.pi / 2.0)
    along = math.sqrt((a * math.cos(phi)) ** 2 + (b * math.sin(phi)) ** 2)
    across = math.sqrt((a * math.sin(phi)) ** 2 + (b * math.cos(phi)) ** 2)
    if phi >= math.pi / 4.0:  # any direction reachable
        along = across = a
    return along, across


def _outlines(
    rng: np.random.Generator,
    look: NucleusLook,
    centres: Float64,
    theta: float,
    px_um: float,
) -> Nuclei:
    """Draw the shape parameters of nuclei at ``centres`` and build their outlines."""
    n = len(centres)
    size = 1.0 + rng.uniform(-look.size_jitter, look.size_jitter, n)
    a = look.semi_major_um * size
    b = a * rng.uniform(look.aspect[0], look.aspect[1], n)
    jitter = math.radians(look.angle_jitter_deg)
    angle = theta + rng.uniform(-jitter, jitter, n)
    haem = look.haematoxylin * (
        1.0 + rng.uniform(-look.haematoxylin_jitter, look.haematoxylin_jitter, n)
    )
    phases = rng.uniform(0.0, 2.0 * math.pi, (n, 2))
    weights = rng.uniform(-1.0, 1.0, (n, 2))
    phi = np.arange(_VERTICES) * (2.0 * math.pi / _VERTICES)
    wobble = 1.0 + look.irregularity * 0.5 * (
        weights[:, :1] * np.cos(2.0 * phi[None, :] + phases[:, :1])
        + weights[:, 1:] * np.cos(3.0 * phi[None, :] + phases[:, 1:])
    )
    u = (a * px_um)[:, None] * np.cos(phi)[None, :] * wobble
    v = (b * px_um)[:, None] * np.sin(phi)[None, :] * wobble
    cos_t, sin_t = np.cos(angle)[:, None], np.sin(angle)[:, None]
    xs = centres[:, :1] + u * cos_t - v * sin_t
    ys = centres[:, 1:] + u * sin_t + v * cos_t
    polygons = np.stack([xs, ys], axis=2)
    return Nuclei(polygons, centres.copy(), np.stack([a, b], axis=1), haem)


def _inside(points: Float64, area: BaseGeometry) -> npt.NDArray[np.bool_]:
    if area.is_empty or len(points) == 0:
        return np.zeros(len(points), dtype=bool)
    return np.asarray(shapely.contains_xy(area, points[:, 0], points[:, 1]), dtype=bool)


def lattice_nuclei(
    rng: np.random.Generator,
    look: NucleusLook,
    region: Polygon,
    tissue: BaseGeometry,
    theta: float,
    px_um: float,
) -> Nuclei:
    """Nuclei on a jittered, staggered lattice turned by ``theta``, clear of each other.

    Jitter is bounded so that neighbours never overlap: within a row the along-extent fits
    the along-pitch, between rows the across-extent fits the across-pitch. Nuclei are kept
    only when their whole extent lies inside the region and on tissue, so each nucleus
    belongs to exactly one region.
    """
    pu, pv = (p * px_um for p in look.pitch_um)
    ext_u, ext_v = (e * px_um for e in _extent(look, math.radians(look.angle_jitter_deg)))
    ju = max(0.0, (pu - 2.0 * ext_u) / 2.0) * 0.9
    jv = max(0.0, (pv - 2.0 * ext_v) / 2.0) * 0.9
    x0, y0, x1, y1 = region.bounds
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    reach = math.hypot(x1 - x0, y1 - y0) / 2.0
    nu, nv = int(math.ceil(reach / pu)) + 1, int(math.ceil(reach / pv)) + 1
    jj, ii = np.meshgrid(np.arange(-nv, nv + 1), np.arange(-nu, nu + 1), indexing="ij")
    along = ii * pu + (jj % 2) * (pu / 2.0) + rng.uniform(-ju, ju, ii.shape)
    across = jj * pv + rng.uniform(-jv, jv, ii.shape)
    occupied = rng.random(ii.shape) < look.occupancy
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    xs = cx + along * cos_t - across * sin_t
    ys = cy + along * sin_t + across * cos_t
    centres = np.stack([xs[occupied], ys[occupied]], axis=1)
    reach_px = max(ext_u, ext_v) + 1.0
    safe = region.buffer(-reach_px).intersection(tissue.buffer(-reach_px))
    centres = centres[_inside(centres, safe)]
    return _outlines(rng, look, centres, theta, px_um)


def gland_nuclei(
    rng: np.random.Generator,
    look: NucleusLook,
    region: Polygon,
    tissue: BaseGeometry,
    px_um: float,
) -> tuple[Nuclei, list[Polygon]]:
    """Glands: white lumina, each ringed by one layer of nuclei; returns nuclei and lumina."""
    pitch = _GLAND_PITCH_UM * px_um
    x0, y0, x1, y1 = region.bounds
    nx, ny = int((x1 - x0) // pitch) + 2, int((y1 - y0) // pitch) + 2
    jj, ii = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    gx = x0 + (ii + 0.5 * (jj % 2)) * pitch + rng.uniform(-6.0, 6.0, ii.shape) * px_um
    gy = y0 + (jj + 0.5) * pitch * 0.9 + rng.uniform(-6.0, 6.0, ii.shape) * px_um
    radius = rng.uniform(*_GLAND_RADIUS_UM, ii.shape) * px_um
    centres = np.stack([gx.ravel(), gy.ravel()], axis=1)
    radius = radius.ravel()
    margin = (_GLAND_RADIUS_UM[1] + 1.0) * px_um
    safe = region.buffer(-margin).intersection(tissue.buffer(-margin))
    keep = _inside(centres, safe)
    centres, radius = centres[keep], radius[keep]

    ring_pitch = look.pitch_um[0] * px_um
    inset = (look.semi_major_um * (1.0 + look.size_jitter) + 0.8) * px_um
    points: list[Float64] = []
    lumina: list[Polygon] = []
    for (gx_, gy_), r in zip(centres, radius):
        ring_r = r - inset
        count = int(2.0 * math.pi * ring_r // ring_pitch)
        start = rng.uniform(0.0, 2.0 * math.pi)
        phi = start + np.arange(count) * (2.0 * math.pi / max(count, 1))
        occupied = rng.random(count) < look.occupancy
        phi = phi[occupied]
        points.append(np.stack([gx_ + ring_r * np.cos(phi), gy_ + ring_r * np.sin(phi)], axis=1))
        lumina.append(Point(gx_, gy_).buffer(r - _GLAND_WALL_UM * px_um, quad_segs=8))
    pts = np.concatenate(points) if points else np.zeros((0, 2))
    return _outlines(rng, look, pts, 0.0, px_um), lumina


def debris_polygons(
    rng: np.random.Generator, per_1000um2: float, region: Polygon, tissue: BaseGeometry,
    px_um: float,
) -> Float64:
    """Small dark nuclear fragments (hexagons of 0.6-1.3 um radius), Poisson in the region."""
    area_um2 = region.intersection(tissue).area / (px_um * px_um)
    count = int(rng.poisson(per_1000um2 * area_um2 / 1000.0))
    x0, y0, x1, y1 = region.bounds
    centres = np.stack([rng.uniform(x0, x1, count), rng.uniform(y0, y1, count)], axis=1)
    radius = rng.uniform(0.5, 1.1, count) * px_um
    keep = _inside(centres, tissue.buffer(-2.0 * px_um))
    centres, radius = centres[keep], radius[keep]
    phi = np.arange(6) * (math.pi / 3.0)
    xs = centres[:, :1] + radius[:, None] * np.cos(phi)[None, :]
    ys = centres[:, 1:] + radius[:, None] * np.sin(phi)[None, :]
    return np.stack([xs, ys], axis=2)


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------
def _cv_points(ring: Float64) -> npt.NDArray[np.int32]:
    """Pixel-edge coordinates -> OpenCV's fixed-point pixel-centre coordinates."""
    return np.round((np.asarray(ring, dtype=np.float64)[:, :2] - 0.5) * (1 << _SHIFT)).astype(
        np.int32
    )


def fill_rings(
    canvas: npt.NDArray[np.uint8], rings: Sequence[Float64] | Float64, value: int
) -> None:
    """Fill polygons (anti-aliased, even-odd between the rings given together) in place.

    ``rings`` is a list of ``(n, 2)`` rings, or one ``(N, V, 2)`` array of equal-size rings
    (converted in one step, which matters for thousands of nuclei).
    """
    if len(rings) == 0:
        return
    if isinstance(rings, np.ndarray):
        points = list(_cv_points(rings.reshape(-1, 2)).reshape(rings.shape))
    else:
        points = [_cv_points(r) for r in rings]
    cv2.fillPoly(canvas, points, int(value), lineType=cv2.LINE_AA, shift=_SHIFT)


def geometry_rings(geometry: BaseGeometry) -> list[Float64]:
    """Exterior and interior rings of every polygon in ``geometry`` (for even-odd filling)."""
    rings: list[Float64] = []
    for part in getattr(geometry, "geoms", [geometry]):
        if isinstance(part, Polygon) and not part.is_empty:
            rings.append(np.asarray(part.exterior.coords)[:-1])
            rings.extend(np.asarray(r.coords)[:-1] for r in part.interiors)
    return rings


def mask_of(shape: tuple[int, int], geometry: BaseGeometry) -> npt.NDArray[np.uint8]:
    """Anti-aliased coverage (0-255) of ``geometry``."""
    canvas = np.zeros(shape, dtype=np.uint8)
    fill_rings(canvas, geometry_rings(geometry), 255)
    return canvas


def noise_table(rng: np.random.Generator, shape: tuple[int, int], blur_px: float) -> Float32:
    """A tiled unit-variance noise field of ``shape``, smoothed by ``blur_px``."""
    table = rng.standard_normal(_TABLE).astype(np.float32)
    if blur_px > 0.3:
        # Wrapped, so the tiled table has no seams.
        table = ndimage.gaussian_filter(table, blur_px, mode="wrap").astype(np.float32)
        table /= max(float(table.std()), 1e-6)
    return _tiled(table, shape)


def _tiled(table: Float32, shape: tuple[int, int]) -> Float32:
    """``table`` repeated to cover ``shape``."""
    reps = (-(-shape[0] // table.shape[0]), -(-shape[1] // table.shape[1]))
    return np.ascontiguousarray(np.tile(table, reps)[: shape[0], : shape[1]])


@dataclass(frozen=True, slots=True)
class RegionPaint:
    """What one region contributes to the stain maps."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in level-0 px
    tissue_class: TissueClass
    fibres: _Waves | None  # eosin fibre texture along the region's direction


def paint_stains(
    shape: tuple[int, int],
    regions: Sequence[RegionPaint],
    nuclei: Nuclei,
    debris: Float64,
    tissue: BaseGeometry,
    lumina: Sequence[Polygon],
    folds: Sequence[BaseGeometry],
    bubbles: Sequence[Polygon],
    rng: np.random.Generator,
    px_um: float,
    slow: _Waves,
) -> tuple[Float32, Float32]:
    """Haematoxylin and eosin concentration maps (OD, base 10) of the whole slide."""
    height, width = shape
    h = np.zeros(shape, dtype=np.float32)
    e = np.zeros(shape, dtype=np.float32)
    grain = noise_table(rng, shape, 0.6 * px_um)
    chroma = np.zeros(shape, dtype=np.float32)
    for paint in regions:
        x0, y0, x1, y1 = paint.box
        tc = paint.tissue_class
        xs = np.arange(x0, x1) + 0.5
        ys = np.arange(y0, y1) + 0.5
        ev = np.full((y1 - y0, x1 - x0), tc.eosin, dtype=np.float32)
        if paint.fibres is not None:
            ev *= np.float32(1.0) + paint.fibres.grid(xs, ys)
        e[y0:y1, x0:x1] = ev
        h[y0:y1, x0:x1] = tc.haem_background
        if tc.nuclei is not None:
            chroma[y0:y1, x0:x1] = tc.nuclei.chromatin
    e *= np.float32(1.0) + slow.grid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    e += np.float32(0.025) * grain
    h += np.float32(0.01) * grain

    # Nuclei: one coverage pass (cytoplasm pushed aside), then haematoxylin level by level.
    alpha = np.zeros(shape, dtype=np.uint8)
    fill_rings(alpha, nuclei.polygons, 255)
    level = np.zeros(shape, dtype=np.uint8)
    q = np.clip(np.round(nuclei.haematoxylin / _H_SCALE * 255.0 / _H_STEP) * _H_STEP, 0, 255)
    for value in np.unique(q):
        fill_rings(level, nuclei.polygons[q == value], int(value))
    if len(debris):
        fill_rings(level, debris, int(round(1.1 / _H_SCALE * 255.0)))
    nuclear = level.astype(np.float32) * np.float32(_H_SCALE / 255.0)
    texture = np.float32(1.0) + chroma * noise_table(rng, shape, 0.35 * px_um)
    np.clip(texture, 0.3, 2.0, out=texture)
    nuclear *= texture
    e *= np.float32(1.0) - np.float32(0.7 / 255.0) * alpha.astype(np.float32)
    h += nuclear

    cover = mask_of(shape, tissue).astype(np.float32) * np.float32(1.0 / 255.0)
    if lumina:
        clear = np.zeros(shape, dtype=np.uint8)
        fill_rings(clear, [np.asarray(p.exterior.coords)[:-1] for p in lumina], 255)
        cover *= np.float32(1.0) - clear.astype(np.float32) * np.float32(1.0 / 255.0)
    for geometry, gain in [(g, _FOLD_GAIN) for g in folds] + [(b, _BUBBLE_GAIN) for b in bubbles]:
        if not geometry.is_empty:
            cover *= np.float32(1.0) + np.float32(gain / 255.0) * mask_of(shape, geometry).astype(
                np.float32
            )
    h *= cover
    e *= cover
    np.maximum(h, 0.0, out=h)
    np.maximum(e, 0.0, out=e)
    return h, e


def colour(
    h: Float32,
    e: Float32,
    rng: np.random.Generator,
    blur_px: float,
    pens: Sequence[tuple[BaseGeometry, str]],
    rims: Sequence[Polygon],
    rim_px: float,
) -> npt.NDArray[np.uint8]:
    """Beer-Lambert colour of the stain maps, with ink, bubble rims, optics blur and noise."""
    shape = h.shape
    ln10 = math.log(10.0)
    table = rng.standard_normal(_TABLE).astype(np.float32)
    channels = []
    for c in range(3):
        # One pass each through OpenCV: OD, transmission, then scale, noise and offset.
        od = cv2.addWeighted(h, -ln10 * _H_VEC[c], e, -ln10 * _E_VEC[c], -ln10 * _GLASS_OD)
        value = cv2.exp(od)
        noise = _tiled(np.roll(table, 37 * c, axis=1), shape)
        value = cv2.addWeighted(value, 256.0, noise, 1.2, -1.0)
        channels.append(value)
    rgb = cv2.merge(channels)
    np.maximum(rgb, 0.0, out=rgb)
    out = cv2.convertScaleAbs(rgb)  # rounds and saturates at 255

    overlays: list[tuple[npt.NDArray[np.uint8], tuple[int, int, int], float]] = []
    for geometry, ink in pens:
        overlays.append((mask_of(shape, geometry), _PEN_RGB[ink], 0.85))
    for disc in rims:
        ring = disc.exterior.buffer(rim_px / 2.0, quad_segs=8)
        overlays.append((mask_of(shape, ring), _RIM_RGB, 0.7))
    for mask, rgb_ink, strength in overlays:
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            continue
        sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        a = mask[sl].astype(np.float32)[..., None] * np.float32(strength / 255.0)
        patch = out[sl].astype(np.float32)
        patch += a * (np.asarray(rgb_ink, dtype=np.float32) - patch)
        out[sl] = (patch + np.float32(0.5)).astype(np.uint8)
    if blur_px > 0.3:
        out = cv2.GaussianBlur(out, (0, 0), blur_px)
    return np.ascontiguousarray(out)
