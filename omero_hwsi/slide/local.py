"""Slides in local files: OpenSlide first, tiffslide as a fallback.

A file is judged by opening it, never by its extension. OpenSlide 4 (from the ``openslide-bin``
wheel, no system library) reads SVS, generic TIFF, NDPI, MIRAX, DICOM WSI and more; tiffslide
covers TIFF variants OpenSlide refuses. A fallback must decode a tile before a file is
accepted: some files open in tiffslide and fail only on decoding (unknown compressions).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from omero_hwsi._types import RGBArray
from omero_hwsi.errors import MppError, SlideNotFoundError, SlideOpenError, SlideReadError
from omero_hwsi.slide.reader import (
    BACKGROUND_RGB,
    SlideInfo,
    plan_read,
    resample_area,
    validate_mpp,
)

__all__ = ["LocalSlide", "open_slide", "slide_checksum"]

logger = logging.getLogger(__name__)

_PROBE_PX = 64


def _float_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class LocalSlide:
    """A :class:`~omero_hwsi.slide.reader.SlideReader` over a local file.

    Build it with :func:`open_slide`. Not thread-safe; worker processes open their own.
    """

    def __init__(
        self,
        path: Path,
        handle: Any,
        backend: str,
        *,
        mpp_override: float | None,
        mpp_tolerance: float,
    ) -> None:
        self.path = path
        self._handle = handle
        self._backend = backend
        self._tolerance = mpp_tolerance
        self._fast: Any | None = None
        props = handle.properties
        prefix = "openslide" if backend == "openslide" else "tiffslide"
        mpp_x = _float_or_none(props.get(f"{prefix}.mpp-x"))
        mpp_y = _float_or_none(props.get(f"{prefix}.mpp-y"))
        metadata_mpp = mpp_x if mpp_y is None else mpp_y if mpp_x is None else (mpp_x + mpp_y) / 2
        name = path.name
        if mpp_override is not None:
            mpp = validate_mpp(float(mpp_override), name=name, source="--mpp")
            source = "override"
        elif metadata_mpp is None:
            raise MppError(f"{name}: no MPP in the slide metadata; pass --mpp <um/px> for this slide")
        else:
            mpp = validate_mpp(metadata_mpp, name=name, source="the slide metadata")
            if mpp_x and mpp_y and abs(mpp_x / mpp_y - 1) > mpp_tolerance:
                raise MppError(
                    f"{name}: non-square pixels (MPP x {mpp_x:.4g}, y {mpp_y:.4g} um/px) are not "
                    "supported; pass --mpp <um/px> to use one value"
                )
            source = "metadata"
        self._info = SlideInfo(
            name=name,
            dimensions=tuple(int(v) for v in handle.dimensions),  # type: ignore[arg-type]
            level_count=int(handle.level_count),
            level_dimensions=tuple(tuple(int(v) for v in d) for d in handle.level_dimensions),  # type: ignore[misc]
            level_downsamples=tuple(float(d) for d in handle.level_downsamples),
            mpp=mpp,
            mpp_source=source,  # type: ignore[arg-type]
            metadata_mpp=metadata_mpp,
            vendor=props.get(f"{prefix}.vendor") or None,
            objective_power=_float_or_none(props.get(f"{prefix}.objective-power")),
            backend=backend,
            pixel_backend=backend,
        )

    # -- SlideReader -------------------------------------------------------------------------
    @property
    def info(self) -> SlideInfo:
        return self._info

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._info.dimensions

    @property
    def mpp(self) -> float:
        return self._info.mpp

    @property
    def level_count(self) -> int:
        return self._info.level_count

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._info.level_downsamples

    @property
    def mpp_tolerance(self) -> float:
        return self._tolerance

    def read_region(
        self, xy_level0: tuple[float, float], size: tuple[int, int], mpp: float
    ) -> RGBArray:
        """Read ``size = (w, h)`` pixels at ``mpp`` from level-0 point ``xy_level0``.

        Picks the level with :func:`~omero_hwsi.slide.reader.plan_read`, reads only the part
        inside the slide (the rest is white padding) and area-averages when resampling.

        Raises:
            MppError: the slide is coarser than ``mpp``.
            SlideReadError: the backend fails to decode the pixels.
        """
        out_w, out_h = int(size[0]), int(size[1])
        if out_w <= 0 or out_h <= 0:
            raise ValueError(f"size must be positive, got {size}")
        plan = plan_read(self.mpp, self.level_downsamples, mpp, tolerance=self._tolerance)
        downsample = self.level_downsamples[plan.level]
        level_w, level_h = self._info.level_dimensions[plan.level]
        # Work on the level's own pixel grid: the request in level pixels, then clip to the level.
        lx = float(xy_level0[0]) / downsample
        ly = float(xy_level0[1]) / downsample
        per_out = plan.level0_per_px / downsample
        lw = out_w if not plan.resample else max(1, math.ceil(out_w * per_out))
        lh = out_h if not plan.resample else max(1, math.ceil(out_h * per_out))
        x0, y0 = int(round(lx)), int(round(ly))
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + lw, level_w), min(y0 + lh, level_h)
        canvas = np.full((lh, lw, 3), BACKGROUND_RGB, dtype=np.uint8)
        if cx1 > cx0 and cy1 > cy0:
            pixels = self._read_level(plan.level, cx0, cy0, cx1 - cx0, cy1 - cy0)
            canvas[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = pixels
        return resample_area(canvas, (out_w, out_h)) if plan.resample else canvas

    def close(self) -> None:
        self._handle.close()
        if self._fast is not None:
            self._fast.close()

    def __enter__(self) -> LocalSlide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------
    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> RGBArray:
        """Read a box given in the level's pixels; returns RGB with transparent areas white."""
        handle, backend = (self._fast, "tiffslide") if self._fast is not None else (
            self._handle, self._backend)
        try:
            return _decode(handle, backend, level, self.level_downsamples[level], x, y, w, h)
        except Exception as err:  # backends raise their own zoo of decoder errors
            raise SlideReadError(
                f"{self.path.name}: cannot read pixels at level {level} ({x}, {y}, {w}x{h}): {err}"
            ) from err

    def probe(self) -> None:
        """Decode a small window of the coarsest level, so unreadable files fail early."""
        level = self.level_count - 1
        lw, lh = self._info.level_dimensions[level]
        w, h = min(_PROBE_PX, lw), min(_PROBE_PX, lh)
        self._read_level(level, max(0, (lw - w) // 2), max(0, (lh - h) // 2), w, h)

    def use_fast_reads(self) -> bool:
        """Read pixels with tiffslide when it decodes this file exactly like OpenSlide.

        Why: for plain-JPEG TIFF-based files (most SVS), tiffslide decodes a strip of patches
        about twice as fast as OpenSlide (no ARGB conversion, no PIL round trip), with
        identical pixels. Metadata stays OpenSlide's. The fast path is taken only when the
        pyramids match and windows at the coarsest and finest levels decode to the same bytes;
        otherwise reads stay with OpenSlide.
        """
        if self._backend != "openslide":
            return False
        try:
            import tiffslide

            fast = tiffslide.TiffSlide(str(self.path))
        except Exception:  # not a TIFF tiffslide understands: keep OpenSlide
            return False
        try:
            dims = tuple(tuple(int(v) for v in d) for d in fast.level_dimensions)
            if dims != self._info.level_dimensions:
                raise ValueError("pyramids differ")
            for level in {0, self.level_count - 1}:
                lw, lh = self._info.level_dimensions[level]
                w, h = min(2 * _PROBE_PX, lw), min(2 * _PROBE_PX, lh)
                x, y = max(0, (lw - w) // 2), max(0, (lh - h) // 2)
                ds = self.level_downsamples[level]
                ours = _decode(fast, "tiffslide", level, ds, x, y, w, h)
                reference = _decode(self._handle, "openslide", level, ds, x, y, w, h)
                if not np.array_equal(ours, reference):
                    raise ValueError("pixels differ")
        except Exception:
            fast.close()
            return False
        self._fast = fast
        self._info = replace(self._info, pixel_backend="tiffslide")
        return True


def _decode(
    handle: Any, backend: str, level: int, downsample: float, x: int, y: int, w: int, h: int
) -> RGBArray:
    """RGB pixels of a box in a level's own pixel grid, from either backend."""
    location = (int(round(x * downsample)), int(round(y * downsample)))
    if backend == "openslide":
        rgba = np.asarray(handle.read_region(location, level, (w, h)))
        rgb: RGBArray = np.asarray(cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB), dtype=np.uint8)
        transparent = rgba[..., 3] == 0
        if transparent.any():
            rgb[transparent] = BACKGROUND_RGB
        return rgb
    arr = np.asarray(handle.read_region(location, level, (w, h), as_array=True))
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3], dtype=np.uint8)


