"""Reading an OMERO image's pixels tile by tile through the server's pyramid.

Why this exists: images whose original files OpenSlide cannot read (OME-TIFF, formats only
Bio-Formats knows) are still served by OMERO's pixels service.
:func:`~omero_hwsi.omero.pull.materialize_pixels` turns such an image into a local pyramidal
SVS, so the rest of the pipeline stays one code path (``open_slide`` on a file). This module
is the reading half: it never asks for a whole plane (a WSI plane is far over Ice's message
limit), only for pieces of the server's own tiles, at the resolution level that best matches
the scale being written.

OMERO numbers resolution levels backwards: ``setResolutionLevel(n)`` with the *highest* ``n`` is
full resolution, while ``getResolutionDescriptions()`` lists sizes full resolution *first*. Here
levels follow OpenSlide's convention (0 = full resolution) and are translated at the call.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Final

import numpy as np

from omero_hwsi._types import RGBArray
from omero_hwsi.errors import HwsiError, InputError, OmeroNotFoundError, ServiceError
from omero_hwsi.slide.reader import BACKGROUND_RGB, plan_read, resample_area

__all__ = ["OmeroPixelsReader", "open_pixels", "pixel_size_um"]

MAX_READ_PX: Final = 2048
"""Longest side, in level pixels, of one window read while rendering a resampled tile: memory
stays bounded even when the server's pyramid stops far above the scale being written."""
LEVEL_TOLERANCE: Final = 0.01
"""A level whose downsample is this close (relative) to the requested step is used unresampled;
OMERO's level sizes are rounded, so exact factors show up as 2.0007 and the like."""

_TO_MICRONS: Final = {"ANGSTROM": 1e-4, "PICOMETER": 1e-6, "NANOMETER": 1e-3,
                      "MICROMETER": 1.0, "MILLIMETER": 1e3, "CENTIMETER": 1e4, "METER": 1e6}


def pixel_size_um(length: Any) -> float | None:
    """Microns per pixel from an OMERO ``Length`` (``pixels.getPhysicalSizeX()``), or None.

    The unit is honoured when the object tells it (``getUnit()``); a unit that is not a length
    (``PIXEL``, ``REFERENCEFRAME``), a missing value or a non-positive one count as unknown.
    """
    if length is None:
        return None
    value = length.getValue()
    unit_getter = getattr(length, "getUnit", None)
    factor = _TO_MICRONS.get(str(unit_getter()).rsplit(".", 1)[-1], 0.0) if unit_getter else 1.0
    microns = float(value) * factor if value is not None else 0.0
    return microns if math.isfinite(microns) and microns > 0 else None


