"""Tissue detection on a low-resolution thumbnail, returned as level-0 shapely geometry.

Why a thumbnail: tissue outlines need ~10 um precision, not cellular detail, and a thumbnail
at 8 um/px of a 2 x 2 cm slide is only 2,500 px wide. Saturation separates stained tissue
from glass for H&E; pen marks (green, blue, black ink) are saturated too, so they are removed
by hue and darkness before the mask is cleaned. Holes (lumina, fat, tears) are kept: a patch
over a hole is not tissue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from omero_hwsi._types import RGBArray
from omero_hwsi.slide.reader import SlideReader, plan_for, read_thumbnail

__all__ = ["TissueMask", "TissueParams", "detect_tissue", "mask_to_geometry", "tissue_mask"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TissueParams:
    """Thresholds of tissue detection, in physical units so they hold at any resolution."""

    thumbnail_mpp: float = 8.0
    min_saturation: int = 20
    """Floor on the saturation threshold (0-255): Otsu on a blank slide would split noise."""
    pen_hue_range: tuple[int, int] = (35, 125)
    """OpenCV hue (0-180) of green-to-blue ink; H&E stains sit at magenta-purple hues."""
    pen_min_saturation: int = 60
    max_dark_value: int = 40
    """Brightness (0-255) under which pixels are ink or debris, not stained tissue."""
    close_um: float = 24.0
    min_component_um2: float = 20_000.0
    min_hole_um2: float = 5_000.0


@dataclass(frozen=True, slots=True)
class TissueMask:
    """The thumbnail-level mask and its level-0 geometry (holes kept)."""

    mask: npt.NDArray[np.bool_]
    level0_per_px: float
    geometry: BaseGeometry
    thumbnail: RGBArray


def tissue_mask(thumbnail: RGBArray, mpp: float, params: TissueParams) -> npt.NDArray[np.bool_]:
    """Boolean tissue mask of an RGB thumbnail whose pixels are ``mpp`` microns wide."""
    hsv = cv2.cvtColor(thumbnail, cv2.COLOR_RGB2HSV)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = max(float(otsu), float(params.min_saturation))
    lo, hi = params.pen_hue_range
    pen = (hue >= lo) & (hue < hi) & (sat >= params.pen_min_saturation)
    dark = val < params.max_dark_value
    mask = (sat > threshold) & ~pen & ~dark

    px_area = mpp * mpp
    radius = max(1, int(round(params.close_um / mpp / 2)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    closed = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel)
    # Pen strokes removed by hue must not be bridged back by closing.
    closed[pen | dark] = 0
    mask = _drop_small(closed.astype(bool), params.min_component_um2 / px_area)
    holes = _drop_small(~mask, params.min_hole_um2 / px_area, keep_border=True)
    return np.asarray(~holes)


def _drop_small(
    mask: npt.NDArray[np.bool_], min_px: float, *, keep_border: bool = False
) -> npt.NDArray[np.bool_]:
    """Remove 8-connected components with fewer than ``min_px`` pixels.

    With ``keep_border`` components touching the picture edge are kept (background around
    the tissue is not a hole).
    """
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(count, dtype=bool)
    h, w = mask.shape
    for label in range(1, count):
        x, y, bw, bh, area = stats[label]
        touches = x == 0 or y == 0 or x + bw == w or y + bh == h
        keep[label] = area >= min_px or (keep_border and touches)
    return np.asarray(keep[labels], dtype=bool)


def mask_to_geometry(mask: npt.NDArray[np.bool_], level0_per_px: float) -> BaseGeometry:
    """Trace a mask into a (Multi)Polygon in level-0 pixels, holes included.

    Pixel ``(r, c)`` covers level-0 ``[c, c+1) x [r, r+1)`` times ``level0_per_px``; contours
    run through pixel centres, so they are shifted by half a pixel.
    """
    if not mask.any():
        return Polygon()
    contours, hierarchy = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    polygons: list[Polygon] = []
    tree = hierarchy[0]

    def ring(i: int) -> npt.NDArray[np.float64] | None:
        pts = contours[i].reshape(-1, 2).astype(np.float64)
        if len(pts) < 3:
            return None
        return (pts + 0.5) * level0_per_px

    for i, (_next, _prev, child, parent) in enumerate(tree):
        if parent != -1:
            continue
        shell = ring(i)
        if shell is None:
            continue
        holes = []
        while child != -1:
            hole = ring(child)
            if hole is not None:
                holes.append(hole)
            child = tree[child][0]
        polygon = shapely.make_valid(Polygon(shell, holes))
        polygons.extend(_polygons_of(polygon))
    geometry = shapely.union_all(polygons) if polygons else Polygon()
    return shapely.simplify(geometry, level0_per_px * 0.5, preserve_topology=True)


def _polygons_of(geometry: BaseGeometry) -> list[Polygon]:
    if isinstance(geometry, Polygon):
        return [] if geometry.is_empty else [geometry]
    if hasattr(geometry, "geoms"):
        return [p for g in geometry.geoms for p in _polygons_of(g)]
    return []


def detect_tissue(reader: SlideReader, params: TissueParams | None = None) -> TissueMask:
    """Find tissue on a slide; the geometry is empty when there is none.

    Raises:
        SlideReadError: the thumbnail cannot be read.
    """
    params = params or TissueParams()
    mpp = max(params.thumbnail_mpp, reader.mpp)
    thumbnail = read_thumbnail(reader, mpp)
    level0_per_px = plan_for(reader, mpp).level0_per_px
    mask = tissue_mask(thumbnail, mpp=level0_per_px * reader.mpp, params=params)
    width, height = reader.dimensions
    geometry = shapely.clip_by_rect(mask_to_geometry(mask, level0_per_px), 0, 0, width, height)
    logger.info(
        "%s: tissue %.3f mm2 in %d part(s)",
        reader.info.name,
        geometry.area * reader.mpp**2 / 1e6,
        len(_polygons_of(geometry)),
    )
    return TissueMask(mask=mask, level0_per_px=level0_per_px, geometry=geometry, thumbnail=thumbnail)