def open_slide(
    path: str | os.PathLike[str], *, mpp: float | None = None, mpp_tolerance: float = 0.05
) -> LocalSlide:
    """Open a slide file with OpenSlide, falling back to tiffslide, and check it decodes.

    Args:
        path: the slide file (for multi-file formats, the file OpenSlide expects).
        mpp: microns per pixel of level 0 to use instead of the metadata (per slide).
        mpp_tolerance: relative MPP difference under which pixels are used as they are.

    Raises:
        SlideNotFoundError: ``path`` does not exist.
        SlideOpenError: no backend can open it (unsupported format, truncated file).
        SlideReadError: it opens but its pixels cannot be decoded.
        MppError: the MPP is missing or implausible and no ``mpp`` was given.
    """
    slide_path = Path(path)
    if not slide_path.exists():
        raise SlideNotFoundError(f"{slide_path}: no such file")
    if slide_path.is_dir():
        raise SlideOpenError(f"{slide_path}: is a folder, not a slide file")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise MppError(f"{slide_path.name}: --mpp must be a positive number, got {mpp}")

    import openslide

    try:
        handle: Any = openslide.OpenSlide(str(slide_path))
        backend = "openslide"
    except (openslide.OpenSlideError, OSError) as openslide_err:
        handle, backend = _open_with_tiffslide(slide_path, openslide_err)

    slide = LocalSlide(
        slide_path, handle, backend, mpp_override=mpp, mpp_tolerance=mpp_tolerance
    )
    try:
        slide.probe()
    except SlideReadError:
        slide.close()
        raise
    slide.use_fast_reads()
    logger.debug("opened %s with %s", slide_path, backend)
    return slide