class OmeroPixelsReader:
    """Windows of an 8-bit RGB OMERO image at any of its resolution levels.

    Build it with :func:`open_pixels`. One ``RawPixelsStore`` is shared and guarded by a lock:
    the store is stateful (its current resolution level), and ``write_svs`` renders from
    several threads. It is also a ``TileRenderer`` (:meth:`render`), so ``write_svs`` can copy
    the image into a local SVS.

    Attributes:
        name: for messages (``OMERO image 12 (slide.ome.tiff)``).
        level_dimensions: ``(width, height)`` per level, full resolution first.
        level_downsamples: level-0 pixels per level pixel (mean of x and y, like OpenSlide).
        tile_size: the server's tile ``(width, height)``; reads never cross a server tile.
        pixel_size_um: the recorded microns per pixel, or None.
    """

    def __init__(self, store: Any, *, name: str, size: tuple[int, int],
                 pixel_size_um: float | None) -> None:
        self.name = name
        self.pixel_size_um = pixel_size_um
        self._store = store
        self._lock = threading.Lock()
        # Like OMERO's own renderer: descriptions of an image without a pyramid can be very
        # expensive for the server to compute, and say nothing the pixels' size does not.
        sizes = [(int(d.sizeX), int(d.sizeY)) for d in store.getResolutionDescriptions()] \
            if int(store.getResolutionLevels()) > 1 else [size]
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(sizes)
        full_w, full_h = sizes[0]
        self.level_downsamples: tuple[float, ...] = tuple(
            (full_w / w + full_h / h) / 2 for w, h in sizes)
        tile_w, tile_h = (int(v) for v in store.getTileSize())
        self.tile_size = (tile_w, tile_h)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def read_window(self, level: int, x: int, y: int, w: int, h: int) -> RGBArray:
        """``(h, w, 3)`` uint8 pixels of ``level`` from its pixel ``(x, y)``; outside is white.

        Raises:
            ServiceError: the server failed or sent a tile of the wrong size.
        """
        level_w, level_h = self.level_dimensions[level]
        out = np.full((h, w, 3), BACKGROUND_RGB, dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, level_w), min(y + h, level_h)
        if x1 <= x0 or y1 <= y0:
            return out
        tile_w, tile_h = self.tile_size
        try:
            with self._lock:
                self._store.setResolutionLevel(len(self.level_dimensions) - 1 - level)
                for ty in range(y0 - y0 % tile_h, y1, tile_h):
                    for tx in range(x0 - x0 % tile_w, x1, tile_w):
                        bx0, by0 = max(tx, x0), max(ty, y0)
                        bx1, by1 = min(tx + tile_w, x1), min(ty + tile_h, y1)
                        block = out[by0 - y : by1 - y, bx0 - x : bx1 - x]
                        for channel in range(3):
                            block[..., channel] = self._tile(channel, bx0, by0,
                                                             bx1 - bx0, by1 - by0)
        except HwsiError:
            raise
        except Exception as err:  # Ice errors at this edge become one line
            raise ServiceError(f"{self.name}: reading pixels at level {level} ({x}, {y}, "
                               f"{w}x{h}) from OMERO failed ({type(err).__name__}: {err})") from err
        return out

    def _tile(self, channel: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        raw = self._store.getTile(0, channel, 0, x, y, w, h)
        if len(raw) != w * h:
            raise ServiceError(f"{self.name}: OMERO sent {len(raw)} bytes for a {w}x{h} tile of "
                               f"channel {channel}; expected {w * h}")
        return np.frombuffer(raw, dtype=np.uint8).reshape(h, w)

    def render(self, x0: float, y0: float, w: int, h: int, step: float) -> RGBArray:
        """The window ``write_svs`` asks for (see :class:`~omero_hwsi.synthetic.TileRenderer`).

        Reads from the coarsest level not coarser than ``step`` (the rule of
        :func:`~omero_hwsi.slide.reader.plan_read`): as it is when that level matches, else
        area-averaged, block by block so no read exceeds :data:`MAX_READ_PX` per side.
        """
        plan = plan_read(1.0, self.level_downsamples, step, tolerance=LEVEL_TOLERANCE)
        downsample = self.level_downsamples[plan.level]
        if not plan.resample:
            return self.read_window(plan.level, round(x0 / downsample), round(y0 / downsample),
                                    w, h)
        ratio = step / downsample
        block = max(1, int(MAX_READ_PX / ratio))
        out = np.empty((h, w, 3), dtype=np.uint8)
        for by in range(0, h, block):
            for bx in range(0, w, block):
                bw, bh = min(block, w - bx), min(block, h - by)
                lx, ly = (x0 + bx * step) / downsample, (y0 + by * step) / downsample
                ix, iy = math.floor(lx), math.floor(ly)
                iw = max(1, math.ceil(lx + bw * ratio) - ix)
                ih = max(1, math.ceil(ly + bh * ratio) - iy)
                window = self.read_window(plan.level, ix, iy, iw, ih)
                out[by : by + bh, bx : bx + bw] = resample_area(window, (bw, bh))
        return out

    def close(self) -> None:
        """Close the server-side store (it holds resources on the server until then)."""
        self._store.close()

    def __enter__(self) -> OmeroPixelsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_pixels(conn: Any, image_id: int) -> OmeroPixelsReader:
    """An :class:`OmeroPixelsReader` over image ``image_id``'s primary pixels.

    Raises:
        OmeroNotFoundError: no such image, or the user cannot see it.
        InputError: the pixels are not 3 channels of uint8 (one line).
        ServiceError: the server refused to open a pixels store.
    """
    image = conn.getObject("Image", image_id)
    if image is None:
        raise OmeroNotFoundError(f"OMERO image {image_id}: not found, or not visible to you")
    name = f"OMERO image {image_id} ({image.getName()})"
    pixels = image.getPrimaryPixels()
    channels = int(pixels.getSizeC())
    kind = str(pixels.getPixelsType().getValue())
    if channels != 3 or kind != "uint8":
        raise InputError(f"{name}: {channels} channel(s) of {kind}; only 8-bit RGB slides are "
                         "supported through the pixels service")
    store = conn.createRawPixelsStore()
    try:
        store.setPixelsId(int(pixels.getId()), False, conn.SERVICE_OPTS)
        return OmeroPixelsReader(store, name=name,
                                 size=(int(pixels.getSizeX()), int(pixels.getSizeY())),
                                 pixel_size_um=pixel_size_um(pixels.getPhysicalSizeX()))
    except Exception as err:
        store.close()
        if isinstance(err, HwsiError):
            raise
        raise ServiceError(f"{name}: OMERO cannot open its pixels ({type(err).__name__}: "
                           f"{err})") from err
