"""The ``SlideReader`` contract and the pure rules for reading at a physical resolution.

Every size in this project is a pixel count at a stated microns-per-pixel (MPP), never a pyramid
level or a "magnification". A reader serves ``read_region(xy_level0, size, mpp)``: the caller
names where (level-0 pixels) and at what resolution; the reader picks the pyramid level and
resamples. The rules live here as pure functions so every implementation (local files, OMERO
pixels) reads the same pixels for the same request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import cv2
import numpy as np

from omero_hwsi._types import RGBArray
from omero_hwsi.errors import MppError

__all__ = [
    "MPP_PLAUSIBLE_RANGE",
    "ReadPlan",
    "SlideInfo",
    "SlideReader",
    "plan_for",
    "plan_read",
    "read_thumbnail",
    "resample_area",
    "validate_mpp",
]

MPP_PLAUSIBLE_RANGE = (0.05, 20.0)
"""Microns per pixel outside this range come from broken metadata, not from a microscope."""

BACKGROUND_RGB = 255
"""Value used for pixels outside the slide (padding) and for transparent pixels: white glass."""


@dataclass(frozen=True, slots=True)
class SlideInfo:
    """What a slide is: size, pyramid, vendor and resolution, as reported by its backend."""

    name: str
    dimensions: tuple[int, int]
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float
    mpp_source: Literal["metadata", "override"]
    metadata_mpp: float | None
    vendor: str | None
    objective_power: float | None
    backend: str
    pixel_backend: str
    """Backend that decodes pixels: tiffslide when it matches OpenSlide exactly (faster)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (used by ``hwsi info --json`` and provenance)."""
        return {
            "name": self.name,
            "width": self.dimensions[0],
            "height": self.dimensions[1],
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
            "level_mpp": [self.mpp * d for d in self.level_downsamples],
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "metadata_mpp": self.metadata_mpp,
            "vendor": self.vendor,
            "objective_power": self.objective_power,
            "backend": self.backend,
            "pixel_backend": self.pixel_backend,
        }


@runtime_checkable
class SlideReader(Protocol):
    """A whole-slide image that can be read at any physical resolution.

    Implementations: :class:`omero_hwsi.slide.local.LocalSlide` (files) and, later, a reader
    over OMERO's pixel service.
    """

    @property
    def info(self) -> SlideInfo: ...

    @property
    def dimensions(self) -> tuple[int, int]: ...

    @property
    def mpp(self) -> float: ...

    @property
    def level_count(self) -> int: ...

    @property
    def level_downsamples(self) -> tuple[float, ...]: ...

    @property
    def mpp_tolerance(self) -> float:
        """Relative MPP difference under which a level's pixels are used without resampling."""
        ...

    def read_region(
        self, xy_level0: tuple[float, float], size: tuple[int, int], mpp: float
    ) -> RGBArray:
        """Read ``size = (w, h)`` pixels at ``mpp`` starting at level-0 point ``xy_level0``.

        Pixels outside the slide are white. Returns uint8 ``(h, w, 3)``.
        """
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """How a reader serves one target MPP: which level, and whether pixels are resampled.

    ``level0_per_px`` is the level-0 extent of one output pixel. When the chosen level is within
    tolerance of the target, its pixels are used as they are and ``level0_per_px`` is exactly
    that level's downsample, so boxes stay aligned with stored pixels.
    """

    level: int
    level_mpp: float
    level0_per_px: float
    resample: bool


def validate_mpp(mpp: float, *, name: str, source: str) -> float:
    """Check an MPP value is plausible; the error names the slide and the ``--mpp`` fix.

    Raises:
        MppError: the value is not finite or lies outside :data:`MPP_PLAUSIBLE_RANGE`.
    """
    lo, hi = MPP_PLAUSIBLE_RANGE
    if not math.isfinite(mpp) or mpp <= 0:
        raise MppError(f"{name}: MPP {mpp} um/px from {source} is not a positive number")
    if not lo <= mpp <= hi:
        raise MppError(
            f"{name}: MPP {mpp:.4g} um/px from {source} is implausible (outside {lo}-{hi} um/px); "
            "pass --mpp <um/px> for this slide"
        )
    return mpp


def plan_read(
    slide_mpp: float, level_downsamples: tuple[float, ...], target_mpp: float, *, tolerance: float
) -> ReadPlan:
    """Choose the coarsest level whose MPP is <= ``target_mpp * (1 + tolerance)``.

    Resampling (area averaging) happens only when that level's MPP differs from the target by
    more than ``tolerance`` (relative).

    Raises:
        MppError: the slide's finest level is coarser than the target (upsampling would invent
            detail), or ``target_mpp`` is not positive.
    """
    if not math.isfinite(target_mpp) or target_mpp <= 0:
        raise MppError(f"target MPP must be a positive number, got {target_mpp}")
    limit = target_mpp * (1.0 + tolerance)
    best: int | None = None
    for level, downsample in enumerate(level_downsamples):
        if slide_mpp * downsample <= limit and (
            best is None or downsample > level_downsamples[best]
        ):
            best = level
    if best is None:
        raise MppError(
            f"slide resolution {slide_mpp:.4g} um/px is coarser than the requested "
            f"{target_mpp:.4g} um/px; use a slide scanned at a finer resolution"
        )
    level_mpp = slide_mpp * level_downsamples[best]
    if abs(level_mpp / target_mpp - 1.0) <= tolerance:
        return ReadPlan(best, level_mpp, float(level_downsamples[best]), resample=False)
    return ReadPlan(best, level_mpp, target_mpp / slide_mpp, resample=True)


def resample_area(pixels: RGBArray, size: tuple[int, int]) -> RGBArray:
    """Resize to ``size = (w, h)`` by area averaging (the right filter for downsampling)."""
    w, h = size
    if pixels.shape[1] == w and pixels.shape[0] == h:
        return pixels
    return np.ascontiguousarray(cv2.resize(pixels, (w, h), interpolation=cv2.INTER_AREA))


def plan_for(reader: SlideReader, target_mpp: float) -> ReadPlan:
    """:func:`plan_read` for ``reader`` with its own MPP and tolerance."""
    return plan_read(
        reader.mpp, reader.level_downsamples, target_mpp, tolerance=reader.mpp_tolerance
    )


def read_thumbnail(reader: SlideReader, mpp: float, *, max_read_px: int = 4096) -> RGBArray:
    """The whole slide at ``mpp`` (coarser than the slide), read block by block.

    Blocks are sized so that no single read exceeds ``max_read_px`` pixels per side at the
    chosen level: memory stays bounded even on single-level slides of 100k px.
    """
    width, height = reader.dimensions
    plan = plan_for(reader, mpp)
    out_w = max(1, math.ceil(width / plan.level0_per_px))
    out_h = max(1, math.ceil(height / plan.level0_per_px))
    level_px_per_out = plan.level0_per_px / reader.level_downsamples[plan.level]
    block = max(16, int(max_read_px / max(level_px_per_out, 1.0)))
    thumb = np.empty((out_h, out_w, 3), dtype=np.uint8)
    for y in range(0, out_h, block):
        for x in range(0, out_w, block):
            bw, bh = min(block, out_w - x), min(block, out_h - y)
            thumb[y : y + bh, x : x + bw] = reader.read_region(
                (x * plan.level0_per_px, y * plan.level0_per_px), (bw, bh), mpp
            )
    return thumb