def _open_with_tiffslide(path: Path, openslide_err: BaseException) -> tuple[Any, str]:
    """Open with tiffslide and decode one tile; otherwise report OpenSlide's own reason."""
    message = f"{path.name}: unsupported or corrupt slide format ({openslide_err})"
    try:
        import tiffslide

        handle = tiffslide.TiffSlide(str(path))
    except Exception as err:  # tifffile raises many types for non-TIFF input
        raise SlideOpenError(message) from err
    try:
        level = handle.level_count - 1
        lw, lh = handle.level_dimensions[level]
        handle.read_region((0, 0), level, (min(_PROBE_PX, lw), min(_PROBE_PX, lh)), as_array=True)
    except Exception as err:
        handle.close()
        raise SlideOpenError(message) from err
    return handle, "tiffslide"


def slide_checksum(path: str | os.PathLike[str], *, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 of a slide's bytes, the identity of its content in keys and provenance.

    For multi-file formats whose data sits in a sibling folder named after the file (MIRAX),
    the folder's files are hashed too, in name order.
    """
    main = Path(path)
    files = [main]
    sibling = main.with_suffix("")
    if sibling != main and sibling.is_dir():
        files += sorted(p for p in sibling.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        if file is not main:
            digest.update(str(file.relative_to(sibling)).encode())
        with file.open("rb") as handle:
            while chunk := handle.read(chunk_bytes):
                digest.update(chunk)
    return digest.hexdigest()
