"""Built-in encoders that need no weights: ``hed_texture`` (patches) and ``layout`` (regions).

They exist so the whole pipeline (tiling, selection, feature stores, the region and slide
vectors) runs and is testable on a base install without torch or downloaded checkpoints,
and as a transparent baseline a pathologist can read: every dimension is a named stain or
texture statistic (see :data:`HED_FEATURE_NAMES` and :data:`LAYOUT_FEATURE_NAMES`).

Stain separation follows Ruifrok & Johnston (2001): a pixel's optical density
``OD = -log((I + 1) / 256)`` per RGB channel is, by the Beer-Lambert law, a sum of stain
concentrations times each stain's unit OD vector, so multiplying OD by the inverse of the
stain matrix recovers haematoxylin (H), eosin (E) and a residual channel (the unit vector
orthogonal to both, which collects what H&E cannot explain: pigment, ink, blur, noise).

"Total OD" throughout is the Euclidean norm of a pixel's RGB OD vector, i.e. how much light
it absorbs whatever the hue. A pixel with total OD below :data:`BACKGROUND_OD` (0.15) counts
as background (glass, lumen, fat): grey glass brighter than about 234 falls below it, while
pale pink tissue that absorbs strongly in one channel only stays above it (a channel mean
would call such tissue background).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import cv2
import numpy as np
import numpy.typing as npt
from scipy import ndimage

from omero_hwsi._types import FloatArray, RGBArray
from omero_hwsi.features.registry import register_encoder

__all__ = [
    "BACKGROUND_OD",
    "HED_FEATURE_NAMES",
    "LAYOUT_FEATURE_NAMES",
    "PROTOTYPE_NAMES",
    "STAIN_MATRIX",
    "HedTextureEncoder",
    "LayoutEncoder",
    "hed_descriptor_raw",
    "wsi_vector",
]

# --------------------------------------------------------------------------------------
# Stain model
# --------------------------------------------------------------------------------------


def _stain_matrix() -> npt.NDArray[np.float64]:
    """Rows: unit OD vectors of haematoxylin, eosin, and their orthogonal residual."""
    haem = np.array([0.650, 0.704, 0.286])  # Ruifrok & Johnston (2001), H&E, RGB order
    eosin = np.array([0.072, 0.990, 0.105])
    haem /= np.linalg.norm(haem)
    eosin /= np.linalg.norm(eosin)
    resid = np.cross(haem, eosin)
    resid /= np.linalg.norm(resid)
    return np.stack([haem, eosin, resid])


STAIN_MATRIX: Final[npt.NDArray[np.float64]] = _stain_matrix()
"""``(3, 3)`` rows = unit OD vectors (RGB) of H, E and residual: ``OD = conc @ STAIN_MATRIX``."""

_UNMIX: Final[npt.NDArray[np.float32]] = np.linalg.inv(STAIN_MATRIX).astype(np.float32)
"""``conc = OD @ _UNMIX``: column 0 is H, 1 is E, 2 the residual."""

_OD_LUT: Final[npt.NDArray[np.float32]] = (
    -np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)
).astype(np.float32)
"""Optical density of each 8-bit level; a lookup is much faster than a log per pixel."""

_SQUARE_LUT: Final[npt.NDArray[np.float32]] = np.arange(256, dtype=np.float32) ** 2
"""Squares of 8-bit levels, for RGB variances without a float copy of the patch."""

_GREY_WEIGHTS: Final[tuple[float, float, float]] = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma

BACKGROUND_OD: Final[float] = 0.15
"""Total OD (norm of the RGB OD vector) below which a pixel is background."""

NUCLEAR_H_OD: Final[float] = 0.45
"""H concentration above which a pixel counts as nuclear (chromatin)."""

EOSIN_E_OD: Final[float] = 0.45
"""E concentration above which a pixel counts as strongly eosinophilic."""

H_HIST_EDGES: Final[tuple[float, ...]] = (0.1, 0.3, 0.7)
"""Inner edges of the 4-bin H histogram: none / faint / moderate / dense haematoxylin."""

E_HIST_EDGES: Final[tuple[float, ...]] = (0.1, 0.3, 0.7)
"""Inner edges of the 4-bin E histogram: none / faint / moderate / dense eosin."""

HED_FEATURE_NAMES: Final[tuple[str, ...]] = (
    "h_mean", "h_std", "e_mean", "e_std", "od_mean", "od_std",
    "nuclear_frac", "eosin_frac", "background_frac", "nuclear_frac_of_tissue",
    "h_share", "resid_abs_mean",
    "h_hist_0", "h_hist_1", "h_hist_2", "h_hist_3",
    "e_hist_0", "e_hist_1", "e_hist_2", "e_hist_3",
    "grad1_mean", "grad1_std", "grad2_mean", "grad2_std", "lap1_rms", "lap2_rms",
    "r_mean", "g_mean", "b_mean", "r_std", "g_std", "b_std",
)  # fmt: skip
"""Names of the ``hed_texture`` dimensions, in output order (32)."""

HED_DIM: Final[int] = len(HED_FEATURE_NAMES)

# --------------------------------------------------------------------------------------
# hed_texture: raw descriptor
# --------------------------------------------------------------------------------------


class _Scratch:
    """Scratch buffers reused by every chunk of :func:`hed_descriptor_raw`, per thread.

    Each 256 px patch needs about a dozen 256 KiB temporaries; freshly allocated ones are
    served by the kernel with a page fault per 4 KiB, which measured 20-40 % of the
    descriptor's time. Chunks (and later calls in the same thread) reuse these buffers
    instead. Nothing returned to callers aliases them.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, npt.NDArray[np.generic]] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: type = np.float32) -> npt.NDArray[Any]:
        """A C-contiguous ``shape`` view of the buffer ``name``, (re)allocated if too small."""
        size = int(np.prod(shape))
        buf = self._buffers.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = np.empty(size, dtype)
            self._buffers[name] = buf
        return buf[:size].reshape(shape)


