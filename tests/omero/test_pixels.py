"""Reading OMERO pixels tile by tile (fake server serving a real slide's pyramid)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fake_gateway import FakeGateway, FakeLength, pyramid_from_slide

from omero_hwsi.errors import InputError, OmeroNotFoundError, ServiceError
from omero_hwsi.omero import pixels
from omero_hwsi.omero.pixels import OmeroPixelsReader, open_pixels, pixel_size_um
from omero_hwsi.slide.reader import resample_area

TILE = (200, 150)


@pytest.fixture(scope="module")
def levels(fixture_slide):
    return pyramid_from_slide(fixture_slide("CMU-1-Small-Region.svs"))


@pytest.fixture
def served(levels):
    gw = FakeGateway()
    image = gw.add_image("CMU-1.ome.tiff", pixels=gw.add_pixels(levels, tile_size=TILE))
    return gw, image.id


def _expected(level, x, y, w, h):
    """The window cut from a level array, white outside it."""
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    lh, lw = level.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = level[y0:y1, x0:x1]
    return out


def test_levels_are_numbered_full_resolution_first(served, levels):
    gw, image_id = served
    with open_pixels(gw, image_id) as reader:
        assert reader.level_dimensions == tuple((a.shape[1], a.shape[0]) for a in levels)
        assert reader.level_downsamples[0] == 1.0
        assert reader.level_downsamples[1:] == pytest.approx((2.0, 4.0), rel=2e-3)
        assert reader.tile_size == TILE and reader.pixel_size_um == pytest.approx(0.499)
    assert not gw.open_stores


@pytest.mark.parametrize(("level", "window"), [
    (0, (190, 140, 300, 200)),    # crosses server tiles both ways
    (0, (2100, 2900, 256, 256)),  # past the bottom-right border: white there
    (1, (-30, -20, 100, 80)),     # before the top-left corner
    (2, (0, 0, 555, 741)),        # the whole coarsest level
])
def test_read_window_stitches_server_tiles_exactly(served, levels, level, window):
    gw, image_id = served
    with open_pixels(gw, image_id) as reader:
        got = reader.read_window(level, *window)
    assert got.dtype == np.uint8 and got.shape == (window[3], window[2], 3)
    np.testing.assert_array_equal(got, _expected(levels[level], *window))


def test_concurrent_reads_at_different_levels_stay_correct(served, levels):
    gw, image_id = served
    rng = np.random.default_rng(0)
    jobs = [(int(rng.integers(0, 3)), int(rng.integers(0, 500)), int(rng.integers(0, 700)),
             int(rng.integers(1, 300)), int(rng.integers(1, 300))) for _ in range(48)]
    with open_pixels(gw, image_id) as reader, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: reader.read_window(*job), jobs))
    for (level, *window), got in zip(jobs, results):
        np.testing.assert_array_equal(got, _expected(levels[level], *window))


def test_render_uses_the_matching_level_as_it_is(served, levels):
    gw, image_id = served
    with open_pixels(gw, image_id) as reader:
        got = reader.render(512.0, 1024.0, 256, 256, 2.0)
    np.testing.assert_array_equal(got, _expected(levels[1], 256, 512, 256, 256))


def test_render_between_levels_area_averages_the_finer_one(served, levels, monkeypatch):
    gw, image_id = served
    monkeypatch.setattr(pixels, "MAX_READ_PX", 64)  # many blocks per window
    with open_pixels(gw, image_id) as reader:
        got = reader.render(300.0, 600.0, 128, 128, 3.0)
        coarse = reader.render(0.0, 0.0, 100, 100, 16.0)
    expected = resample_area(_expected(levels[1], 150, 300, 192, 192), (128, 128))
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 1.0
    full = resample_area(levels[0][:1600, :1600], (100, 100))
    assert np.abs(coarse.astype(int) - full.astype(int)).mean() < 3.0


def test_non_rgb_pixels_are_refused_in_one_line():
    gw = FakeGateway()
    image = gw.add_image("stack.ome.tiff", pixels=gw.add_pixels([np.zeros((8, 8, 2), np.uint8)]))
    with pytest.raises(InputError, match="2 channel.*only 8-bit RGB") as err:
        open_pixels(gw, image.id)
    assert "\n" not in str(err.value) and not gw.open_stores


def test_a_missing_image_is_not_found():
    with pytest.raises(OmeroNotFoundError, match="OMERO image 99"):
        open_pixels(FakeGateway(), 99)


def test_a_wrong_tile_from_the_server_is_a_service_error(served):
    gw, image_id = served

    class Short:
        def __init__(self, store):
            self._store = store

        def __getattr__(self, name):
            return getattr(self._store, name)

        def getTile(self, *args):  # one byte short
            return self._store.getTile(*args)[:-1]

    with open_pixels(gw, image_id) as reader:
        broken = OmeroPixelsReader(Short(reader._store), name="OMERO image 1 (x)",
                                   size=reader.dimensions, pixel_size_um=None)
        with pytest.raises(ServiceError, match="expected 100"):
            broken.read_window(0, 0, 0, 10, 10)


@pytest.mark.parametrize(("length", "microns"), [
    (FakeLength(0.25), 0.25),
    (FakeLength(250.0, "NANOMETER"), 0.25),
    (FakeLength(1.0, "PIXEL"), None),
    (FakeLength(0.0), None),
    (None, None),
])
def test_pixel_size_is_read_in_microns(length, microns):
    assert pixel_size_um(length) == (pytest.approx(microns) if microns else None)
