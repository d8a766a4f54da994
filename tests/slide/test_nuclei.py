"""Tests of the classical nucleus segmenter on synthetic H&E pictures and a real slide patch.

The synthetic pictures are made here from known discs (pink background, purple nuclei, a
little optical blur and sensor noise), so the truth (count, centres, areas) is exact. Colours
are given as RGB, not through the module's stain matrix, so the tests do not share the code
they check.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely

from omero_hwsi.slide.nuclei import (
    NUCLEUS_DESCRIPTOR_NAMES,
    ClassicalNucleusSegmenter,
    NucleusSegmenter,
    NucleusSet,
)

PINK = (236, 172, 204)  # eosin-stained stroma
PURPLE = (88, 58, 138)  # haematoxylin-stained nucleus
SLIDE = Path(__file__).resolve().parents[1] / "data" / "CMU-1-Small-Region.svs"
COL = {name: i for i, name in enumerate(NUCLEUS_DESCRIPTOR_NAMES)}

# (cx, cy, r) in pixel-edge coordinates of a 256 x 256 picture.
ISOLATED = [
    (40.0, 40.0, 10.0),
    (120.0, 40.0, 8.0),
    (200.0, 45.0, 12.0),
    (40.0, 130.0, 10.0),
    (130.0, 128.0, 9.0),
    (215.0, 130.0, 11.0),
    (50.0, 215.0, 10.0),
    (150.0, 215.0, 10.0),
]
TOUCHING_PAIRS = [
    ((95.0, 170.0, 10.0), (114.0, 170.0, 10.0)),  # side by side, overlapping by 1 px
    ((200.0, 185.0, 9.0), (200.0, 203.0, 9.0)),  # one above the other, just touching
]
ALL_DISCS = ISOLATED + [d for pair in TOUCHING_PAIRS for d in pair]


def he_picture(
    shape: tuple[int, int],
    discs: list[tuple[float, float, float]],
    *,
    seed: int = 0,
    noise: float = 3.0,
    background: tuple[int, int, int] = PINK,
    ellipses: Sequence[tuple[float, float, float, float]] = (),
) -> np.ndarray:
    """An H&E-like RGB picture: ``background`` with purple discs (and axis-aligned ellipses).

    A pixel belongs to a disc when its centre ``(c + 0.5, r + 0.5)`` is within ``r`` of the
    disc's centre, so the disc's true centroid is ``(cx, cy)`` in pixel-edge coordinates.
    """
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    nucleus = np.zeros((h, w), dtype=np.float32)
    for cx, cy, r in discs:
        nucleus[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = 1.0
    for cx, cy, ax, ay in ellipses:
        nucleus[((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0] = 1.0
    blurred = np.asarray(cv2.GaussianBlur(nucleus, (0, 0), 0.8), np.float32)  # optical blur
    mix = blurred[..., None]
    img = (1.0 - mix) * np.asarray(background, np.float32) + mix * np.asarray(PURPLE, np.float32)
    img += np.random.default_rng(seed).normal(0.0, noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def match(found: np.ndarray, truth: list[tuple[float, float, float]]) -> list[int]:
    """Index of the found centroid nearest each true centre (asserting a one-to-one match)."""
    idx = []
    for cx, cy, _ in truth:
        d = np.hypot(found[:, 0] - cx, found[:, 1] - cy)
        idx.append(int(np.argmin(d)))
    assert len(set(idx)) == len(idx), "two true nuclei matched the same found one"
    return idx


@pytest.fixture(scope="module")
def segmenter() -> ClassicalNucleusSegmenter:
    return ClassicalNucleusSegmenter()


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    return he_picture((256, 256), ALL_DISCS)


@pytest.fixture(scope="module")
def nuclei(segmenter: ClassicalNucleusSegmenter, picture: np.ndarray) -> NucleusSet:
    return segmenter.segment(picture, mpp=0.5)


# --- API --------------------------------------------------------------------------------


def test_descriptor_names_cover_size_shape_stain_texture() -> None:
    assert isinstance(NUCLEUS_DESCRIPTOR_NAMES, tuple)
    assert len(set(NUCLEUS_DESCRIPTOR_NAMES)) == len(NUCLEUS_DESCRIPTOR_NAMES)
    for name in ("area_um2", "eccentricity", "mean_h_od", "h_texture"):
        assert name in NUCLEUS_DESCRIPTOR_NAMES


def test_classical_segmenter_implements_protocol(segmenter: ClassicalNucleusSegmenter) -> None:
    assert isinstance(segmenter, NucleusSegmenter)
    assert segmenter.segmenter_id == "classical"
    assert segmenter.version == "1"
    assert segmenter.descriptor_names == NUCLEUS_DESCRIPTOR_NAMES
    assert set(segmenter.params) >= {"min_area_um2", "max_area_um2"}


def test_empty_set_has_correct_shapes() -> None:
    empty = NucleusSet.empty()
    assert len(empty) == 0
    assert empty.polygons == ()
    assert empty.centroids.shape == (0, 2) and empty.centroids.dtype == np.float64
    assert empty.descriptors.shape == (0, len(NUCLEUS_DESCRIPTOR_NAMES))
    assert empty.descriptors.dtype == np.float32


def test_nucleus_set_rejects_misaligned_fields() -> None:
    square = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float64)
    with pytest.raises(ValueError, match="disagree"):
        NucleusSet((square,), np.zeros((2, 2)), np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="polygon 0"):
        NucleusSet((square[:2],), np.zeros((1, 2)), np.zeros((1, 3), np.float32))


def test_module_does_not_import_torch() -> None:
    code = (
        "import sys, omero_hwsi.slide.nuclei; "
        "sys.exit(1 if any(m == 'torch' or m.startswith('torch.') for m in sys.modules) else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr or "omero_hwsi.slide.nuclei imported torch"


# --- synthetic pictures -----------------------------------------------------------------


def test_finds_every_disc_with_accurate_centroid(nuclei: NucleusSet) -> None:
    assert len(nuclei) == len(ALL_DISCS)
    idx = match(nuclei.centroids, ALL_DISCS)
    for (cx, cy, _), i in zip(ALL_DISCS, idx):
        x, y = nuclei.centroids[i]
        assert math.hypot(x - cx, y - cy) < 2.0, f"centroid {(x, y)} far from truth {(cx, cy)}"


def test_touching_pairs_are_split(nuclei: NucleusSet) -> None:
    for a, b in TOUCHING_PAIRS:
        ia, ib = match(nuclei.centroids, [a, b])
        assert ia != ib
        for disc, i in ((a, ia), (b, ib)):
            x, y = nuclei.centroids[i]
            assert math.hypot(x - disc[0], y - disc[1]) < 2.0
            # Each half is about one disc, not the merged pair.
            one_disc = math.pi * disc[2] ** 2 * 0.25
            assert nuclei.descriptors[i, COL["area_um2"]] < 1.3 * one_disc


def test_elongated_nucleus_is_not_oversplit(segmenter: ClassicalNucleusSegmenter) -> None:
    # A 34 x 9 px (17 x 4.5 um) spindle nucleus: its distance map is a long ridge.
    img = he_picture((128, 128), [], ellipses=[(64.0, 64.0, 17.0, 4.5)])
    found = segmenter.segment(img, mpp=0.5)
    assert len(found) == 1
    assert found.descriptors[0, COL["eccentricity"]] > 0.9
    assert (
        found.descriptors[0, COL["major_axis_um"]] > 3 * found.descriptors[0, COL["minor_axis_um"]]
    )


def test_areas_match_disc_areas(nuclei: NucleusSet) -> None:
    mpp = 0.5
    idx = match(nuclei.centroids, ISOLATED)
    for (_, _, r), i in zip(ISOLATED, idx):
        expected = math.pi * r * r * mpp * mpp
        assert nuclei.descriptors[i, COL["area_um2"]] == pytest.approx(expected, rel=0.1)
        # A disc's ellipse axes are its diameter; it is round, convex and nearly circular.
        assert nuclei.descriptors[i, COL["major_axis_um"]] == pytest.approx(2 * r * mpp, rel=0.1)
        assert nuclei.descriptors[i, COL["eccentricity"]] < 0.3
        assert nuclei.descriptors[i, COL["solidity"]] > 0.9
        assert nuclei.descriptors[i, COL["circularity"]] > 0.8


def test_sizes_scale_with_mpp(segmenter: ClassicalNucleusSegmenter, picture: np.ndarray) -> None:
    fine = segmenter.segment(picture, mpp=0.25)
    coarse = segmenter.segment(picture, mpp=0.5)
    assert len(fine) == len(coarse) == len(ALL_DISCS)
    # Pair the two results through the truth: nuclei on one row may sort either way.
    f = fine.descriptors[match(fine.centroids, ALL_DISCS)]
    c = coarse.descriptors[match(coarse.centroids, ALL_DISCS)]
    np.testing.assert_allclose(
        fine.centroids[match(fine.centroids, ALL_DISCS)],
        coarse.centroids[match(coarse.centroids, ALL_DISCS)],
        atol=0.5,
    )
    np.testing.assert_allclose(c[:, COL["area_um2"]] / f[:, COL["area_um2"]], 4.0, rtol=0.06)
    np.testing.assert_allclose(
        c[:, COL["perimeter_um"]] / f[:, COL["perimeter_um"]], 2.0, rtol=0.06
    )
    # Unitless shape descriptors do not depend on the scale. (Eccentricity is the touchiest:
    # near 0 it is a square root, so a one-pixel difference moves it by ~0.1.)
    for name, tol in (("eccentricity", 0.15), ("solidity", 0.05), ("circularity", 0.05)):
        np.testing.assert_allclose(c[:, COL[name]], f[:, COL[name]], atol=tol)


def test_sorted_by_centroid_y_then_x(nuclei: NucleusSet) -> None:
    keys = [(float(y), float(x)) for x, y in nuclei.centroids]
    assert keys == sorted(keys)


def test_arrays_have_documented_types(nuclei: NucleusSet) -> None:
    n = len(nuclei)
    assert nuclei.centroids.shape == (n, 2) and nuclei.centroids.dtype == np.float64
    assert nuclei.descriptors.shape == (n, len(NUCLEUS_DESCRIPTOR_NAMES))
    assert nuclei.descriptors.dtype == np.float32
    assert np.isfinite(nuclei.descriptors).all()
    for name in ("eccentricity", "solidity", "circularity"):
        values = nuclei.descriptors[:, COL[name]]
        assert ((values >= 0) & (values <= 1)).all(), name
    assert (nuclei.descriptors[:, COL["mean_h_od"]] > 0.3).all()


def test_polygons_are_valid_and_inside_picture(nuclei: NucleusSet, picture: np.ndarray) -> None:
    h, w = picture.shape[:2]
    assert len(nuclei.polygons) == len(nuclei)
    for poly, (cx, cy), desc in zip(nuclei.polygons, nuclei.centroids, nuclei.descriptors):
        assert poly.dtype == np.float64 and poly.ndim == 2 and poly.shape[1] == 2
        assert len(np.unique(poly, axis=0)) >= 3
        assert (poly[:, 0] >= 0).all() and (poly[:, 0] <= w).all()
        assert (poly[:, 1] >= 0).all() and (poly[:, 1] <= h).all()
        shape = shapely.Polygon(poly)
        assert shape.is_valid and shape.area > 0
        assert shape.contains(shapely.Point(cx, cy))
        # The outline runs through boundary pixel centres: a little inside the pixel area.
        area_px = desc[COL["area_um2"]] / 0.25
        assert 0.75 * area_px < shape.area <= area_px


def test_nucleus_cut_by_picture_edge(segmenter: ClassicalNucleusSegmenter) -> None:
    img = he_picture((96, 96), [(4.0, 48.0, 10.0), (60.0, 93.0, 9.0)])
    found = segmenter.segment(img, mpp=0.5)
    assert len(found) == 2
    for poly in found.polygons:
        assert shapely.Polygon(poly).is_valid
        assert poly.min() >= 0 and poly.max() <= 96
    assert ((found.centroids >= 0) & (found.centroids <= 96)).all()


def test_size_filter_drops_small_and_huge_objects(segmenter: ClassicalNucleusSegmenter) -> None:
    # r=2 px -> 3 um^2 (debris) and r=60 px -> 2800 um^2 (a dark smear), at 0.5 um/px.
    img = he_picture((256, 256), [(20.0, 20.0, 2.0), (150.0, 150.0, 60.0), (30.0, 200.0, 9.0)])
    found = segmenter.segment(img, mpp=0.5)
    assert len(found) == 1
    assert found.centroids[0] == pytest.approx((30.0, 200.0), abs=1.0)


@pytest.mark.parametrize(
    "name",
    ["white", "pink", "noisy_pink", "pale_pink_gradient"],
)
def test_pictures_without_nuclei_give_none(segmenter: ClassicalNucleusSegmenter, name: str) -> None:
    if name == "white":
        img = np.full((256, 256, 3), 255, np.uint8)
    elif name == "pink":
        img = he_picture((256, 256), [])
    elif name == "noisy_pink":
        img = he_picture((256, 256), [], noise=8.0, seed=3)
    else:
        ramp = np.linspace(0.0, 1.0, 256, dtype=np.float32)[None, :, None]
        img = ((1 - ramp) * np.array([250, 245, 248]) + ramp * np.array(PINK)).astype(np.uint8)
        img = np.ascontiguousarray(np.broadcast_to(img, (256, 256, 3)))
    found = segmenter.segment(img, mpp=0.5)
    assert len(found) == 0
    assert found.descriptors.shape == (0, len(NUCLEUS_DESCRIPTOR_NAMES))


def test_tiny_pictures_are_handled(segmenter: ClassicalNucleusSegmenter) -> None:
    for shape in ((1, 1), (1, 40), (7, 3)):
        img = np.full((*shape, 3), PURPLE, np.uint8)
        assert len(segmenter.segment(img, mpp=0.5)) == 0


def test_deterministic(segmenter: ClassicalNucleusSegmenter, picture: np.ndarray) -> None:
    first = segmenter.segment(picture, mpp=0.5)
    second = ClassicalNucleusSegmenter().segment(picture.copy(), mpp=0.5)
    assert len(first) == len(second)
    np.testing.assert_array_equal(first.centroids, second.centroids)
    np.testing.assert_array_equal(first.descriptors, second.descriptors)
    for a, b in zip(first.polygons, second.polygons):
        np.testing.assert_array_equal(a, b)


def test_input_views_and_read_only_arrays(
    segmenter: ClassicalNucleusSegmenter, picture: np.ndarray, nuclei: NucleusSet
) -> None:
    before = picture.copy()
    frozen = picture.copy()
    frozen.flags.writeable = False
    assert len(segmenter.segment(frozen, mpp=0.5)) == len(nuclei)
    # A non-contiguous view (a crop of a bigger RGBA-converted buffer) works too.
    padded = np.zeros((300, 300, 4), np.uint8)
    padded[10:266, 20:276, :3] = picture
    view = padded[10:266, 20:276, :3]
    assert not view.flags.c_contiguous
    found = segmenter.segment(view, mpp=0.5)
    np.testing.assert_array_equal(found.centroids, nuclei.centroids)
    np.testing.assert_array_equal(picture, before)


@pytest.mark.parametrize(
    "rgb",
    [
        np.zeros((16, 16, 3), np.float32),
        np.zeros((16, 16, 3), np.uint16),
        np.zeros((16, 16), np.uint8),
        np.zeros((16, 16, 4), np.uint8),
        np.zeros((2, 16, 16, 3), np.uint8),
        np.zeros((0, 16, 3), np.uint8),
        [[[0, 0, 0]]],
    ],
    ids=["float", "uint16", "grey", "rgba", "batch", "empty", "list"],
)
def test_bad_picture_raises(segmenter: ClassicalNucleusSegmenter, rgb: object) -> None:
    with pytest.raises(ValueError):
        segmenter.segment(rgb, mpp=0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("mpp", [0, -0.5, float("nan"), float("inf"), "0.5", None, True])
def test_bad_mpp_raises(segmenter: ClassicalNucleusSegmenter, mpp: object) -> None:
    with pytest.raises(ValueError, match="mpp"):
        segmenter.segment(np.zeros((16, 16, 3), np.uint8), mpp=mpp)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_area_um2": 0},
        {"min_area_um2": 50, "max_area_um2": 40},
        {"min_h_od": 0},
        {"split_saddle_ratio": 1.5},
        {"min_peak_distance_um": 0},
        {"max_hole_um2": float("nan")},
        {"smoothing_sigma_um": -1},
    ],
)
def test_bad_parameters_raise(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ClassicalNucleusSegmenter(**kwargs)


# --- a real slide -------------------------------------------------------------------------


def test_real_slide_patch_has_plausible_nuclei(segmenter: ClassicalNucleusSegmenter) -> None:
    openslide = pytest.importorskip("openslide")
    if not SLIDE.exists():
        pytest.skip(f"{SLIDE} is missing")
    slide = openslide.OpenSlide(str(SLIDE))
    try:
        # Tissue-rich dermis around (1000, 1200): spindle and round nuclei in stroma.
        patch = np.asarray(slide.read_region((1000, 1200), 0, (256, 256)).convert("RGB"))
    finally:
        slide.close()
    assert (patch.mean(axis=2) < 200).mean() > 0.8, "the patch should be mostly tissue"
    found = segmenter.segment(patch, mpp=0.499)
    assert 5 <= len(found) <= 200
    area = found.descriptors[:, COL["area_um2"]]
    assert ((area >= 15) & (area <= 200)).mean() >= 0.75
    assert np.isfinite(found.descriptors).all()
    assert (
        found.descriptors[:, COL["mean_h_od"]] > found.descriptors[:, COL["mean_e_od"]]
    ).mean() > 0.9
    for poly in found.polygons:
        assert shapely.Polygon(poly).is_valid
        assert poly.min() >= 0 and poly.max() <= 256


def test_nucleus_inside_a_ring_is_found(segmenter: ClassicalNucleusSegmenter) -> None:
    # A purple ring (e.g. a gland outline, too big and hollow to be a nucleus) around a nucleus.
    h = w = 160
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    rr = np.hypot(xx - 80, yy - 80)
    img = he_picture((h, w), [(80.0, 80.0, 9.0)])
    ring = (rr > 30) & (rr < 36)
    img[ring] = PURPLE
    found = segmenter.segment(img, mpp=0.5)
    assert len(found) >= 1
    idx = match(found.centroids, [(80.0, 80.0, 9.0)])[0]
    assert found.centroids[idx] == pytest.approx((80.0, 80.0), abs=1.0)
    assert shapely.Polygon(found.polygons[idx]).is_valid


def test_gradient_magnitude_is_opencv_sobel_in_float64() -> None:
    from omero_hwsi.slide.nuclei import _sobel_magnitude

    rng = np.random.default_rng(5)
    image = rng.random((37, 53), dtype=np.float32)
    gx = cv2.Sobel(image, cv2.CV_64F, 1, 0, ksize=3, scale=0.125)
    gy = cv2.Sobel(image, cv2.CV_64F, 0, 1, ksize=3, scale=0.125)
    np.testing.assert_allclose(_sobel_magnitude(image), np.hypot(gx, gy), rtol=1e-12, atol=1e-12)

