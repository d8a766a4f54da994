"""The slide hierarchy: tissue, regions and patches as level-0 boxes, with stable ids.

Ids are ``r<i>`` for a region, ``r<i>.p<j>`` for a patch and ``r<i>.p<j>.c<k>`` for a cell:
``i`` is row-major over the full region grid anchored at level-0 (0, 0), ``j`` is 0..255
row-major inside the region, ``k`` orders the nuclei of one patch by centroid (y, x). They
are built and parsed only here, and no id depends on tissue detection, patch selection or
worker order, so evidence from any run can be joined with any other.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry import box as shapely_box
from shapely.geometry.base import BaseGeometry

from omero_hwsi._types import Box
from omero_hwsi.errors import NoTissueError, RegionError
from omero_hwsi.slide.grid import SUBDIVISIONS, GridSpec, block_mean, coverage_raster, grid_shape
from omero_hwsi.slide.reader import SlideInfo, SlideReader, plan_for
from omero_hwsi.slide.tissue import TissueParams, detect_tissue

__all__ = [
    "Hierarchy",
    "build_hierarchy",
    "cell_hid",
    "parse_hid",
    "patch_hid",
    "region_hid",
    "restrict_to",
]

logger = logging.getLogger(__name__)

_HID = re.compile(r"^r(\d+)(?:\.p(\d+)(?:\.c(\d+))?)?$")


def region_hid(i: int) -> str:
    """Id of region ``i`` (row-major over the slide's full region grid)."""
    return f"r{int(i)}"


def patch_hid(i: int, j: int) -> str:
    """Id of patch ``j`` (row-major inside the region) of region ``i``."""
    return f"r{int(i)}.p{int(j)}"


def cell_hid(i: int, j: int, k: int) -> str:
    """Id of nucleus ``k`` (by centroid y, x) of patch ``j`` of region ``i``."""
    return f"r{int(i)}.p{int(j)}.c{int(k)}"


def parse_hid(hid: str) -> tuple[int, int | None, int | None]:
    """Split an id into ``(i, j, k)``; missing levels are ``None``.

    Raises:
        ValueError: the text is not a hierarchy id.
    """
    match = _HID.match(hid)
    if match is None:
        raise ValueError(f"not a hierarchy id: {hid!r} (expected r<i>[.p<j>[.c<k>]])")
    i, j, k = match.groups()
    return int(i), None if j is None else int(j), None if k is None else int(k)


@dataclass(frozen=True, slots=True, eq=False)
class Hierarchy:
    """Regions kept on a slide and their patch grids, in level-0 pixels.

    Shapes: ``R`` kept regions, ``P`` patch slots per region (256 by default).
    Arrays: ``region_index (R,)`` grid index ``i``; ``region_boxes (R, 4)`` and
    ``patch_boxes (R, P, 4)`` as ``(x, y, w, h)`` (boxes may extend past the slide border:
    the padding is masked); ``region_tissue (R,)`` and ``patch_tissue (R, P)`` tissue fractions
    of the whole box; ``patch_on_slide (R, P)``; ``patch_valid (R, P)`` = on slide, on enough
    tissue and inside the user's regions when restricted.
    """

    slide: SlideInfo
    grid: GridSpec
    level0_per_px: float
    grid_rows: int
    grid_cols: int
    tissue: BaseGeometry
    region_index: npt.NDArray[np.int64]
    region_boxes: npt.NDArray[np.float64]
    region_tissue: npt.NDArray[np.float32]
    patch_boxes: npt.NDArray[np.float64]
    patch_tissue: npt.NDArray[np.float32]
    patch_on_slide: npt.NDArray[np.bool_]
    patch_valid: npt.NDArray[np.bool_]
    restricted_to: BaseGeometry | None = None

    @property
    def n_regions(self) -> int:
        """Number of kept regions ``R``."""
        return int(self.region_index.shape[0])

    @property
    def region_ids(self) -> list[str]:
        """``r<i>`` for each kept region, in storage order."""
        return [region_hid(i) for i in self.region_index]

    def region_box(self, r: int) -> Box:
        """Box of the ``r``-th kept region as a tuple."""
        x, y, w, h = self.region_boxes[r]
        return float(x), float(y), float(w), float(h)

    @property
    def n_valid_patches(self) -> int:
        """Patches on tissue over all kept regions."""
        return int(self.patch_valid.sum())


def build_hierarchy(
    reader: SlideReader,
    grid: GridSpec,
    *,
    tissue_params: TissueParams | None = None,
) -> Hierarchy:
    """Detect tissue and lay the region/patch grid over a slide.

    A patch is valid when it overlaps the slide and at least ``grid.min_tissue_fraction`` of
    its box is tissue; a region is kept when it has at least one valid patch.

    Raises:
        MppError: the slide is coarser than ``grid.target_mpp``.
        NoTissueError: the slide is smaller than one patch, or no tissue is found.
        SlideReadError: the thumbnail cannot be read.
    """
    info = reader.info
    level0_per_px = plan_for(reader, grid.target_mpp).level0_per_px
    patch_l0 = grid.patch_px * level0_per_px
    region_l0 = grid.region_px * level0_per_px
    width, height = reader.dimensions
    if width < patch_l0 or height < patch_l0:
        size_um = grid.patch_px * grid.target_mpp
        raise NoTissueError(
            f"{info.name}: slide of {width}x{height} px at {reader.mpp:.4g} um/px is smaller "
            f"than one patch ({size_um:g} um); nothing to analyse"
        )
    tissue = detect_tissue(reader, tissue_params).geometry
    if tissue.is_empty:
        raise NoTissueError(f"{info.name}: no tissue found on the slide")
    rows, cols = grid_shape((width, height), region_l0)
    pps = grid.patches_per_side
    cell = patch_l0 / SUBDIVISIONS
    raster = coverage_raster(tissue, cell, (rows * pps * SUBDIVISIONS, cols * pps * SUBDIVISIONS))
    fractions = block_mean(raster, SUBDIVISIONS)  # (rows*pps, cols*pps), one value per patch slot

    px = np.arange(cols * pps) * patch_l0
    py = np.arange(rows * pps) * patch_l0
    on_slide = (py[:, None] < height) & (px[None, :] < width)
    valid = on_slide & (fractions >= grid.min_tissue_fraction)

    def per_region(a: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        # (rows*pps, cols*pps) -> (rows*cols, pps*pps), region-major then patch row-major.
        return a.reshape(rows, pps, cols, pps).transpose(0, 2, 1, 3).reshape(rows * cols, pps * pps)

    valid_r = per_region(valid)
    keep = np.flatnonzero(valid_r.any(axis=1)).astype(np.int64)
    if keep.size == 0:
        raise NoTissueError(
            f"{info.name}: no patch has at least {grid.min_tissue_fraction:.0%} tissue"
        )
    region_rows, region_cols = np.divmod(keep, cols)
    region_boxes = np.stack(
        [region_cols * region_l0, region_rows * region_l0,
         np.full(keep.shape, region_l0), np.full(keep.shape, region_l0)], axis=1
    ).astype(np.float64)
    pj = np.arange(pps * pps)
    prow, pcol = np.divmod(pj, pps)
    patch_boxes = np.empty((keep.size, pps * pps, 4), dtype=np.float64)
    patch_boxes[..., 0] = region_boxes[:, None, 0] + pcol[None, :] * patch_l0
    patch_boxes[..., 1] = region_boxes[:, None, 1] + prow[None, :] * patch_l0
    patch_boxes[..., 2:] = patch_l0
    patch_tissue = per_region(fractions)[keep].astype(np.float32)
    hierarchy = Hierarchy(
        slide=info,
        grid=grid,
        level0_per_px=level0_per_px,
        grid_rows=rows,
        grid_cols=cols,
        tissue=tissue,
        region_index=keep,
        region_boxes=region_boxes,
        region_tissue=patch_tissue.mean(axis=1).astype(np.float32),
        patch_boxes=patch_boxes,
        patch_tissue=patch_tissue,
        patch_on_slide=per_region(on_slide)[keep].astype(bool),
        patch_valid=valid_r[keep].astype(bool),
    )
    logger.info(
        "%s: %d region(s), %d patch(es) on tissue", info.name, hierarchy.n_regions,
        hierarchy.n_valid_patches,
    )
    return hierarchy


def restrict_to(hierarchy: Hierarchy, geometry: BaseGeometry) -> Hierarchy:
    """Keep only patches (and their regions) overlapping user-given regions.

    Used for ``--regions`` files and OMERO ROIs. Overlap means a shared area, not a touching
    edge. Ids are unchanged: a restricted run's ``r12.p7`` is the same patch as a full run's.

    Raises:
        RegionError: the geometry is empty or lies (partly) outside the slide, which usually
            means it belongs to another image.
        NoTissueError: no tissue patch overlaps the geometry.
    """
    name = hierarchy.slide.name
    if geometry.is_empty or geometry.area <= 0:
        raise RegionError(f"{name}: the given regions are empty (no area)")
    width, height = hierarchy.slide.dimensions
    outside = geometry.difference(shapely_box(0, 0, width, height)).area
    if outside > 1e-6 * geometry.area + 1e-9:
        minx, miny, maxx, maxy = geometry.bounds
        raise RegionError(
            f"{name}: the given regions reach outside the slide ({width}x{height} px; regions "
            f"span x {minx:.0f}..{maxx:.0f}, y {miny:.0f}..{maxy:.0f}); are they from another image?"
        )
    boxes = hierarchy.patch_boxes.reshape(-1, 4)
    candidates = np.flatnonzero(hierarchy.patch_valid.reshape(-1))
    geoms = shapely.box(
        boxes[candidates, 0], boxes[candidates, 1],
        boxes[candidates, 0] + boxes[candidates, 2], boxes[candidates, 1] + boxes[candidates, 3],
    )
    shapely.prepare(geometry)
    overlap = shapely.intersects(geometry, geoms) & ~shapely.touches(geometry, geoms)
    flat_valid = np.zeros(boxes.shape[0], dtype=bool)
    flat_valid[candidates[overlap]] = True
    valid = flat_valid.reshape(hierarchy.patch_valid.shape)
    keep = np.flatnonzero(valid.any(axis=1))
    if keep.size == 0:
        raise NoTissueError(f"{name}: no tissue patch overlaps the given regions")
    return replace(
        hierarchy,
        region_index=hierarchy.region_index[keep],
        region_boxes=hierarchy.region_boxes[keep],
        region_tissue=hierarchy.region_tissue[keep],
        patch_boxes=hierarchy.patch_boxes[keep],
        patch_tissue=hierarchy.patch_tissue[keep],
        patch_on_slide=hierarchy.patch_on_slide[keep],
        patch_valid=valid[keep],
        restricted_to=geometry,
    )