_THREAD_SCRATCH = threading.local()


def _mean_std(x: npt.NDArray[np.float32]) -> tuple[FloatArray, FloatArray]:
    """Per-row mean and population std of ``(B, n)``; one pass, clamped so it is never NaN."""
    n = x.shape[1]
    mean = x.sum(axis=1, dtype=np.float64) / n
    sq = np.einsum("bn,bn->b", x, x, dtype=np.float64) / n
    std = np.sqrt(np.maximum(sq - mean * mean, 0.0))
    return mean.astype(np.float32), std.astype(np.float32)


def _fraction_above(
    x: npt.NDArray[np.float32], t: float, mask: npt.NDArray[np.bool_]
) -> FloatArray:
    """Per-row fraction of values strictly above ``t``; ``mask`` is scratch of x's shape."""
    np.greater(x, t, out=mask)
    count = np.add.reduce(mask, axis=1, dtype=np.int64)
    return np.asarray(count / x.shape[1], dtype=np.float32)


def _histogram(
    x: npt.NDArray[np.float32], edges: Sequence[float], mask: npt.NDArray[np.bool_]
) -> FloatArray:
    """Per-row fractions in the bins cut by ``edges``: ``(B, len(edges) + 1)``, rows sum to 1."""
    above = [np.ones(x.shape[0], np.float32)] + [_fraction_above(x, e, mask) for e in edges]
    above.append(np.zeros(x.shape[0], np.float32))
    cum = np.stack(above, axis=1)
    return (cum[:, :-1] - cum[:, 1:]).astype(np.float32)


