from __future__ import annotations

import numpy as np
import pytest
from shapely.geometry import box

from omero_hwsi.errors import NoTissueError, RegionError
from omero_hwsi.slide.grid import GridSpec
from omero_hwsi.slide.hierarchy import (
    build_hierarchy,
    cell_hid,
    parse_hid,
    patch_hid,
    region_hid,
    restrict_to,
)
from omero_hwsi.slide.local import open_slide


@pytest.fixture(scope="module")
def cmu(fixture_slide):
    with open_slide(fixture_slide("CMU-1-Small-Region.svs")) as slide:
        return build_hierarchy(slide, GridSpec())


def test_cmu_is_exactly_one_padded_region(cmu):
    assert cmu.n_regions == 1
    assert cmu.region_ids == ["r0"]
    assert cmu.level0_per_px == 1.0  # 0.499 um/px is within tolerance: no resampling
    np.testing.assert_array_equal(cmu.region_boxes[0], [0, 0, 4096, 4096])
    assert (cmu.grid_rows, cmu.grid_cols) == (1, 1)


def test_cmu_patches_on_the_slide_and_on_tissue(cmu):
    assert cmu.patch_on_slide.sum() == 108  # 9 columns x 12 rows of 256 px patches
    valid = cmu.patch_valid[0]
    assert 20 <= valid.sum() <= 108
    assert not (valid & ~cmu.patch_on_slide[0]).any()
    assert (cmu.patch_tissue[0][valid] >= 0.25).all()
    boxes = cmu.patch_boxes[0][valid]
    assert (boxes[:, 0] < 2220).all() and (boxes[:, 1] < 2967).all()


def test_tissue_lies_inside_the_slide_with_holes(cmu):
    minx, miny, maxx, maxy = cmu.tissue.bounds
    assert minx >= 0 and miny >= 0 and maxx <= 2220 and maxy <= 2967
    holes = sum(len(p.interiors) for p in getattr(cmu.tissue, "geoms", [cmu.tissue]))
    assert holes >= 1
    assert 0.2 < cmu.tissue.area / (2220 * 2967) < 0.6


def test_ids_round_trip():
    assert region_hid(12) == "r12"
    assert patch_hid(12, 7) == "r12.p7"
    assert cell_hid(12, 7, 3) == "r12.p7.c3"
    assert parse_hid("r12.p7.c3") == (12, 7, 3)
    assert parse_hid("r3") == (3, None, None)
    with pytest.raises(ValueError):
        parse_hid("p7")


def test_restriction_keeps_ids_and_only_overlapping_patches(cmu):
    restricted = restrict_to(cmu, box(700, 1100, 1300, 1700))
    assert restricted.region_ids == ["r0"]
    kept = np.flatnonzero(restricted.patch_valid[0])
    assert kept.size > 0 and set(kept) <= set(np.flatnonzero(cmu.patch_valid[0]))
    for j in kept:
        x, y, w, h = restricted.patch_boxes[0, j]
        assert x < 1300 and x + w > 700 and y < 1700 and y + h > 1100


def test_restriction_outside_the_slide_is_refused(cmu):
    with pytest.raises(RegionError, match="outside the slide"):
        restrict_to(cmu, box(2000, 2000, 5000, 5000))


def test_restriction_without_tissue_is_no_tissue(cmu):
    with pytest.raises(NoTissueError):
        restrict_to(cmu, box(2100, 10, 2200, 60))


def test_small_slide_is_smaller_than_one_patch(fixture_slide):
    with open_slide(fixture_slide("small.svs")) as slide:
        with pytest.raises(NoTissueError, match="smaller than one patch"):
            build_hierarchy(slide, GridSpec())


def test_boxes_with_an_mpp_override_is_smaller_than_one_patch(fixture_slide):
    with open_slide(fixture_slide("boxes.tiff"), mpp=0.5) as slide:
        with pytest.raises(NoTissueError, match="smaller than one patch"):
            build_hierarchy(slide, GridSpec())


def test_blank_slide_has_no_tissue(synthetic_slide):
    path = synthetic_slide(width=3000, height=3000, content="blank")
    with open_slide(path) as slide, pytest.raises(NoTissueError, match="no tissue"):
        build_hierarchy(slide, GridSpec())


def test_pyramid_at_quarter_micron_reads_the_right_level_and_size(synthetic_slide):
    path = synthetic_slide(width=10000, height=9000, mpp=0.25, downsamples=(1, 2, 8))
    with open_slide(path) as slide:
        hierarchy = build_hierarchy(slide, GridSpec())
        assert hierarchy.level0_per_px == 2.0  # level 1 is 0.5 um/px: read as is
        # A region is 2.048 mm whatever the scan resolution: 8192 level-0 px at 0.25 um/px.
        assert hierarchy.region_boxes[0, 2] * slide.mpp == pytest.approx(2048.0)
        assert hierarchy.patch_boxes[0, 0, 2] == 512
        assert (hierarchy.grid_rows, hierarchy.grid_cols) == (2, 2)
        pixels = slide.read_region((4000, 4000), (256, 256), 0.5)
        assert pixels.shape == (256, 256, 3)


def test_resampled_pyramid_matches_physical_size(synthetic_slide):
    path = synthetic_slide(width=6000, height=5000, mpp=0.25, downsamples=(1, 4))
    with open_slide(path) as slide:
        hierarchy = build_hierarchy(slide, GridSpec())
    assert hierarchy.level0_per_px == 2.0
    assert hierarchy.patch_boxes[0, 0, 2] * 0.25 == pytest.approx(128.0)


def test_ids_do_not_depend_on_tissue(synthetic_slide):
    path = synthetic_slide(width=9000, height=5000, mpp=0.5, seed=3)
    with open_slide(path) as slide:
        full = build_hierarchy(slide, GridSpec())
        strict = build_hierarchy(slide, GridSpec(min_tissue_fraction=0.9))
    assert set(strict.region_index) <= set(full.region_index)
    for r, i in enumerate(strict.region_index):
        f = int(np.flatnonzero(full.region_index == i)[0])
        np.testing.assert_array_equal(strict.patch_boxes[r], full.patch_boxes[f])
