"""The synthetic SVS writer: readers see a real Aperio slide, content is local and reproducible."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import openslide
import pytest
import tiffslide

from omero_hwsi.synthetic import SyntheticTissue, TileRenderer, write_svs

W, H = 3000, 2000


def _rgb(region: object) -> npt.NDArray[np.int16]:
    """A PIL image from either reader as an int array (no uint8 wrap-around in differences)."""
    return np.asarray(region.convert("RGB")).astype(np.int16)  # type: ignore[attr-defined]


def _saturated(rgb: npt.NDArray[np.integer]) -> npt.NDArray[np.bool_]:
    """HSV saturation > 0.1: stained tissue is; white/grey glass is not."""
    hi = rgb.max(axis=-1).astype(np.float32)
    lo = rgb.min(axis=-1).astype(np.float32)
    return (hi - lo) / np.maximum(hi, 1.0) > 0.1


def _level(slide: openslide.OpenSlide, level: int) -> npt.NDArray[np.int16]:
    return _rgb(slide.read_region((0, 0), level, slide.level_dimensions[level]))


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One default slide shared by the read-only tests (writing is the slow part)."""
    return write_svs(tmp_path_factory.mktemp("svs") / "slide.svs", width=W, height=H, seed=7)


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mpp", [0.5, 0.25])
def test_openslide_sees_aperio_with_requested_mpp_and_levels(tmp_path: Path, mpp: float) -> None:
    path = write_svs(tmp_path / "s.svs", width=W, height=H, mpp=mpp, downsamples=(1, 4, 16))

    with openslide.OpenSlide(path) as slide:
        props = slide.properties
        assert props["openslide.vendor"] == "aperio"
        assert abs(float(props["openslide.mpp-x"]) - mpp) < 1e-3
        assert abs(float(props["openslide.mpp-y"]) - mpp) < 1e-3
        assert float(props["openslide.objective-power"]) == round(10 / mpp)
        assert slide.dimensions == (W, H)
        assert slide.level_count == 3
        assert slide.level_dimensions == ((W, H), (W // 4, H // 4), (W // 16, H // 16))
        for got, want in zip(slide.level_downsamples, (1, 4, 16)):
            assert got == pytest.approx(want, rel=0.01)
        assert "thumbnail" in slide.associated_images


def test_objective_power_and_tile_size_are_honoured(tmp_path: Path) -> None:
    path = write_svs(
        tmp_path / "s.svs", width=1000, height=700, objective_power=40, tile_px=128, quality=70
    )
    with openslide.OpenSlide(path) as slide:
        assert slide.properties["openslide.objective-power"] == "40"
        assert slide.properties["openslide.level[0].tile-width"] == "128"
        assert "Q=70" in slide.properties["openslide.comment"]


def test_levels_below_one_pixel_are_skipped(tmp_path: Path) -> None:
    path = write_svs(tmp_path / "tiny.svs", width=100, height=60, downsamples=(1, 4, 16, 64, 128))
    with openslide.OpenSlide(path) as slide:
        assert slide.level_dimensions == ((100, 60), (25, 15), (6, 3))


def test_tiffslide_reads_the_same_slide_and_pixels(slide_path: Path) -> None:
    with openslide.OpenSlide(slide_path) as ref, tiffslide.TiffSlide(slide_path) as slide:
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.5, abs=1e-3)
        assert slide.level_count == ref.level_count
        assert slide.level_dimensions == ref.level_dimensions
        for level, (location, size) in enumerate([((1000, 700), (600, 500)), ((0, 0), (750, 500))]):
            a = _rgb(slide.read_region(location, level, size))
            b = _rgb(ref.read_region(location, level, size))
            assert np.abs(a - b).mean() < 2.0


def test_pixels_match_the_renderer_up_to_jpeg_loss(slide_path: Path) -> None:
    renderer = SyntheticTissue(W, H, mpp=0.5, seed=7)
    with openslide.OpenSlide(slide_path) as slide:
        got = _rgb(slide.read_region((1100, 900), 0, (300, 200)))
    want = renderer.render(1100, 900, 300, 200, 1.0).astype(np.int16)
    assert np.abs(got - want).mean() < 4.0


# --------------------------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------------------------
def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    a = write_svs(tmp_path / "a.svs", width=1200, height=800, seed=3)
    b = write_svs(tmp_path / "b.svs", width=1200, height=800, seed=3)
    c = write_svs(tmp_path / "c.svs", width=1200, height=800, seed=4)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    with openslide.OpenSlide(a) as sa, openslide.OpenSlide(c) as sc:
        assert np.abs(_level(sa, 1) - _level(sc, 1)).mean() > 5.0


def test_blank_slide_has_no_tissue(tmp_path: Path) -> None:
    path = write_svs(tmp_path / "blank.svs", width=W, height=H, content="blank")
    with openslide.OpenSlide(path) as slide:
        for level in range(slide.level_count):
            pixels = _level(slide, level)
            assert _saturated(pixels).mean() < 0.001
            assert pixels.mean() > 230  # bright glass


def test_tissue_covers_a_plausible_fraction(slide_path: Path) -> None:
    with openslide.OpenSlide(slide_path) as slide:
        fraction = _saturated(_level(slide, 2)).mean()
    assert 0.10 < fraction < 0.80


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_slides_still_get_tissue_and_nuclei(seed: int) -> None:
    renderer = SyntheticTissue(W, H, mpp=0.5, seed=seed)
    overview = renderer.render(0, 0, W // 10, H // 10, 10.0)
    assert 0.10 < _saturated(overview).mean() < 0.80
    # Nuclei: dark blue-purple pixels (blue well above green) inside the tissue at full res.
    ys, xs = np.nonzero(_saturated(overview))
    cx, cy = int(np.median(xs)) * 10, int(np.median(ys)) * 10
    window = renderer.render(cx - 128, cy - 128, 256, 256, 1.0).astype(np.int16)
    nuclear = (window[..., 2] - window[..., 1] > 50) & (window.sum(axis=-1) < 400)
    assert 0.01 < nuclear.mean() < 0.5


def test_level1_looks_like_downsampled_level0(slide_path: Path) -> None:
    with openslide.OpenSlide(slide_path) as slide:
        overview = _level(slide, 2)
        ys, xs = np.nonzero(_saturated(overview))
        # A 1024-px level-0 window around the tissue's median position.
        x0 = int(np.clip(np.median(xs) * 16 - 512, 0, W - 1024))
        y0 = int(np.clip(np.median(ys) * 16 - 512, 0, H - 1024))
        full = _rgb(slide.read_region((x0, y0), 0, (1024, 1024)))
        down = _rgb(slide.read_region((x0, y0), 1, (256, 256)))
    assert _saturated(full).mean() > 0.5  # really a tissue window
    assert np.abs(full.reshape(-1, 3).mean(0) - down.reshape(-1, 3).mean(0)).max() < 15
    # And locally, not just on average: 4x4 block means of level 0 vs level 1 pixels.
    blocks = full.reshape(256, 4, 256, 4, 3).mean(axis=(1, 3))
    assert np.abs(blocks - down).mean() < 25


def test_windows_render_independently() -> None:
    """A tile cut from a big render equals the tile rendered alone: tiles are local."""
    renderer = SyntheticTissue(W, H, mpp=0.5, seed=5)
    assert isinstance(renderer, TileRenderer)
    for step in (1.0, 4.0):
        big = renderer.render(1000, 600, 400, 300, step).astype(np.int16)
        part = renderer.render(1000 + 130 * step, 600 + 70 * step, 64, 48, step).astype(np.int16)
        assert part.shape == (48, 64, 3) and part.dtype == np.int16
        assert np.abs(big[70:118, 130:194] - part).max() <= 1


def test_nuclei_scale_with_mpp() -> None:
    """Halving mpp doubles nuclei in pixels: the same micron window has the same look."""
    coarse = SyntheticTissue(W, H, mpp=0.5, seed=2)
    fine = SyntheticTissue(2 * W, 2 * H, mpp=0.25, seed=2)
    a = coarse.render(1300, 900, 256, 256, 1.0).reshape(-1, 3).mean(0)
    b = fine.render(2600, 1800, 256, 256, 2.0).reshape(-1, 3).mean(0)
    assert np.abs(a - b).max() < 3


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
class _Failing:
    """Renders glass, then fails: a crash in the middle of a write."""

    def __init__(self, after: int) -> None:
        self.calls = 0
        self.after = after

    def render(self, x0: float, y0: float, w: int, h: int, step: float) -> npt.NDArray[np.uint8]:
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("renderer exploded")
        return np.full((h, w, 3), 240, dtype=np.uint8)


def test_failure_mid_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out" / "s.svs"
    with pytest.raises(RuntimeError, match="exploded"):
        write_svs(target, width=W, height=H, renderer=_Failing(after=20))
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_failure_keeps_a_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "s.svs"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        write_svs(target, width=1000, height=1000, renderer=_Failing(after=3))
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["s.svs"]


def test_custom_renderer_with_wrong_shape_is_rejected(tmp_path: Path) -> None:
    class Wrong:
        def render(
            self, x0: float, y0: float, w: int, h: int, step: float
        ) -> npt.NDArray[np.uint8]:
            return np.zeros((h, w), dtype=np.uint8)

    with pytest.raises(ValueError, match="renderer returned"):
        write_svs(tmp_path / "s.svs", width=500, height=500, renderer=Wrong())
    assert list(tmp_path.iterdir()) == []


def test_custom_renderer_content_is_written(tmp_path: Path) -> None:
    class Gradient:
        def render(
            self, x0: float, y0: float, w: int, h: int, step: float
        ) -> npt.NDArray[np.uint8]:
            xs = x0 + (np.arange(w) + 0.5) * step
            red = np.clip(xs / 1000 * 255, 0, 255).astype(np.uint8)
            out = np.zeros((h, w, 3), dtype=np.uint8)
            out[..., 0] = red[None, :]
            return out

    path = write_svs(tmp_path / "g.svs", width=1000, height=300, renderer=Gradient())
    with openslide.OpenSlide(path) as slide:
        row = _rgb(slide.read_region((0, 150), 0, (1000, 1)))[0, :, 0]
    assert abs(int(row[10]) - 3) <= 3 and abs(int(row[990]) - 253) <= 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 0},
        {"height": -5},
        {"width": 10.5},
        {"mpp": 0.0},
        {"mpp": -0.5},
        {"mpp": float("nan")},
        {"downsamples": ()},
        {"downsamples": (2, 4)},
        {"downsamples": (1, 4, 4)},
        {"downsamples": (1, 8, 4)},
        {"downsamples": (1, 2.5)},
        {"tile_px": 100},
        {"tile_px": 0},
        {"quality": 0},
        {"quality": 101},
        {"objective_power": 0},
        {"content": "tumour"},
    ],
)
def test_bad_arguments_raise_value_error(tmp_path: Path, kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"width": 500, "height": 400} | kwargs
    with pytest.raises(ValueError):
        write_svs(tmp_path / "s.svs", **args)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 0, "height": 10},
        {"width": 10, "height": 10, "mpp": 0},
        {"width": 10, "height": 10, "tissue_fraction": 1.5},
    ],
)
def test_renderer_bad_arguments_raise_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SyntheticTissue(**kwargs)  # type: ignore[arg-type]
