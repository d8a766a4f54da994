"""In-memory synthetic feature stores: consistent geometry and usable as model input."""

from __future__ import annotations

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from omero_hwsi.model.processing_hwsi import visual_inputs
from omero_hwsi.slide.grid import GridSpec
from omero_hwsi.synthetic.features import synthetic_features


def test_geometry_is_nested_and_ids_are_numbered_like_the_extractor():
    f = synthetic_features(regions=5, k=4, nuclei_per_patch=3, columns=2,
                           grid=GridSpec(region_px=1024, patch_px=256), seed=2)
    assert f.region_features.shape == (5, 64) and f.patch_features.shape == (5, 16, 32)
    assert f.selected.shape == (5, 4) and len(f.nuclei) == 5 * 4 * 3
    for r in range(5):
        x, y, w, h = f.region_boxes[r]
        region = box(x, y, x + w, y + h)
        for j in f.selected[r]:
            px, py, pw, ph = f.patch_boxes[r, j]
            assert region.contains(box(px, py, px + pw, py + ph))
    table = f.nuclei
    for n in range(len(table)):
        px, py, pw, ph = f.patch_boxes[table.region[n], table.patch[n]]
        assert box(px, py, px + pw, py + ph).contains(Polygon(table.polygon(n)))
    # k numbers the nuclei of a patch 0..n-1 in centroid (y, x) order.
    for r, j in {(int(a), int(b)) for a, b in zip(table.region, table.patch, strict=True)}:
        rows = np.flatnonzero((table.region == r) & (table.patch == j))
        by_k = rows[np.argsort(table.k[rows])]
        assert sorted(table.k[rows]) == list(range(len(rows)))
        ys = table.centroid[by_k, 1]
        assert list(ys) == sorted(ys)


def test_it_feeds_the_model_inputs():
    f = synthetic_features(regions=3, k=16, nuclei_per_patch=2)
    v = visual_inputs(f, max_cells=8)
    assert v["patch"].shape == (3, 16, 32) and v["cell_mask"].sum() == 3 * 16 * 2
    with pytest.raises(ValueError, match="k must be"):
        synthetic_features(k=300)
