"""Synthetic Aperio SVS slides for tests, demos and benchmarks.

Real whole-slide images are large, licence-encumbered and slow to download, yet most of the
pipeline (opening, tiling, tissue detection, nucleus sampling, feature extraction) only needs
*something that looks and behaves like* an H&E slide. This module writes such slides on the fly:

* :class:`SyntheticTissue` paints glass, a few smooth tissue sections in eosin pink and
  haematoxylin nuclei. Every pixel is a pure function of its level-0 position and the seed, so
  any window of any pyramid level can be rendered on its own: tiles are generated locally and
  a 40,000 x 40,000 px slide never has to exist in memory.
* :func:`write_svs` streams the rendered tiles into a tiled, JPEG-compressed, pyramidal TIFF
  with Aperio's ImageDescription conventions, so OpenSlide (vendor ``aperio``) and tiffslide
  open it exactly like a scanner's file, with the requested microns per pixel and downsamples.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import imagecodecs
import numpy as np
import numpy.typing as npt
import tifffile

from omero_hwsi._io import atomic_write

__all__ = ["SyntheticTissue", "TileRenderer", "write_svs"]

# --------------------------------------------------------------------------------------------
# Colours (RGB, 0-255). Linear blends of these are a cheap stand-in for Beer-Lambert mixing and
# land in the ranges stain-based tissue detectors and colour normalisers expect.
# --------------------------------------------------------------------------------------------
_GLASS = np.array([242.0, 242.0, 240.0], dtype=np.float32)
_EOSIN = np.array([230.0, 150.0, 190.0], dtype=np.float32)
_HAEMATOXYLIN = np.array([80.0, 50.0, 140.0], dtype=np.float32)

_CELL_UM = 20.0
"""Side of the square cell that holds at most one nucleus: ~ the size of a real cell."""
_NUCLEUS_SEMI_AXIS_UM = (3.0, 5.0)
"""Range of a nucleus's semi-major axis, i.e. 6-10 um diameters as in H&E."""
_THUMBNAIL_PX = 768
"""Long side of the stripped thumbnail IFD, the size Aperio scanners write."""
_BLOCK_SAMPLES = 256
"""Side, in samples, of the square blocks a window is rendered in."""
_NOISE_SHAPE = (509, 521)
"""Prime sides of the noise table: its repeat never lines up with tiles or levels."""

_Coords = npt.NDArray[np.floating[Any]]
"""1-D level-0 sample positions along one axis."""

_U64 = np.uint64
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


# --------------------------------------------------------------------------------------------
# Renderer protocol
# --------------------------------------------------------------------------------------------
@runtime_checkable
class TileRenderer(Protocol):
    """Anything that can paint an arbitrary window of a slide, at any scale, on its own.

    :func:`write_svs` asks for one tile at a time (possibly from several threads at once), so an
    implementation must be a pure, thread-safe function of its arguments. Windows of edge
    tiles extend past the slide's right and bottom borders; those pixels are written into the
    TIFF's tile padding and never shown, so anything plausible will do there.
    """

    def render(self, x0: float, y0: float, w: int, h: int, step: float) -> npt.NDArray[np.uint8]:
        """Return the RGB window of shape ``(h, w, 3)``, dtype ``uint8``.

        Args:
            x0: Left edge of the window, in level-0 pixels.
            y0: Top edge of the window, in level-0 pixels.
            w: Window width in output pixels.
            h: Window height in output pixels.
            step: Level-0 pixels per output pixel (the level's downsample); pixel ``(i, j)``
                covers level-0 position ``(x0 + (j + 0.5) * step, y0 + (i + 0.5) * step)``.
        """
        ...


