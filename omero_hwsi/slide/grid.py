"""The region and patch grid: fixed physical sizes, anchored at level-0 (0, 0).

The grid covers the whole slide rectangle, whatever the tissue: region ``i`` is row-major over
that full grid, so ids never depend on tissue detection. Regions and patches crossing the
slide border are kept, padded (white) and masked, not dropped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

__all__ = ["SUBDIVISIONS", "GridSpec", "block_mean", "coverage_raster", "grid_shape"]

SUBDIVISIONS = 8
"""Raster cells per patch side used to measure tissue fractions (1/64 resolution)."""


@dataclass(frozen=True, slots=True)
class GridSpec:
    """Grid parameters; part of every feature store's identity.

    Sizes are pixels at ``target_mpp`` (4096 px at 0.5 um/px is a 2.048 mm region).
    """

    target_mpp: float = 0.5
    region_px: int = 4096
    patch_px: int = 256
    min_tissue_fraction: float = 0.25

    def __post_init__(self) -> None:
        if not (math.isfinite(self.target_mpp) and self.target_mpp > 0):
            raise ValueError(f"target_mpp must be positive, got {self.target_mpp}")
        if self.patch_px <= 0 or self.region_px % self.patch_px:
            raise ValueError(f"patch_px ({self.patch_px}) must divide region_px ({self.region_px})")
        if not 0 < self.min_tissue_fraction <= 1:
            raise ValueError(f"min_tissue_fraction must be in (0, 1], got {self.min_tissue_fraction}")

    @property
    def patches_per_side(self) -> int:
        """Patches along one side of a region (16 by default)."""
        return self.region_px // self.patch_px

    @property
    def patches_per_region(self) -> int:
        """Patch slots per region (256 by default)."""
        return self.patches_per_side**2

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (used in store keys and provenance)."""
        return asdict(self)


def grid_shape(dimensions: tuple[int, int], region_level0: float) -> tuple[int, int]:
    """``(rows, cols)`` of regions needed to cover a ``(width, height)`` slide."""
    width, height = dimensions
    return math.ceil(height / region_level0), math.ceil(width / region_level0)


def coverage_raster(
    geometry: BaseGeometry, cell_level0: float, shape: tuple[int, int]
) -> npt.NDArray[np.float32]:
    """Rasterise ``geometry`` onto a grid of ``cell_level0``-wide cells anchored at (0, 0).

    A cell is 1 when its centre lies inside the geometry (holes excluded), else 0; averaging
    cells over a box gives its covered fraction. Sub-pixel precision comes from OpenCV's
    fixed-point ``shift``.
    """
    raster = np.zeros(shape, dtype=np.uint8)
    polygons: list[Polygon] = []
    if isinstance(geometry, Polygon):
        polygons = [geometry]
    elif isinstance(geometry, MultiPolygon):
        polygons = list(geometry.geoms)
    elif hasattr(geometry, "geoms"):
        polygons = [g for g in geometry.geoms if isinstance(g, Polygon)]
    shift = 4

    def pts(coords: Any) -> npt.NDArray[np.int32]:
        # Cell centres sit at +0.5: subtract it so cv2's pixel-centre sampling matches.
        arr = (np.asarray(coords, dtype=np.float64)[:, :2] / cell_level0 - 0.5) * (1 << shift)
        return np.round(arr).astype(np.int32)

    # Larger polygons first: an island inside another polygon's hole is drawn after the hole.
    for polygon in sorted(polygons, key=lambda p: p.area, reverse=True):
        if polygon.is_empty:
            continue
        cv2.fillPoly(raster, [pts(polygon.exterior.coords)], 1, lineType=cv2.LINE_8, shift=shift)
        holes = [pts(r.coords) for r in polygon.interiors]
        if holes:
            cv2.fillPoly(raster, holes, 0, lineType=cv2.LINE_8, shift=shift)
    return raster.astype(np.float32)


def block_mean(raster: npt.NDArray[np.float32], block: int) -> npt.NDArray[np.float32]:
    """Mean over non-overlapping ``block x block`` cells (the raster must tile exactly)."""
    rows, cols = raster.shape[0] // block, raster.shape[1] // block
    blocks = raster[: rows * block, : cols * block].reshape(rows, block, cols, block)
    return np.asarray(blocks.mean(axis=(1, 3)), dtype=np.float32)

