from __future__ import annotations

import numpy as np
import openslide
import pytest

from omero_hwsi.errors import MppError, SlideNotFoundError, SlideOpenError, SlideReadError
from omero_hwsi.slide.local import open_slide, slide_checksum
from omero_hwsi.slide.reader import SlideReader


def test_cmu_reports_its_metadata(fixture_slide):
    with open_slide(fixture_slide("CMU-1-Small-Region.svs")) as slide:
        assert isinstance(slide, SlideReader)
        info = slide.info
        assert info.dimensions == (2220, 2967)
        assert info.vendor == "aperio"
        assert info.objective_power == 20
        assert info.mpp == pytest.approx(0.499)
        assert info.mpp_source == "metadata"
        assert info.backend == "openslide"


def test_read_within_tolerance_returns_the_stored_pixels(fixture_slide):
    path = fixture_slide("CMU-1-Small-Region.svs")
    with open_slide(path) as slide:
        ours = slide.read_region((1000, 1200), (256, 256), 0.5)
    raw = np.asarray(openslide.OpenSlide(str(path)).read_region((1000, 1200), 0, (256, 256)))[..., :3]
    assert ours.dtype == np.uint8 and ours.shape == (256, 256, 3)
    np.testing.assert_array_equal(ours, raw)


def test_read_past_the_border_is_white_padding(fixture_slide):
    with open_slide(fixture_slide("CMU-1-Small-Region.svs")) as slide:
        pixels = slide.read_region((2100, 2900), (256, 256), 0.5)
    assert (pixels[100:, 150:] == 255).all()
    assert (pixels[:60, :100] != 255).any()


def test_read_at_coarser_mpp_area_averages(fixture_slide):
    with open_slide(fixture_slide("CMU-1-Small-Region.svs")) as slide:
        full = slide.read_region((1000, 1000), (512, 512), 0.5).astype(float)
        half = slide.read_region((1000, 1000), (256, 256), 0.998).astype(float)
    expected = full.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    assert np.abs(half - expected).mean() < 1.0


def test_mpp_override_is_per_slide(fixture_slide):
    with open_slide(fixture_slide("boxes.tiff"), mpp=0.5) as slide:
        assert slide.mpp == 0.5
        assert slide.info.mpp_source == "override"
        assert slide.info.metadata_mpp == pytest.approx(352.78, rel=1e-3)


def test_finer_target_than_the_slide_is_an_error(fixture_slide):
    with open_slide(fixture_slide("CMU-1-Small-Region.svs")) as slide:
        with pytest.raises(MppError, match="coarser"):
            slide.read_region((0, 0), (16, 16), 0.25)


@pytest.mark.parametrize(
    ("name", "error", "pattern"),
    [
        ("unopenable.tiff", SlideOpenError, "unopenable.tiff: unsupported or corrupt slide format"),
        ("broken.svs", SlideOpenError, "broken.svs: unsupported or corrupt"),
        ("unreadable.svs", SlideReadError, "unreadable.svs: cannot read pixels"),
        ("boxes.tiff", MppError, r"boxes.tiff: MPP 352.8 um/px .* implausible.*--mpp"),
    ],
)
def test_bad_fixture_slides_fail_with_their_error(fixture_slide, name, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        open_slide(fixture_slide(name))
    assert "\n" not in str(info.value)


def test_tiffslide_fallback_must_decode_before_accepting(fixture_slide):
    import tiffslide

    path = fixture_slide("unopenable.tiff")
    tiffslide.TiffSlide(str(path))  # tiffslide alone opens it ...
    with pytest.raises(SlideOpenError):  # ... but we do not accept what cannot be decoded
        open_slide(path)


def test_not_a_slide_and_missing_files(tmp_path):
    text = tmp_path / "notes.svs"
    text.write_text("hello")
    with pytest.raises(SlideOpenError, match="notes.svs"):
        open_slide(text)
    with pytest.raises(SlideNotFoundError, match="missing.svs"):
        open_slide(tmp_path / "missing.svs")
    with pytest.raises(SlideOpenError, match="folder"):
        open_slide(tmp_path)


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan")])
def test_non_positive_mpp_override_is_refused(fixture_slide, bad):
    with pytest.raises(MppError, match="positive"):
        open_slide(fixture_slide("CMU-1-Small-Region.svs"), mpp=bad)


def test_a_file_is_judged_by_content_not_extension(fixture_slide, tmp_path):
    renamed = tmp_path / "slide.data"
    renamed.write_bytes(fixture_slide("CMU-1-Small-Region.svs").read_bytes())
    with open_slide(renamed) as slide:
        assert slide.dimensions == (2220, 2967)


def test_checksum_is_the_content_sha256(fixture_slide):
    import hashlib

    path = fixture_slide("small.svs")
    assert slide_checksum(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_fast_reads_only_when_tiffslide_decodes_identically(fixture_slide):
    path = fixture_slide("CMU-1-Small-Region.svs")
    with open_slide(path) as slide:
        assert slide.info.backend == "openslide"
        assert slide.info.pixel_backend == "tiffslide"
        fast = slide.read_region((300, 400), (700, 300), 0.5)
    reference = np.asarray(openslide.OpenSlide(str(path)).read_region((300, 400), 0, (700, 300)))
    np.testing.assert_array_equal(fast, reference[..., :3])