# --------------------------------------------------------------------------------------------
# Small deterministic helpers
# --------------------------------------------------------------------------------------------
def _mix64_scalar(z: int) -> int:
    """SplitMix64 finaliser on a Python int: derives independent stream keys from the seed."""
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix64(z: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Vectorised SplitMix64 finaliser; uint64 arrays wrap on overflow, which is intended."""
    z = z + _U64(_GOLDEN)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _unit(z: npt.NDArray[np.uint64]) -> npt.NDArray[np.float32]:
    """Map hashes to uniforms in [0, 1) using their top 24 bits (exact in float32)."""
    return (z >> _U64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))


class _Waves:
    """A sum of plane waves ``sum_k amp_k cos(kx_k x + ky_k y + phase_k)``.

    Sums of a few random waves are smooth, cheap, and defined everywhere, which is what a
    locally renderable texture needs. On a separable pixel grid each wave factors into an
    x-part times a y-part, so a whole window costs one small rank-2K product instead of K
    full-size trigonometric evaluations.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        n: int,
        wavelength_px: tuple[float, float],
        amplitude: float,
        direction: tuple[float, float] = (0.0, math.pi),
    ) -> None:
        lo, hi = wavelength_px
        wavelengths = np.exp(rng.uniform(math.log(lo), math.log(hi), n))
        angles = rng.uniform(direction[0], direction[1], n)
        k = 2.0 * math.pi / wavelengths
        self.kx = k * np.cos(angles)
        self.ky = k * np.sin(angles)
        self.phase = rng.uniform(0.0, 2.0 * math.pi, n)
        # Equal shares keep the total within +-amplitude however many waves there are.
        self.amp = np.full(n, amplitude / n)

    @classmethod
    def concat(cls, parts: Sequence[_Waves]) -> _Waves:
        """One wave set summing several, so a window pays for a single evaluation."""
        joined = cls.__new__(cls)
        for name in ("kx", "ky", "phase", "amp"):
            setattr(joined, name, np.concatenate([getattr(p, name) for p in parts]))
        return joined

    def grid(self, xs: _Coords, ys: _Coords, spacing: float = 1.0) -> npt.NDArray[np.float32]:
        """Evaluate on the grid ``ys x xs`` (level-0 positions); returns ``(len(ys), len(xs))``.

        Each sample stands for a ``spacing``-wide square, so every wave is box-filtered
        analytically (its amplitude times a sinc per axis): coarse levels then show the
        average of fine texture instead of moire.

        Uses ``cos(a + b) = cos a cos b - sin a sin b`` and a plain ``einsum`` (not BLAS
        ``matmul``): tiny products are much slower through a multithreaded BLAS, and the
        result must not depend on BLAS threading.
        """
        width = spacing / (2.0 * math.pi)
        amp = self.amp * np.sinc(self.kx * width) * np.sinc(self.ky * width)
        ax = self.kx[:, None] * xs[None, :] + self.phase[:, None]
        ay = self.ky[:, None] * ys[None, :]
        right = np.concatenate([np.cos(ax), np.sin(ax)]).astype(np.float32)
        left = np.concatenate([np.cos(ay).T * amp, np.sin(ay).T * -amp], axis=1)
        return np.asarray(np.einsum("ik,kj->ij", left.astype(np.float32), right), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# The built-in H&E look-alike
# --------------------------------------------------------------------------------------------
class SyntheticTissue:
    """Deterministic, locally renderable H&E look-alike: glass, tissue sections and nuclei.

    The picture is built from fields that can be evaluated at any position without looking at
    neighbours, which is what lets :func:`write_svs` stream tiles of a huge slide:

    * a *tissue field*: the union of a few large ellipses, bent by long waves (lobes) and
      roughened by short ones (ragged edges). Its threshold is calibrated once, on a coarse
      grid, so that the requested fraction of the slide is tissue whatever its size;
    * eosin density modulated by fibre-like waves, slow staining variation and pixel noise,
      with a few white holes (lumens, fat);
    * at most one nucleus per 20 x 20 um cell, its presence, shape, position and darkness drawn
      from a hash of ``(seed, cell_x, cell_y)``. A nucleus never leaves its cell, so a window
      only needs the nuclei of the cells it overlaps. Sizes are in microns, so pixels scale
      with ``1 / mpp`` like a real scan.

    Coarse steps are anti-aliased by averaging a few samples per output pixel, so low pyramid
    levels look like blurred level 0 rather than a sparse sample of it.

    Output is a pure function of the arguments and the seed (for a given numpy build; no BLAS
    is involved), and the object is immutable after construction, hence safe to share between
    threads.

    Attributes:
        width: Slide width in level-0 pixels.
        height: Slide height in level-0 pixels.
        mpp: Microns per level-0 pixel.
        seed: Seed of every random choice.
        tissue_fraction: Fraction of the slide calibrated to be tissue (0 means blank glass).
    """

    def __init__(
        self,
        width: int,
        height: int,
        *,
        mpp: float = 0.5,
        seed: int = 0,
        tissue_fraction: float | None = None,
    ) -> None:
        """Draw the slide's global layout from ``seed``.

        Args:
            width: Slide width in level-0 pixels (> 0).
            height: Slide height in level-0 pixels (> 0).
            mpp: Microns per level-0 pixel (> 0); sets the pixel size of cells and nuclei.
            seed: Any integer; equal seeds give identical pictures.
            tissue_fraction: Fraction of the slide area to cover with tissue, in ``[0, 0.9]``.
                ``None`` draws it from the seed in ``[0.35, 0.5]``; ``0`` paints glass only,
                for "no tissue" cases.

        Raises:
            ValueError: On a non-positive size or mpp, or a fraction outside ``[0, 0.9]``.
        """
        _check_size("width", width)
        _check_size("height", height)
        _check_positive("mpp", mpp)
        if not _is_int(seed):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if tissue_fraction is not None and not (0.0 <= float(tissue_fraction) <= 0.9):
            raise ValueError(f"tissue_fraction must be in [0, 0.9], got {tissue_fraction!r}")

        self.width = int(width)
        self.height = int(height)
        self.mpp = float(mpp)
        self.seed = int(seed)

        rng = np.random.default_rng(np.random.SeedSequence([self.seed & _MASK64, 0x5E5]))
        target = rng.uniform(0.35, 0.5) if tissue_fraction is None else float(tissue_fraction)
        self.tissue_fraction = float(target)
        self._blank = self.tissue_fraction <= 0.0

        w, h, px_um = float(self.width), float(self.height), 1.0 / self.mpp
        side = max(w, h)
        self._side = side

        # Tissue sections: a few big rotated ellipses, in level-0 pixels.
        n_blobs = int(rng.integers(2, 5))
        self._blobs: list[tuple[float, float, float, float, float]] = []
        for _ in range(n_blobs):
            cx = rng.uniform(0.3, 0.7) * w
            cy = rng.uniform(0.3, 0.7) * h
            ra = rng.uniform(0.15, 0.3) * min(w, h) + 0.05 * side
            rb = ra * rng.uniform(0.5, 1.0)
            theta = rng.uniform(0.0, math.pi)
            c, s = math.cos(theta), math.sin(theta)
            qa = c * c / ra**2 + s * s / rb**2
            qb = 2.0 * c * s * (1.0 / ra**2 - 1.0 / rb**2)
            qc = s * s / ra**2 + c * c / rb**2
            self._blobs.append((cx, cy, qa, qb, qc))

        # Lobes (slide-relative) and ragged edges (micron scale) bend the ellipses' outline.
        self._outline = _Waves.concat(
            [
                _Waves(rng, 5, (side / 4.0, side / 1.5), 0.5),
                _Waves(rng, 5, (80.0 * px_um, 400.0 * px_um), 0.15),
            ]
        )
        # Eosin texture: stroma fibres streaming in one main direction, plus slow variation.
        fibre_dir = rng.uniform(0.0, math.pi)
        self._texture = _Waves.concat(
            [
                _Waves(
                    rng, 4, (8.0 * px_um, 30.0 * px_um), 0.2, (fibre_dir - 0.4, fibre_dir + 0.4)
                ),
                _Waves(rng, 3, (150.0 * px_um, 600.0 * px_um), 0.2),
            ]
        )
        # White holes (lumens, fat): where a mid-scale wave sum peaks; a slow part makes them
        # cluster in some regions, which hides the quasi-periodicity of a few waves.
        self._holes = _Waves.concat(
            [
                _Waves(rng, 6, (40.0 * px_um, 200.0 * px_um), 1.0),
                _Waves(rng, 3, (400.0 * px_um, 2000.0 * px_um), 0.6),
            ]
        )
        # Cellularity: how likely a cell is to show a nucleus, varying over ~0.5 mm.
        self._cellularity = _Waves(rng, 3, (250.0 * px_um, 1000.0 * px_um), 0.5)

        self._noise = rng.standard_normal(_NOISE_SHAPE).astype(np.float32)
        self._cell_px = _CELL_UM * px_um
        self._cell_key_x = _mix64_scalar((self.seed & _MASK64) ^ 0xC0FFEE)
        self._cell_key_y = _mix64_scalar(self._cell_key_x ^ 0xBADC0DE)

        # Edge softness: ~2 um wide for a typical blob gradient (~ 2 / radius per pixel).
        self._soft = (2.0 / (0.25 * side)) * (2.0 * px_um)
        self._threshold = math.inf if self._blank else self._calibrate()

    # -- fields ---------------------------------------------------------------------------
    def _field(self, xs: _Coords, ys: _Coords, spacing: float = 1.0) -> npt.NDArray[np.float32]:
        """Tissue field on the grid ``ys x xs``: above the threshold is tissue."""
        # Union of ellipses = max of (1 - q) = -min(q - 1), with q the ellipse's quadratic
        # form; q splits into an x-term, a y-term and one cross product.
        low: npt.NDArray[np.float32] | None = None
        for cx, cy, qa, qb, qc in self._blobs:
            du = xs - cx
            dv = ys - cy
            q = (qb * dv).astype(np.float32)[:, None] * du.astype(np.float32)[None, :]
            q += (qa * du * du).astype(np.float32)[None, :]
            q += (qc * dv * dv - 1.0).astype(np.float32)[:, None]
            low = q if low is None else np.minimum(low, q, out=low)
        assert low is not None
        field = self._outline.grid(xs, ys, spacing)
        field -= low
        return field

    def _calibrate(self) -> float:
        """Pick the field threshold that makes ``tissue_fraction`` of the slide tissue."""
        n = 256
        xs = (np.arange(n) + 0.5) * (self.width / n)
        ys = (np.arange(n) + 0.5) * (self.height / n)
        return float(np.quantile(self._field(xs, ys), 1.0 - self.tissue_fraction))

    def _tissue(self, xs: _Coords, ys: _Coords, spacing: float = 1.0) -> npt.NDArray[np.float32]:
        """Soft tissue coverage in [0, 1] on the grid ``ys x xs``."""
        t = self._field(xs, ys, spacing)
        t -= np.float32(self._threshold)
        t *= np.float32(1.0 / self._soft)
        return np.clip(t, 0.0, 1.0, out=t)

    # -- rendering ------------------------------------------------------------------------
    def render(self, x0: float, y0: float, w: int, h: int, step: float) -> npt.NDArray[np.uint8]:
        """Render a window; see :meth:`TileRenderer.render` for the sampling convention.

        Args:
            x0: Left edge in level-0 pixels.
            y0: Top edge in level-0 pixels.
            w: Output width in pixels (> 0).
            h: Output height in pixels (> 0).
            step: Level-0 pixels per output pixel (> 0).

        Returns:
            ``(h, w, 3)`` uint8 RGB.

        Raises:
            ValueError: On a non-positive size or step.
        """
        _check_size("w", w)
        _check_size("h", h)
        _check_positive("step", step)
        w, h, step = int(w), int(h), float(step)
        # Average ss x ss samples per pixel once pixels get coarse, keeping samples <= ~4 um
        # apart so nuclei blur into the colour instead of being hit or missed.
        ss = 1 if step < 2.0 else int(min(8, max(2, math.ceil(step * self.mpp / 4.0))))
        out = np.empty((h, w, 3), dtype=np.uint8)
        # Square blocks of <= _BLOCK_SAMPLES^2 samples: bounded memory, cache-sized arrays, and
        # the per-row and per-column parts of every field stay cheap next to the 2-D work.
        block = max(1, _BLOCK_SAMPLES // ss)
        for r0 in range(0, h, block):
            for c0 in range(0, w, block):
                self._render_block(
                    out[r0 : r0 + block, c0 : c0 + block],
                    float(x0) + c0 * step,
                    float(y0) + r0 * step,
                    step,
                    ss,
                )
        return out

    def _render_block(
        self, out: npt.NDArray[np.uint8], x0: float, y0: float, step: float, ss: int
    ) -> None:
        """Render the block ``out`` (a view into the window) from ``ss x ss`` samples per pixel."""
        h, w = out.shape[:2]
        sub = step / ss
        xs = x0 + (np.arange(w * ss) + 0.5) * sub
        ys = y0 + (np.arange(h * ss) + 0.5) * sub
        rows = np.floor(ys).astype(np.int64) % _NOISE_SHAPE[0]
        cols = np.floor(xs).astype(np.int64) % _NOISE_SHAPE[1]
        noise = self._noise.take(rows, axis=0).take(cols, axis=1)

        # Channels first: numpy is slow on a trailing axis of length 3.
        glass = np.float32(1.5) * noise
        channels = [glass + c for c in _GLASS]
        if not self._blank:
            tissue = self._tissue(xs, ys, sub)
            if tissue.max() > 0.0:
                self._paint_tissue(channels, tissue, noise, xs, ys, sub)

        for c, value in enumerate(channels):
            if ss > 1:
                value = _block_mean(value, ss)
            np.clip(value, 0.0, 255.0, out=value)
            value += np.float32(0.5)
            out[..., c] = value  # truncation after +0.5: round half up

    def _paint_tissue(
        self,
        channels: list[npt.NDArray[np.float32]],
        tissue: npt.NDArray[np.float32],
        noise: npt.NDArray[np.float32],
        xs: _Coords,
        ys: _Coords,
        spacing: float,
    ) -> None:
        """Blend eosin, holes and nuclei into ``channels`` (in place)."""
        kept = self._holes.grid(xs, ys, spacing)
        kept -= np.float32(0.65)
        kept *= np.float32(-12.0)
        np.clip(kept, 0.0, 1.0, out=kept)  # 1 = tissue, 0 = hole
        tissue *= kept

        density = self._texture.grid(xs, ys, spacing)
        density += np.float32(0.8)
        density += np.float32(0.06) * noise
        np.clip(density, 0.3, 1.2, out=density)
        density *= tissue
        for value, glass, eosin in zip(channels, _GLASS, _EOSIN):
            value += density * np.float32(eosin - glass)

        alpha = self._nuclei_alpha(xs, ys, spacing)
        if alpha is not None:
            alpha *= np.float32(1.0) + np.float32(0.1) * noise
            np.clip(alpha, 0.0, 1.0, out=alpha)
            alpha *= kept
            for value, haem in zip(channels, _HAEMATOXYLIN):
                value += alpha * (haem - value)

    def _nuclei_alpha(
        self, xs: _Coords, ys: _Coords, spacing: float
    ) -> npt.NDArray[np.float32] | None:
        """Nucleus opacity on the grid ``ys x xs``, or ``None`` when no nucleus touches it."""
        cell = self._cell_px
        cix = np.floor(xs / cell).astype(np.int64)
        ciy = np.floor(ys / cell).astype(np.int64)
        gx = np.arange(cix[0], cix[-1] + 1, dtype=np.int64)
        gy = np.arange(ciy[0], ciy[-1] + 1, dtype=np.int64)

        # One hash per cell, then one derived stream per nucleus parameter.
        hx = _mix64(gx.view(np.uint64) ^ _U64(self._cell_key_x))
        hy = _mix64(gy.view(np.uint64) ^ _U64(self._cell_key_y))
        base = _mix64(hx[None, :] ^ (hy[:, None] * _U64(_GOLDEN)))
        u = [_unit(_mix64(base + _U64((k * 0x632BE59BD9B4E019 + 1) & _MASK64))) for k in range(7)]

        centres_x = (gx + 0.5) * cell
        centres_y = (gy + 0.5) * cell
        tissue_at_cell = self._tissue(centres_x, centres_y)
        presence = np.clip(0.6 + self._cellularity.grid(centres_x, centres_y), 0.15, 0.9)
        amax = (u[0] < presence).astype(np.float32) * (0.75 + 0.25 * u[1]) * tissue_at_cell
        if not np.any(amax > 0.0):
            return None

        px_um = 1.0 / self.mpp
        lo, hi = _NUCLEUS_SEMI_AXIS_UM
        a = (lo + (hi - lo) * u[2]) * px_um  # semi-major axis, px
        b = a * (0.6 + 0.4 * u[3])  # semi-minor axis, px
        theta = np.float32(math.pi) * u[4]
        # Keep the whole nucleus inside its cell: each sample then needs only its own cell.
        room = cell - 2.0 * a
        ncx = gx[None, :] * cell + a + room * u[5] - xs[0]
        ncy = gy[:, None] * cell + a + room * u[6] - ys[0]
        cos_t, sin_t = np.cos(theta), np.sin(theta)
        ramp, a, b = _antialiased_ellipse(a, b, spacing)
        params = np.stack(
            [ncx, ncy, cos_t / a, sin_t / a, -sin_t / b, cos_t / b, ramp, amax]
        ).astype(np.float32)

        # Samples are sorted, so expanding cells to samples is a repeat, not a gather.
        per_row = np.bincount(ciy - gy[0], minlength=gy.size)
        per_col = np.bincount(cix - gx[0], minlength=gx.size)
        g = np.repeat(np.repeat(params, per_row, axis=1), per_col, axis=2)
        dx = (xs - xs[0]).astype(np.float32)[None, :] - g[0]
        dy = (ys - ys[0]).astype(np.float32)[:, None] - g[1]
        pu = dx * g[2]
        pu += dy * g[3]
        pv = dx * g[4]
        pv += dy * g[5]
        pu *= pu
        pv *= pv
        alpha = np.float32(1.0) - pu
        alpha -= pv
        alpha *= g[6]
        np.clip(alpha, 0.0, 1.0, out=alpha)
        alpha *= g[7]
        return np.asarray(alpha, dtype=np.float32)


def _antialiased_ellipse(
    a: npt.NDArray[np.float32], b: npt.NDArray[np.float32], spacing: float
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Widen an ellipse by half a sample and pick the ramp that keeps its area.

    Opacity is ``clip((1 - q) * ramp, 0, 1)`` over the widened ellipse (``q`` its quadratic
    form). Over the plane that integrates to ``pi a' b' (1 - 1 / (2 ramp))`` when ``ramp >= 1``
    and ``pi a' b' ramp / 2`` below, so solving for the true area ``pi a b`` gives a ~1-sample
    soft edge at fine steps and a faint, wider smudge once nuclei shrink below a sample: the
    mean colour of a region is then the same at every pyramid level.
    """
    half = np.float32(0.5 * max(spacing, 1.0))
    wide_a = a + half
    wide_b = b + half
    keep = (a * b) / (wide_a * wide_b)  # in (0, 1)
    ramp = np.where(keep <= 0.5, 2.0 * keep, 0.5 / (1.0 - keep)).astype(np.float32)
    return ramp, wide_a, wide_b


def _block_mean(value: npt.NDArray[np.float32], ss: int) -> npt.NDArray[np.float32]:
    """Mean of ``ss x ss`` blocks; strided adds beat ``reshape(...).mean`` on small axes."""
    cols = value[:, 0::ss].copy()
    for k in range(1, ss):
        cols += value[:, k::ss]
    out = cols[0::ss].copy()
    for k in range(1, ss):
        out += cols[k::ss]
    out *= np.float32(1.0 / (ss * ss))
    return out


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------
def write_svs(
    path: str | os.PathLike[str],
    *,
    width: int,
    height: int,
    mpp: float = 0.5,
    downsamples: Sequence[int] = (1, 4, 16),
    tile_px: int = 256,
    quality: int = 85,
    objective_power: float | None = None,
    seed: int = 0,
    content: Literal["tissue", "blank"] = "tissue",
    renderer: TileRenderer | None = None,
) -> Path:
    """Write a pyramidal Aperio-style SVS, streaming it tile by tile.

    The file mimics what Aperio scanners write, so readers take the same code paths as for
    real slides: IFD 0 is level 0 with the Aperio ImageDescription (``AppMag``, ``MPP``), IFD 1
    a small stripped thumbnail, then one IFD per lower level. Every level is tiled, JPEG in
    RGB colour space (Aperio's flavour), and rendered window by window from ``renderer``, so
    memory stays bounded (a few tiles per worker thread) whatever the slide size. The output is
    byte-for-byte reproducible for a given seed and arguments.

    The file appears atomically: it is written to a temporary file beside ``path`` and renamed
    over it only when complete; on any error the temporary file is removed and ``path`` is left
    as it was.

    Args:
        path: Destination file; its folder is created if missing.
        width: Level-0 width in pixels (> 0).
        height: Level-0 height in pixels (> 0).
        mpp: Microns per level-0 pixel (> 0), written as ``MPP`` so readers report it.
        downsamples: Integer downsample of each level: starts at 1, strictly increasing. A
            level's size is ``size // downsample``; levels that would be under 1 px are skipped.
        tile_px: Tile side in pixels, a multiple of 16.
        quality: JPEG quality, 1-100.
        objective_power: ``AppMag`` to record; default ``round(10 / mpp)`` (20 at 0.5 um/px).
        seed: Seed of the built-in content.
        content: ``"tissue"`` for the H&E look-alike, ``"blank"`` for bare glass (to exercise
            "no tissue" paths).
        renderer: Custom content; when given, ``seed`` and ``content`` are ignored.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: On an invalid argument, or a renderer returning a wrongly shaped tile.
    """
    _check_size("width", width)
    _check_size("height", height)
    _check_positive("mpp", mpp)
    _check_size("tile_px", tile_px)
    if tile_px % 16:
        raise ValueError(f"tile_px must be a multiple of 16, got {tile_px!r}")
    if not _is_int(quality) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer in 1-100, got {quality!r}")
    levels_ds = _check_downsamples(downsamples)
    if objective_power is not None:
        _check_positive("objective_power", objective_power)
    if content not in ("tissue", "blank"):
        raise ValueError(f"content must be 'tissue' or 'blank', got {content!r}")
    if renderer is not None and not callable(getattr(renderer, "render", None)):
        raise ValueError("renderer must have a render(x0, y0, w, h, step) method")

    width, height, mpp, tile_px = int(width), int(height), float(mpp), int(tile_px)
    power = float(round(10.0 / mpp)) if objective_power is None else float(objective_power)
    if renderer is None:
        renderer = SyntheticTissue(
            width, height, mpp=mpp, seed=seed, tissue_fraction=0.0 if content == "blank" else None
        )

    levels = [
        (d, width // d, height // d) for d in levels_ds if width // d >= 1 and height // d >= 1
    ]
    thumb_step = max(1.0, max(width, height) / _THUMBNAIL_PX)
    thumb_w = max(1, int(width / thumb_step))
    thumb_h = max(1, int(height / thumb_step))

    mag = f"|AppMag = {power:g}|MPP = {_format_mpp(mpp)}"
    head = (
        f"Aperio Image Library v12.0.15 \r\n"
        f"{width}x{height} [0,0 {width}x{height}] ({tile_px}x{tile_px})"
    )
    q = int(quality)
    jpeg_args = {"level": q, "outcolorspace": "RGB"}

    def encode(tile: npt.NDArray[np.uint8]) -> bytes:
        # Must match the tags tifffile writes for ``common`` below (it gets bytes, not pixels).
        return bytes(
            imagecodecs.jpeg_encode(
                tile, level=q, colorspace="RGB", outcolorspace="RGB", subsampling=(1, 1)
            )
        )

    raw_bytes = sum(w * h * 3 for _, w, h in levels)
    bigtiff = raw_bytes > (1 << 31)
    workers = max(1, min(4, _cpu_count()))

    out = Path(path)
    with atomic_write(out, "wb") as handle, tifffile.TiffWriter(handle, bigtiff=bigtiff) as tif:
        # Aperio's JPEG flavour: RGB colour space (no YCbCr transform), no chroma subsampling.
        common: dict[str, Any] = {
            "dtype": np.uint8,
            "photometric": "rgb",
            "compression": "jpeg",
            "compressionargs": jpeg_args,
            "subsampling": (1, 1),
            "metadata": None,
            "software": False,
            "subfiletype": 0,
        }
        for index, (d, lw, lh) in enumerate(levels):
            size = "" if index == 0 else f" -> {lw}x{lh}"
            desc = f"{head}{size} JPEG/RGB Q={q}{mag}"
            tiles = _encoded_tiles(renderer, lw, lh, float(d), tile_px, encode, workers)
            tif.write(tiles, shape=(lh, lw, 3), tile=(tile_px, tile_px), description=desc, **common)
            if index == 0:
                # IFD 1 is the thumbnail in real SVS files; tifffile (so tiffslide) relies on it.
                thumb = _checked(
                    renderer.render(0.0, 0.0, thumb_w, thumb_h, thumb_step), thumb_w, thumb_h
                )
                tif.write(
                    thumb,
                    rowsperstrip=thumb_h,
                    description=(
                        f"Aperio Image Library v12.0.15 \r\n"
                        f"{width}x{height} -> {thumb_w}x{thumb_h} - {mag}"
                    ),
                    **common,
                )
    return out


def _encoded_tiles(
    renderer: TileRenderer,
    level_w: int,
    level_h: int,
    step: float,
    tile_px: int,
    encode: Callable[[npt.NDArray[np.uint8]], bytes],
    workers: int,
) -> Iterator[bytes]:
    """Yield one level's JPEG tiles in TIFF order (row-major), rendering a few ahead in threads.

    Only ``2 * workers`` tiles are in flight at once, which bounds memory; numpy and libjpeg
    release the GIL for most of the work, so threads do scale over cores.
    """
    n_x = -(-level_w // tile_px)
    n_y = -(-level_h // tile_px)

    def job(ty: int, tx: int) -> bytes:
        x0 = tx * tile_px * step
        y0 = ty * tile_px * step
        return encode(_checked(renderer.render(x0, y0, tile_px, tile_px, step), tile_px, tile_px))

    coords = ((ty, tx) for ty in range(n_y) for tx in range(n_x))
    if workers <= 1:
        for ty, tx in coords:
            yield job(ty, tx)
        return

    pending: deque[Future[bytes]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="svs-tile") as pool:
        try:
            for ty, tx in coords:
                pending.append(pool.submit(job, ty, tx))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _cpu_count() -> int:
    """CPUs this process may use (affinity-aware where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _checked(tile: npt.NDArray[np.uint8], w: int, h: int) -> npt.NDArray[np.uint8]:
    """Reject renderer output that would silently corrupt the file."""
    tile = np.asarray(tile)
    if tile.shape != (h, w, 3) or tile.dtype != np.uint8:
        raise ValueError(
            f"renderer returned {tile.dtype} array of shape {tile.shape}; expected uint8 {(h, w, 3)}"
        )
    return np.ascontiguousarray(tile)


def _format_mpp(mpp: float) -> str:
    """Aperio writes 4 decimals; keep more only when 4 would change the value."""
    text = f"{mpp:.4f}"
    return text if float(text) == mpp else repr(mpp)


# Argument checks raise ValueError even for wrong types: callers (CLI, tests, the spec) treat
# every bad argument alike, and bool is refused although it is an int subclass.
def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_size(name: str, value: object) -> None:
    if not _is_int(value) or value < 1:  # type: ignore[operator]
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_positive(name: str, value: object) -> None:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:  # type: ignore[arg-type,operator]
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _check_downsamples(downsamples: Sequence[int]) -> list[int]:
    values = list(downsamples)
    if not values or not all(_is_int(d) for d in values) or values[0] != 1:
        raise ValueError(f"downsamples must be integers starting at 1, got {downsamples!r}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"downsamples must strictly increase, got {downsamples!r}")
    return [int(d) for d in values]
