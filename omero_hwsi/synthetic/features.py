"""Synthetic feature stores in memory: a slide of any size for model tests and benchmarks.

Extracting a 32-region slide takes minutes; the model only reads :class:`SlideFeatures`, so
benchmarks of inference and evidence build one directly: regions on a row-major grid anchored
at level-0 (0, 0), 16 x 16 patch boxes per region, ``k`` selected patches per region, and
nuclei as small octagons inside the selected patches, with random features of the requested
widths. The geometry is consistent (patches inside regions, nuclei inside patches), so
evidence geometry can be checked; the features mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from shapely.geometry import box

from omero_hwsi.features.store import NucleusTable, SlideFeatures
from omero_hwsi.slide.grid import GridSpec

__all__ = ["synthetic_features"]


def synthetic_features(
    *,
    regions: int = 32,
    k: int = 16,
    nuclei_per_patch: int = 8,
    region_dim: int = 64,
    patch_dim: int = 32,
    cell_dim: int = 11,
    columns: int = 8,
    grid: GridSpec | None = None,
    seed: int = 0,
    path: str | Path = "synthetic-store",
) -> SlideFeatures:
    """A :class:`SlideFeatures` with ``regions`` regions of ``k`` selected patches each.

    Args:
        regions: number of regions (laid out ``columns`` per row).
        k: selected patches per region (at most the grid's patches per region).
        nuclei_per_patch: nuclei in every selected patch.
        region_dim, patch_dim, cell_dim: feature widths (defaults: the built-in encoders').
        grid: region and patch sizes at the target MPP; level 0 is taken to be at it.
        seed: random seed of the features and the selection.
        path: recorded as the store path (nothing is written).
    """
    grid = grid or GridSpec()
    per_side = grid.patches_per_side
    slots = per_side * per_side
    if not 1 <= k <= slots:
        raise ValueError(f"k must be in [1, {slots}], got {k}")
    if regions < 1 or nuclei_per_patch < 0 or columns < 1:
        raise ValueError("regions and columns must be >= 1, nuclei_per_patch >= 0")
    rng = np.random.default_rng(seed)
    size, step = float(grid.region_px), float(grid.patch_px)
    rows = -(-regions // columns)
    index = np.arange(regions, dtype=np.int64)
    region_boxes = np.array([[(i % columns) * size, (i // columns) * size, size, size]
                             for i in range(regions)])
    offsets = np.array([[(j % per_side) * step, (j // per_side) * step] for j in range(slots)])
    patch_boxes = np.zeros((regions, slots, 4))
    patch_boxes[:, :, :2] = region_boxes[:, None, :2] + offsets[None]
    patch_boxes[:, :, 2:] = step
    selected = np.stack([rng.choice(slots, size=k, replace=False) for _ in range(regions)])

    count = regions * k * nuclei_per_patch
    region_of = np.repeat(np.arange(regions, dtype=np.int32), k * nuclei_per_patch)
    patch_of = np.repeat(selected.reshape(-1), nuclei_per_patch).astype(np.int16)
    centroids = np.zeros((count, 2))
    polygons: list[npt.NDArray[np.float64]] = []
    angles = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    k_within = np.zeros(count, dtype=np.int32)
    for n in range(count):
        x, y, w, h = patch_boxes[region_of[n], patch_of[n]]
        centroids[n] = (x + rng.uniform(0.1, 0.9) * w, y + rng.uniform(0.1, 0.9) * h)
        radius = 0.03 * w
        polygons.append(np.stack([centroids[n, 0] + radius * np.cos(angles),
                                  centroids[n, 1] + radius * np.sin(angles)], axis=1))
    # k: nucleus order inside its patch by centroid (y, x), as the extractor numbers them.
    for start in range(0, count, max(1, nuclei_per_patch)):
        block = slice(start, start + nuclei_per_patch)
        order = np.lexsort((centroids[block, 0], centroids[block, 1]))
        k_within[block][order] = np.arange(len(order), dtype=np.int32)
    vertices = [len(p) for p in polygons]
    nuclei = NucleusTable(
        region=region_of, patch=patch_of, k=k_within, centroid=centroids,
        descriptor=rng.normal(size=(count, cell_dim)).astype(np.float32),
        polygon_offsets=np.concatenate([[0], np.cumsum(vertices)]).astype(np.int64),
        polygon_xy=np.concatenate(polygons) if polygons else np.zeros((0, 2)),
    )
    width, height = columns * size, rows * size
    provenance = {
        "slide": {"path": f"{path}.svs", "sha256": "synthetic", "width": width, "height": height},
        "grid": grid.to_dict(),
        "encoders": {
            "patch": {"id": "synthetic", "version": "1", "dim": patch_dim},
            "region": {"id": "synthetic", "version": "1", "dim": region_dim},
            "nucleus": {"id": "synthetic", "version": "1", "dim": cell_dim},
        },
    }
    region_features = rng.normal(size=(regions, region_dim)).astype(np.float32)
    return SlideFeatures(
        path=Path(path),
        provenance=provenance,
        tissue=box(0, 0, width, height),
        region_index=index,
        region_boxes=region_boxes,
        region_tissue=np.ones(regions, dtype=np.float32),
        region_features=region_features,
        patch_boxes=patch_boxes,
        patch_tissue=np.ones((regions, slots), dtype=np.float32),
        patch_valid=np.ones((regions, slots), dtype=bool),
        patch_features=rng.normal(size=(regions, slots, patch_dim)).astype(np.float32),
        candidates=selected.astype(np.int16),
        relevance=np.ones((regions, k), dtype=np.float32),
        selected=selected.astype(np.int16),
        nuclei=nuclei,
        wsi_features=region_features.mean(axis=0),
    )