def _texture(
    grey: npt.NDArray[np.float32], scratch: _Scratch, tag: str
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Mean and std of the central-difference gradient magnitude, and the RMS Laplacian.

    Central differences skip the single-pixel (JPEG, sensor) noise that forward differences
    would amplify, while still resolving chromatin and fibre edges at 0.5 um/px. Only
    interior pixels of each patch are used, so patches never mix.

    Plain numpy, on purpose: OpenCV's filter and magnitude kernels may pick SIMD or scalar
    paths (fused multiply-add or not) by buffer alignment, so a last bit can differ
    between processes; element-wise numpy arithmetic rounds the same everywhere, and
    features must be bit-identical whether a region is encoded in a worker or in-process.
    """
    b, h, w = grey.shape
    shape = (b, h - 2, w - 2)
    mag = scratch.get(tag + "a", shape)
    tmp = scratch.get(tag + "b", shape)
    centre = grey[:, 1:-1, 1:-1]
    np.subtract(grey[:, 1:-1, 2:], grey[:, 1:-1, :-2], out=mag)
    mag *= mag
    np.subtract(grey[:, 2:, 1:-1], grey[:, :-2, 1:-1], out=tmp)
    tmp *= tmp
    mag += tmp
    np.sqrt(mag, out=mag)
    mag *= 0.5
    g_mean, g_std = _mean_std(mag.reshape(b, -1))
    lap = tmp
    np.add(grey[:, 1:-1, 2:], grey[:, 1:-1, :-2], out=lap)
    lap += grey[:, 2:, 1:-1]
    lap += grey[:, :-2, 1:-1]
    np.multiply(centre, 4.0, out=mag)
    lap -= mag
    flat = lap.reshape(b, -1)
    lap_rms = np.sqrt(np.einsum("bn,bn->b", flat, flat, dtype=np.float64) / flat.shape[1])
    return g_mean, g_std, lap_rms.astype(np.float32)


_CHUNK_PIXELS: Final[int] = 2 * 256 * 256
"""Pixels described per vectorised step: two 256 px patches, whose float maps (0.5 MiB
each) stay in a core's cache; with whole batches of 16-32 patches every map spills to
memory, which measured about 1.5-2x slower per patch."""


def hed_descriptor_raw(patches: RGBArray) -> FloatArray:
    """Unstandardised ``hed_texture`` descriptor of a batch; see :data:`HED_FEATURE_NAMES`.

    Vectorised over the batch (in cache-sized chunks of whole patches, sharing scratch
    buffers): each chunk is treated as one tall image for per-pixel maps and only the
    neighbourhood operations (gradients) respect patch borders. The result does not
    depend on how the batch is chunked (every statistic is a per-patch reduction).

    Args:
        patches: ``(B, H, W, 3)`` uint8 RGB, ``H`` and ``W`` even and at least 4.

    Returns:
        ``(B, 32)`` float32, in natural units (OD, fractions, grey levels in [0, 1]).
    """
    b, h, w, _ = patches.shape
    if b == 0:
        return np.zeros((0, HED_DIM), np.float32)
    step = max(1, _CHUNK_PIXELS // (h * w))
    if step * h * w <= _CHUNK_PIXELS:
        # Kept per thread between calls (about 7 MiB), so small batches skip the faults too.
        scratch = getattr(_THREAD_SCRATCH, "scratch", None)
        if scratch is None:
            scratch = _THREAD_SCRATCH.scratch = _Scratch()
    else:  # one patch larger than a chunk: do not keep its buffers alive
        scratch = _Scratch()
    return np.concatenate(
        [_describe(patches[i : i + step], scratch) for i in range(0, b, step)], axis=0
    )


def _describe(patches: RGBArray, scratch: _Scratch) -> FloatArray:
    """:func:`hed_descriptor_raw` of one chunk."""
    b, h, w, _ = patches.shape
    n = h * w
    rows = (b * h, w)
    # Contiguous channel planes, (B*H, W) each, so LUTs and reductions run on dense memory.
    planes = []
    for c in range(3):
        plane = scratch.get(f"plane{c}", rows, np.uint8)
        np.copyto(plane.reshape(b, h, w), patches[..., c])
        planes.append(plane)
    od = [cv2.LUT(p, _OD_LUT, dst=scratch.get(f"od{c}", rows)) for c, p in enumerate(planes)]
    tmp = scratch.get("tmp", rows)

    def unmix(col: int) -> npt.NDArray[np.float32]:
        out = scratch.get(f"conc{col}", rows)
        np.multiply(od[0], _UNMIX[0, col], out=out)
        out += np.multiply(od[1], _UNMIX[1, col], out=tmp)
        out += np.multiply(od[2], _UNMIX[2, col], out=tmp)
        return out.reshape(b, n)

    hc, ec, rc = unmix(0), unmix(1), unmix(2)
    tot = scratch.get("tot", rows)
    np.multiply(od[0], od[0], out=tot)
    tot += np.multiply(od[1], od[1], out=tmp)
    tot += np.multiply(od[2], od[2], out=tmp)
    np.sqrt(tot, out=tot)
    tot = tot.reshape(b, n)
    tmp_flat = tmp.reshape(b, n)
    mask = scratch.get("mask", (b, n), np.bool_)

    h_mean, h_std = _mean_std(hc)
    e_mean, e_std = _mean_std(ec)
    od_mean, od_std = _mean_std(tot)
    nuclear = _fraction_above(hc, NUCLEAR_H_OD, mask)
    eosin = _fraction_above(ec, EOSIN_E_OD, mask)
    np.less(tot, BACKGROUND_OD, out=mask)
    tissue = 1.0 - (np.add.reduce(mask, axis=1, dtype=np.int64) / n)
    background = (1.0 - tissue).astype(np.float32)
    nuclear_of_tissue = (nuclear / np.maximum(tissue, 1.0 / n)).astype(np.float32)
    nuclear_of_tissue = np.minimum(nuclear_of_tissue, 1.0)
    # H share of the stain on tissue: purple vs pink independent of how much tissue there is.
    h_pos = np.maximum(hc, 0.0, out=tmp_flat).sum(axis=1, dtype=np.float64)
    e_pos = np.maximum(ec, 0.0, out=tmp_flat).sum(axis=1, dtype=np.float64)
    h_share = np.where(h_pos + e_pos > 1e-6 * n, h_pos / np.maximum(h_pos + e_pos, 1e-12), 0.5)
    resid = np.abs(rc, out=tmp_flat).sum(axis=1, dtype=np.float64) / n

    h_hist = _histogram(hc, H_HIST_EDGES, mask)
    e_hist = _histogram(ec, E_HIST_EDGES, mask)

    gw = _GREY_WEIGHTS
    grey = scratch.get("grey", rows)
    np.multiply(planes[0], np.float32(gw[0] / 255.0), out=grey)
    grey += np.multiply(planes[1], np.float32(gw[1] / 255.0), out=tmp)
    grey += np.multiply(planes[2], np.float32(gw[2] / 255.0), out=tmp)
    grey3 = grey.reshape(b, h, w)
    g1_mean, g1_std, lap1 = _texture(grey3, scratch, "full")
    # 2x area downsample: the same statistics one octave coarser (nuclei vs chromatin scale).
    half = scratch.get("half", (b, h // 2, w // 2))
    np.add(grey3[:, 0::2, 0::2], grey3[:, 1::2, 0::2], out=half)
    half += grey3[:, 0::2, 1::2]
    half += grey3[:, 1::2, 1::2]
    half *= 0.25
    g2_mean, g2_std, lap2 = _texture(half, scratch, "half")

    rgb_mean = []
    rgb_std = []
    for p in planes:
        flat = p.reshape(b, n)
        total = flat.sum(axis=1, dtype=np.float64)
        sq = cv2.LUT(p, _SQUARE_LUT, dst=tmp).reshape(b, n).sum(axis=1, dtype=np.float64)
        m = total / n
        rgb_mean.append(m / 255.0)
        rgb_std.append(np.sqrt(np.maximum(sq / n - m * m, 0.0)) / 255.0)

    cols = [
        h_mean, h_std, e_mean, e_std, od_mean, od_std,
        nuclear, eosin, background, nuclear_of_tissue, h_share, resid,
        *h_hist.T, *e_hist.T,
        g1_mean, g1_std, g2_mean, g2_std, lap1, lap2,
        *rgb_mean, *rgb_std,
    ]  # fmt: skip
    return np.stack([np.asarray(c, dtype=np.float32) for c in cols], axis=1)


# --------------------------------------------------------------------------------------
# hed_texture: standardisation constants
# --------------------------------------------------------------------------------------

# Per-dimension centre (mean) and scale (std) of hed_descriptor_raw over the fixed synthetic
# reference set built by _reference_patches(): 192 H&E-like patches rendered by Beer-Lambert
# from seeded random recipes spanning stroma, tumour, lymphocytes, necrosis, fat and glass.
# Derived once by running `_reference_statistics()` (see below) and pasted here, rounded to
# 6 significant digits; a test checks the two still agree. Hard-coding them keeps the
# descriptor fixed across releases (and feature stores comparable) even if the renderer
# changes; changing them requires bumping HedTextureEncoder.version.
_HED_CENTRE: Final[npt.NDArray[np.float32]] = np.array([
    0.3607, 0.307289, 0.328368, 0.205716, 0.670524, 0.277535,
    0.272928, 0.2901, 0.144688, 0.300067, 0.539514, 0.0353337,
    0.256445, 0.439259, 0.0984937, 0.205802, 0.266344, 0.299579,
    0.295565, 0.138512, 0.0272318, 0.0249158, 0.0359929, 0.0336227,
    0.0676572, 0.0910745, 0.800106, 0.595585, 0.861181, 0.129479,
    0.116521, 0.0669186,
], dtype=np.float32)  # fmt: skip
_HED_SCALE: Final[npt.NDArray[np.float32]] = np.array([
    0.209631, 0.172277, 0.210726, 0.12263, 0.298702, 0.140371,
    0.204053, 0.278228, 0.29429, 0.210059, 0.19126, 0.0252457,
    0.300392, 0.284875, 0.118255, 0.18488, 0.294278, 0.239627,
    0.223105, 0.188588, 0.0123499, 0.00954868, 0.0175566, 0.0131037,
    0.0301429, 0.0371844, 0.0949946, 0.161169, 0.0618809, 0.0637054,
    0.0586461, 0.0379235,
], dtype=np.float32)  # fmt: skip

_Z_CLIP: Final[float] = 6.0
"""Standardised values are clipped to +-this, so one extreme statistic (a black ink patch)
cannot dominate a cosine similarity on its own."""

_MIN_SCALE_FRACTION: Final[float] = 0.05
"""A reference scale is floored at this fraction of the median scale (in the derivation),
so a dimension that barely varies in the reference set is not blown up by noise."""


def _standardise(raw: FloatArray) -> FloatArray:
    """Apply the fixed reference centre/scale and clip; see :data:`_HED_CENTRE`."""
    z = (raw - _HED_CENTRE) / _HED_SCALE
    np.clip(z, -_Z_CLIP, _Z_CLIP, out=z)
    return z.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------
# Synthetic H&E rendering (reference set and prototypes)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Recipe:
    """Parameters of one synthetic H&E patch; concentrations are in OD units."""

    eosin: float = 0.5  # stroma / cytoplasm eosin
    fibre: float = 0.3  # relative amplitude of fibrous eosin texture (0 = flat)
    fibre_len: float = 8.0  # fibre correlation length along their direction, px
    haem_bg: float = 0.06  # diffuse haematoxylin cross-staining
    nuclei: int = 20
    radius: tuple[float, float] = (5.0, 9.0)  # nuclear radius range, px at 0.5 um/px
    haem_nuc: float = 0.9  # nuclear haematoxylin
    elongation: float = 1.5  # maximum axis ratio of nuclei
    chromatin: float = 0.3  # relative chromatin texture inside nuclei
    fat_cells: int = 0  # adipocytes: white cells bounded by thin eosin membranes
    pale: float = 0.0  # fraction of stain lost (necrosis), 0..1
    debris: int = 0  # small dark nuclear fragments (karyorrhexis)
    glass: float = 0.0  # fraction of the width that is glass, from a random side
    noise: float = 2.0  # sensor noise, grey levels
    stain_jitter: float = 0.0  # random perturbation of the stain vectors (lab-to-lab hue)
    glass_od: float = 0.02  # achromatic OD everywhere (slide, mountant, illumination)


def _soft_disc(
    h: npt.NDArray[np.float32],
    e: npt.NDArray[np.float32],
    cy: float, cx: float, ry: float, rx: float, angle: float,
    haem: float, chromatin: float, rng: np.random.Generator,
) -> None:  # fmt: skip
    """Paint one elliptical nucleus in place: H up to ``haem``, cytoplasmic eosin pushed out."""
    size = h.shape[0]
    r = int(np.ceil(max(ry, rx))) + 2
    y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 1, size)
    x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 1, size)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    ca, sa = np.cos(angle), np.sin(angle)
    u = (dx * ca + dy * sa) / rx
    v = (-dx * sa + dy * ca) / ry
    rho = np.sqrt(u * u + v * v)
    # One-pixel anti-aliased edge, so edges look like a scanner's, not like a hard mask.
    w = np.clip((1.0 - rho) * min(rx, ry) + 0.5, 0.0, 1.0)
    tex = 1.0 + chromatin * rng.standard_normal(w.shape).astype(np.float32)
    h[y0:y1, x0:x1] = np.maximum(h[y0:y1, x0:x1], haem * np.clip(tex, 0.2, 2.0) * w)
    e[y0:y1, x0:x1] *= 1.0 - 0.7 * w


def _render_patch(recipe: _Recipe, seed: int, size: int = 256) -> RGBArray:
    """Render a deterministic H&E-like RGB patch from ``recipe`` by the Beer-Lambert law.

    Concentration maps for H and E are painted (fibrous eosin, elliptical nuclei, fat cells,
    glass), turned into OD with :data:`STAIN_MATRIX`, into intensity with
    ``I = 256 exp(-OD) - 1`` (the inverse of the descriptor's OD), slightly blurred like a
    scanner's optics, and given seeded sensor noise.
    """
    rng = np.random.default_rng(seed)
    # Fibres: anisotropic smoothed noise, long along a random axis.
    noise = rng.standard_normal((size, size)).astype(np.float32)
    sig = (1.5, recipe.fibre_len) if rng.random() < 0.5 else (recipe.fibre_len, 1.5)
    fib = ndimage.gaussian_filter(noise, sigma=sig, mode="wrap")
    fib /= max(float(fib.std()), 1e-6)
    e = np.clip(recipe.eosin * (1.0 + recipe.fibre * fib), 0.0, None).astype(np.float32)
    h = np.full((size, size), recipe.haem_bg, np.float32)

    if recipe.fat_cells > 0:
        # Voronoi cells around random seeds; walls where the two nearest seeds are equidistant.
        seeds = rng.uniform(-0.2 * size, 1.2 * size, size=(max(recipe.fat_cells, 2), 2))
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        dist = np.hypot(yy[None] - seeds[:, 0, None, None], xx[None] - seeds[:, 1, None, None])
        nearest = np.partition(dist, 1, axis=0)
        gap = nearest[1] - nearest[0]
        membrane = np.clip(1.5 - gap, 0.0, 1.0).astype(np.float32)  # ~3 px thick walls
        e = e * membrane + 0.01 * (1.0 - membrane)
        h = h * membrane

    for _ in range(recipe.nuclei):
        r = rng.uniform(*recipe.radius)
        ratio = rng.uniform(1.0, recipe.elongation)
        _soft_disc(
            h, e, rng.uniform(0, size), rng.uniform(0, size), r, r * ratio,
            rng.uniform(0, np.pi), recipe.haem_nuc * rng.uniform(0.8, 1.2),
            recipe.chromatin, rng,
        )  # fmt: skip
    for _ in range(recipe.debris):
        r = rng.uniform(1.2, 3.0)
        _soft_disc(
            h, e, rng.uniform(0, size), rng.uniform(0, size), r, r,
            0.0, recipe.haem_nuc * rng.uniform(0.9, 1.4), 0.1, rng,
        )  # fmt: skip

    if recipe.pale > 0:
        e *= 1.0 - recipe.pale
        h *= 1.0 - 0.5 * recipe.pale
    if recipe.glass > 0:
        edge = round(recipe.glass * size)
        mask = np.zeros((size, size), bool)
        mask[:, :edge] = True
        mask = np.rot90(mask, k=int(rng.integers(4)))
        soft = ndimage.gaussian_filter(mask.astype(np.float32), 3.0)
        h *= 1.0 - soft
        e *= 1.0 - soft

    stains = STAIN_MATRIX[:2]
    if recipe.stain_jitter > 0:
        stains = np.abs(stains + recipe.stain_jitter * rng.standard_normal(stains.shape))
        stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    od = h[..., None] * stains[0] + e[..., None] * stains[1] + recipe.glass_od
    img = 256.0 * np.exp(-od) - 1.0
    img = ndimage.gaussian_filter(img, sigma=(0.6, 0.6, 0.0))
    img += recipe.noise * rng.standard_normal(img.shape)
    return np.asarray(np.clip(np.rint(img), 0, 255), dtype=np.uint8)


_PROTOTYPES: Final[tuple[tuple[str, _Recipe], ...]] = (
    ("nuclear-dense (tumour-like)", _Recipe(
        eosin=0.35, fibre=0.1, nuclei=75, radius=(9.0, 14.0), haem_nuc=0.8,
        elongation=1.4, chromatin=0.45)),
    ("eosinophilic stroma", _Recipe(
        eosin=0.8, fibre=0.5, fibre_len=12.0, nuclei=6, radius=(3.0, 5.0), haem_nuc=0.8,
        elongation=3.5, chromatin=0.2)),
    ("mixed cellular", _Recipe(
        eosin=0.5, fibre=0.3, nuclei=35, radius=(5.0, 10.0), haem_nuc=0.9,
        elongation=2.0, chromatin=0.3)),
    ("necrotic/pale", _Recipe(
        eosin=0.45, fibre=0.05, haem_bg=0.15, nuclei=0, pale=0.5, debris=80,
        haem_nuc=1.0)),
    ("adipose-like sparse", _Recipe(
        eosin=0.5, fibre=0.2, nuclei=2, radius=(3.0, 5.0), fat_cells=9, elongation=2.5)),
    ("lymphocyte-dense small dark nuclei", _Recipe(
        eosin=0.25, fibre=0.1, nuclei=260, radius=(5.0, 7.0), haem_nuc=1.3,
        elongation=1.15, chromatin=0.15)),
)  # fmt: skip
"""Named morphology prototypes of the ``hed_texture`` query bank and their recipes."""

PROTOTYPE_NAMES: Final[tuple[str, ...]] = tuple(name for name, _ in _PROTOTYPES)

_PROTOTYPE_SEED: Final[int] = 20240611


def _reference_patches(count: int = 192, seed: int = 7) -> RGBArray:
    """The fixed synthetic reference set the standardisation constants were derived from.

    Recipes are drawn from broad seeded ranges so the set spans the tissue an H&E region
    shows (sparse to crowded nuclei, faint to dense eosin, fat, necrosis, glass edges);
    centring on it makes "typical" tissue sit near the origin, so cosine similarity
    measures how two patches deviate from typical in the same or opposite directions.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((count, 256, 256, 3), np.uint8)
    for i in range(count):
        kind = rng.random()
        recipe = _Recipe(
            eosin=float(rng.uniform(0.15, 0.9)),
            fibre=float(rng.uniform(0.0, 0.6)),
            fibre_len=float(rng.uniform(4.0, 16.0)),
            haem_bg=float(rng.uniform(0.02, 0.15)),
            nuclei=int(rng.integers(0, 200)) if kind < 0.85 else 0,
            radius=(float(rng.uniform(3.0, 7.0)), float(rng.uniform(7.0, 14.0))),
            haem_nuc=float(rng.uniform(0.5, 1.4)),
            elongation=float(rng.uniform(1.0, 3.5)),
            chromatin=float(rng.uniform(0.0, 0.5)),
            fat_cells=int(rng.integers(4, 14)) if 0.85 <= kind < 0.93 else 0,
            pale=float(rng.uniform(0.3, 0.7)) if kind >= 0.93 else 0.0,
            debris=int(rng.integers(20, 120)) if kind >= 0.93 else 0,
            glass=float(rng.uniform(0.1, 0.9)) if rng.random() < 0.2 else 0.0,
            noise=float(rng.uniform(1.0, 4.0)),
            stain_jitter=float(rng.uniform(0.0, 0.12)),
            glass_od=float(rng.uniform(0.0, 0.06)),
        )
        out[i] = _render_patch(recipe, seed=int(rng.integers(2**31)))
    return out


def _reference_statistics() -> tuple[FloatArray, FloatArray]:
    """Derive the standardisation constants: mean and floored std of the reference set.

    Run once by hand (``python -c "from omero_hwsi.features.encoders.builtin import
    _reference_statistics as r; print(r())"``) and pasted into :data:`_HED_CENTRE` /
    :data:`_HED_SCALE`; it is not called at import or encode time.
    """
    raw = hed_descriptor_raw(_reference_patches()).astype(np.float64)
    centre = raw.mean(axis=0)
    scale = raw.std(axis=0)
    scale = np.maximum(scale, _MIN_SCALE_FRACTION * float(np.median(scale)))
    return centre.astype(np.float32), scale.astype(np.float32)


# --------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------


def _check_batch(arr: object, shape: tuple[int, ...], what: str) -> None:
    """Raise ValueError unless ``arr`` is a uint8 ndarray of shape ``(B, *shape)``.

    Lists and other array-likes are refused too (they have no uint8 dtype), so a caller
    never pays a silent conversion of a whole batch.
    """
    dtype = getattr(arr, "dtype", None)
    if not isinstance(dtype, np.dtype) or dtype != np.uint8:
        raise ValueError(f"{what} must be a uint8 numpy array, got {dtype or type(arr).__name__}")
    got = tuple(getattr(arr, "shape", ()))
    if len(got) != len(shape) + 1 or got[1:] != shape:
        want = "(B, " + ", ".join(map(str, shape)) + ")"
        raise ValueError(f"{what} must have shape {want}, got {got}")


@functools.cache
def _prototype_bank() -> FloatArray:
    """Standardised descriptors of the rendered prototypes; read-only, computed once."""
    patches = np.stack(
        [
            _render_patch(recipe, seed=_PROTOTYPE_SEED + i)
            for i, (_, recipe) in enumerate(_PROTOTYPES)
        ]
    )
    bank = _standardise(hed_descriptor_raw(patches))
    bank.setflags(write=False)
    return bank


@register_encoder("hed_texture")
class HedTextureEncoder:
    """Stain-colour and texture descriptor of 256 px patches at 0.5 um/px (32 dims).

    Each dimension is a named statistic (:data:`HED_FEATURE_NAMES`) of the H, E and
    residual concentrations and of grey-level gradients at two scales, standardised with
    fixed reference constants so that cosine similarity separates nuclear-rich from
    stromal patches instead of being ~1 for everything (raw statistics are all positive).

    It has no text tower, so :meth:`query_bank` returns descriptors of rendered morphology
    prototypes (:data:`PROTOTYPE_NAMES`) for label-free relevance ranking.
    """

    encoder_id: str = "hed_texture"
    version: str = "1"
    dim: int = HED_DIM
    mpp: float = 0.5
    patch_px: int = 256
    scale: Literal["patch"] = "patch"
    has_text_tower: bool = False

    def encode(self, patches: RGBArray) -> FloatArray:
        """Describe a batch of patches.

        Args:
            patches: ``(B, 256, 256, 3)`` uint8 RGB read at 0.5 um/px; ``B`` may be 0.

        Returns:
            ``(B, 32)`` float32 standardised descriptors, finite, in ``[-6, 6]``.

        Raises:
            ValueError: Wrong type, dtype or shape.
        """
        _check_batch(patches, (self.patch_px, self.patch_px, 3), "patches")
        return _standardise(hed_descriptor_raw(patches))

    def query_bank(self) -> tuple[tuple[str, ...], FloatArray]:
        """Names and ``(6, 32)`` descriptors of the morphology prototypes (read-only)."""
        return PROTOTYPE_NAMES, _prototype_bank()

    def __repr__(self) -> str:
        return f"HedTextureEncoder(version={self.version!r}, dim={self.dim})"


LAYOUT_GRID: Final[int] = 4
"""The region picture is split into LAYOUT_GRID x LAYOUT_GRID cells."""

LAYOUT_FEATURE_NAMES: Final[tuple[str, ...]] = ("h_od", "e_od", "total_od", "tissue")
"""Per-cell features of ``layout``, in output order within each cell."""


@register_encoder("layout")
class LayoutEncoder:
    """Spatial layout of a region: stain and tissue per cell of a 4 x 4 grid (64 dims).

    A region's mean colour says little about architecture; keeping a coarse map of where
    the haematoxylin, eosin and tissue are (an edge, a band, a nodule) lets region vectors
    tell such layouts apart. Output is ``(B, 4, 4, 4)`` = (cell row, cell column,
    :data:`LAYOUT_FEATURE_NAMES`) flattened row-major; OD values are means of per-pixel
    OD of the thumbnail, tissue values are means of the patch tissue fractions.

    The standard input is a 64 px picture and a 16 x 16 tissue grid (4096 px regions of
    256 px patches). Smaller grids (e.g. 4 x 4 patches in tests or for small regions) are
    accepted too, as long as both sides divide into the 4 x 4 cells, so the output keeps
    its 64 dimensions and meaning whatever the region size.
    """

    encoder_id: str = "layout"
    version: str = "1"
    dim: int = LAYOUT_GRID * LAYOUT_GRID * len(LAYOUT_FEATURE_NAMES)
    scale: Literal["region"] = "region"
    picture_px: int = 64
    """Standard picture side: 16 patches x 4 px."""
    grid_patches: int = 16
    """Standard tissue grid side, in patches."""

    def encode(self, pictures: RGBArray, tissue: FloatArray) -> FloatArray:
        """Describe a batch of regions.

        Args:
            pictures: ``(B, 64, 64, 3)`` uint8 region thumbnails (unread patches white);
                any square side divisible by 4 is accepted.
            tissue: ``(B, 16, 16)`` per-patch tissue fraction in ``[0, 1]``; any square
                side divisible by 4 is accepted.

        Returns:
            ``(B, 64)`` float32.

        Raises:
            ValueError: Wrong type, dtype or shape, mismatched batch sizes, or tissue
                fractions that are not finite or outside ``[0, 1]``.
        """
        g = LAYOUT_GRID
        if getattr(pictures, "ndim", None) != 4:
            raise ValueError(
                f"pictures must be a (B, {self.picture_px}, {self.picture_px}, 3) array, "
                f"got {getattr(pictures, 'shape', type(pictures).__name__)}"
            )
        px = pictures.shape[1]
        if px == 0 or px % g:
            raise ValueError(
                f"pictures must have a square side divisible by {g}, got {pictures.shape}"
            )
        _check_batch(pictures, (px, px, 3), "pictures")
        tis = np.asarray(tissue)
        if tis.ndim != 3 or tis.shape[1] != tis.shape[2] or tis.shape[1] == 0 or tis.shape[1] % g:
            raise ValueError(
                f"tissue must have shape (B, {self.grid_patches}, {self.grid_patches}) "
                f"(any square side divisible by {g}), got {tis.shape}"
            )
        if tis.shape[0] != pictures.shape[0]:
            raise ValueError(
                f"pictures and tissue batch sizes differ: {pictures.shape[0]} != {tis.shape[0]}"
            )
        if not np.issubdtype(tis.dtype, np.number):
            raise ValueError(f"tissue must be numeric, got dtype {tis.dtype}")
        tis = tis.astype(np.float32)
        if not np.all(np.isfinite(tis)) or (tis.size and (tis.min() < 0.0 or tis.max() > 1.0)):
            raise ValueError("tissue fractions must be finite and within [0, 1]")
        b = pictures.shape[0]
        if b == 0:
            return np.zeros((0, self.dim), np.float32)
        od = _OD_LUT[pictures]  # (B, px, px, 3); small, so a plain gather is fine
        od_r, od_g, od_b = od[..., 0], od[..., 1], od[..., 2]
        # Written out instead of `od @ _UNMIX`: BLAS may round differently with another
        # thread count, and a worker process must give the same bits as the main process.
        haem = od_r * _UNMIX[0, 0] + od_g * _UNMIX[1, 0] + od_b * _UNMIX[2, 0]
        eosin = od_r * _UNMIX[0, 1] + od_g * _UNMIX[1, 1] + od_b * _UNMIX[2, 1]
        total = np.sqrt(od_r * od_r + od_g * od_g + od_b * od_b)
        maps = np.stack([haem, eosin, total], axis=-1)
        c = px // g
        cells = maps.reshape(b, g, c, g, c, 3).mean(axis=(2, 4))  # (B, 4, 4, 3)
        t = tis.shape[1] // g
        tcells = tis.reshape(b, g, t, g, t).mean(axis=(2, 4))[..., None]  # (B, 4, 4, 1)
        out = np.concatenate([cells, tcells], axis=-1)
        return out.reshape(b, self.dim).astype(np.float32)

    def __repr__(self) -> str:
        return f"LayoutEncoder(version={self.version!r}, dim={self.dim})"


def wsi_vector(region_vectors: FloatArray, weights: FloatArray | None = None) -> FloatArray:
    """Slide-level vector: the (optionally weighted) mean of region vectors.

    A plain mean is the simplest permutation-invariant pooling that needs no training; the
    weights let callers give regions influence by e.g. tissue area.

    Args:
        region_vectors: ``(n, dim)`` region vectors, ``n >= 1``.
        weights: Optional ``(n,)`` non-negative weights with a positive sum.

    Returns:
        ``(dim,)`` float32.

    Raises:
        ValueError: No regions, wrong shapes, non-finite values, or unusable weights.
    """
    vecs = np.asarray(region_vectors, dtype=np.float64)
    if vecs.ndim != 2:
        raise ValueError(f"region_vectors must have shape (n, dim), got {vecs.shape}")
    if vecs.shape[0] == 0:
        raise ValueError("cannot pool a slide vector from zero regions")
    if not np.all(np.isfinite(vecs)):
        raise ValueError("region_vectors contain NaN or infinite values")
    if weights is None:
        return np.asarray(vecs.mean(axis=0), dtype=np.float32)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (vecs.shape[0],):
        raise ValueError(f"weights must have shape ({vecs.shape[0]},), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and have a positive sum")
    # Elementwise rather than `w @ vecs`, so the result does not depend on BLAS threading.
    return np.asarray((w[:, None] * vecs).sum(axis=0) / w.sum(), dtype=np.float32)
