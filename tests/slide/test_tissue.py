from __future__ import annotations

import cv2
import numpy as np

from omero_hwsi.slide.tissue import TissueParams, mask_to_geometry, tissue_mask

MPP = 8.0  # thumbnail microns per pixel


def picture() -> np.ndarray:
    """White glass with a pink tissue disc (holed), a blue and a green pen stroke, black ink."""
    img = np.full((300, 400, 3), 242, np.uint8)
    rng = np.random.default_rng(0)
    cv2.circle(img, (150, 150), 90, (225, 150, 190), -1)
    cv2.circle(img, (150, 150), 20, (242, 242, 240), -1)  # a lumen: a hole to keep
    img = np.clip(img.astype(int) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
    cv2.line(img, (280, 20), (380, 280), (40, 60, 200), 12)  # blue pen
    cv2.line(img, (260, 280), (390, 200), (40, 170, 60), 10)  # green pen
    cv2.circle(img, (340, 60), 15, (20, 20, 25), -1)  # black marker dot
    return img


def test_pen_marks_and_ink_are_not_tissue():
    mask = tissue_mask(picture(), MPP, TissueParams())
    assert mask[150, 80] and mask[100, 150]  # tissue
    assert not mask[150, 330]  # blue stroke
    assert not mask[240, 322]  # green stroke
    assert not mask[60, 340]  # black ink
    assert not mask[10, 10]  # glass


def test_holes_are_kept_in_the_geometry():
    mask = tissue_mask(picture(), MPP, TissueParams())
    assert not mask[150, 150]
    geometry = mask_to_geometry(mask, level0_per_px=16.0)
    assert geometry.geom_type == "Polygon" and len(geometry.interiors) == 1
    # Level-0 area ~ (pi 90^2 - pi 20^2) thumbnail px * 16^2
    expected = np.pi * (90**2 - 20**2) * 256
    assert abs(geometry.area - expected) / expected < 0.05


def test_blank_glass_gives_an_empty_mask():
    rng = np.random.default_rng(1)
    glass = np.clip(242 + rng.normal(0, 3, (200, 200, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass, MPP, TissueParams()).any()
    assert mask_to_geometry(np.zeros((10, 10), bool), 1.0).is_empty


def test_specks_below_the_minimum_area_are_dropped():
    img = np.full((200, 200, 3), 242, np.uint8)
    cv2.circle(img, (100, 100), 3, (225, 150, 190), -1)  # ~ 28 px * 64 um2 < 20,000 um2
    assert not tissue_mask(img, MPP, TissueParams()).any()
