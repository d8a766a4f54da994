"""Nucleus segmentation for the cell scale: outlines, centroids and a small descriptor per nucleus.

The cell scale of the model needs nuclei for every 256 x 256 patch of every region, so this
module must be fast (tens of patches per region, on a CPU), deterministic (the same slide gives
the same feature store) and free of downloaded weights and of torch (it runs on the OMERO
server's Python and in QuPath's bridge). :class:`ClassicalNucleusSegmenter` therefore uses
classical image analysis: colour deconvolution to haematoxylin, a threshold, and a
distance-transform watershed to split touching nuclei. Learned segmenters can be added later
behind the :class:`NucleusSegmenter` protocol.

Coordinates:
    Everything is in *pixel-edge* coordinates of the picture given to ``segment``: pixel
    ``(row r, col c)`` covers ``[c, c + 1] x [r, r + 1]`` in ``(x, y)``, so the centre of the
    top-left pixel is ``(0.5, 0.5)`` and the picture spans ``[0, W] x [0, H]``. Points are
    ``(x, y)``, x to the right, y downwards, like the rest of the package's level-0 boxes. A
    caller that read the patch at level-0 offset ``(x0, y0)`` with downsample ``d`` gets slide
    coordinates as ``(x0 + x * d, y0 + y * d)`` with no half-pixel correction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, cast, runtime_checkable

import cv2
import numpy as np
import numpy.typing as npt
import shapely
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.segmentation import watershed

from omero_hwsi._types import RGBArray

__all__ = [
    "NUCLEUS_DESCRIPTOR_NAMES",
    "ClassicalNucleusSegmenter",
    "NucleusSegmenter",
    "NucleusSet",
]

NUCLEUS_DESCRIPTOR_NAMES: tuple[str, ...] = (
    "area_um2",
    "perimeter_um",
    "eccentricity",
    "solidity",
    "major_axis_um",
    "minor_axis_um",
    "circularity",
    "mean_h_od",
    "std_h_od",
    "mean_e_od",
    "h_texture",
)
"""Column names of :attr:`NucleusSet.descriptors` for :class:`ClassicalNucleusSegmenter`.

Size (``area_um2``, ``perimeter_um``, ``major_axis_um``, ``minor_axis_um``; physical units so
slides scanned at different resolutions are comparable), shape (``eccentricity``, ``solidity``,
``circularity``; unitless, in [0, 1]), stain (``mean_h_od``, ``std_h_od``, ``mean_e_od``:
haematoxylin and eosin optical density, base-10, inside the nucleus) and texture
(``h_texture``: mean haematoxylin OD gradient magnitude inside the nucleus, per micrometre,
high for coarse chromatin).
"""

# Ruifrok & Johnston (2001) H&E-DAB stain optical-density vectors, one stain per row, in RGB
# order. Rows are normalised to unit length so a concentration of 1 is "one unit of OD".
_RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
# od_row = conc_row @ _RGB_FROM_HED, hence conc_row = od_row @ inv(_RGB_FROM_HED). Only the H and
# E columns are kept (DAB is not used for H&E slides); a third column of ones gives the summed
# RGB optical density in the same matrix product, which is cheaper than a separate reduction.
_HE_TOTAL_FROM_RGB_OD = np.ascontiguousarray(
    np.column_stack([np.linalg.inv(_RGB_FROM_HED)[:, :2], np.ones(3)]), dtype=np.float32
)  # (3 RGB ODs, 3 outputs: H, E, total)

# Optical density of each uint8 intensity, with the +1 offset so black is finite (OD 2.41) and
# white (255) is exactly 0. A lookup table is much faster than a log over every pixel.
_OD_LUT = (-np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)

# Pixels whose summed RGB optical density is below this are glass, not tissue; they are left
# out of the Otsu histogram so a half-empty patch does not put the threshold between glass and
# stroma instead of between stroma and nuclei.
_TISSUE_OD = 0.15


@dataclass(frozen=True, slots=True, eq=False)
class NucleusSet:
    """Nuclei found in one picture, sorted by centroid ``(y, x)``.

    Sorting makes the order independent of labelling details, so two runs (or two segmenter
    versions that find the same nuclei) give identical arrays, and consumers can rely on a
    reading order (top to bottom, then left to right).

    Attributes:
        polygons: One ``(n_i, 2)`` float64 array of ``(x, y)`` vertices per nucleus, in
            pixel-edge coordinates (see the module docstring). The ring is open (the first
            vertex is not repeated), has at least 3 distinct vertices, and is a valid shapely
            polygon. The outline passes through the centres of the nucleus's boundary pixels,
            so its area is about half a perimeter (in pixels) below the pixel count; a nucleus
            pinched into parts by a one-pixel neck is outlined by its largest part.
        centroids: ``(N, 2)`` float64 array of ``(x, y)`` centroids of the nucleus pixels, in
            the same coordinates.
        descriptors: ``(N, D)`` float32 array, one row per nucleus; the column names are the
            segmenter's ``descriptor_names``. Never NaN.
    """

    polygons: tuple[npt.NDArray[np.float64], ...]
    centroids: npt.NDArray[np.float64]
    descriptors: npt.NDArray[np.float32]

    def __post_init__(self) -> None:
        # Normalise dtypes once here so every consumer can trust them, and check that the three
        # fields describe the same nuclei: a mismatch is a bug that would silently misalign
        # features with outlines further down the pipeline.
        polygons = tuple(np.asarray(p, dtype=np.float64) for p in self.polygons)
        centroids = np.asarray(self.centroids, dtype=np.float64).reshape(-1, 2)
        descriptors = np.asarray(self.descriptors, dtype=np.float32)
        if descriptors.ndim != 2:
            raise ValueError(f"descriptors must be 2-D (N, D), got shape {descriptors.shape}")
        n = len(polygons)
        if centroids.shape[0] != n or descriptors.shape[0] != n:
            raise ValueError(
                f"NucleusSet fields disagree: {n} polygons, {centroids.shape[0]} centroids, "
                f"{descriptors.shape[0]} descriptor rows"
            )
        for i, poly in enumerate(polygons):
            if poly.ndim != 2 or poly.shape[1] != 2 or poly.shape[0] < 3:
                raise ValueError(f"polygon {i} must have shape (n >= 3, 2), got {poly.shape}")
        object.__setattr__(self, "polygons", polygons)
        object.__setattr__(self, "centroids", centroids)
        object.__setattr__(self, "descriptors", descriptors)

    def __len__(self) -> int:
        """Number of nuclei."""
        return len(self.polygons)

    @staticmethod
    def empty(n_descriptors: int = len(NUCLEUS_DESCRIPTOR_NAMES)) -> NucleusSet:
        """A set with no nuclei, with correctly shaped (zero-row) arrays.

        Args:
            n_descriptors: Number of descriptor columns, so an empty set stacks with full ones.
        """
        return NucleusSet(
            polygons=(),
            centroids=np.zeros((0, 2), dtype=np.float64),
            descriptors=np.zeros((0, n_descriptors), dtype=np.float32),
        )


@runtime_checkable
class NucleusSegmenter(Protocol):
    """Anything that turns an RGB picture into a :class:`NucleusSet`.

    ``segmenter_id`` and ``version`` identify the method in feature-store metadata, so stored
    nuclei are recomputed when the method changes; ``descriptor_names`` names the columns of
    :attr:`NucleusSet.descriptors`.
    """

    segmenter_id: str
    version: str
    descriptor_names: tuple[str, ...]

    def segment(self, rgb: RGBArray, *, mpp: float) -> NucleusSet:
        """Find the nuclei in ``rgb`` (uint8, ``(H, W, 3)``) scanned at ``mpp`` um per pixel."""
        ...


def _check_input(rgb: Any, mpp: Any) -> tuple[RGBArray, float]:
    """Validate ``segment``'s arguments; raise ValueError naming the bad value.

    Wrong types are ValueErrors too, not TypeErrors: callers handle one exception for "this
    picture or MPP is unusable", whatever the reason.
    """
    if not isinstance(rgb, np.ndarray):
        raise ValueError(f"rgb must be a numpy array, got {type(rgb).__name__}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"rgb must have dtype uint8, got {rgb.dtype}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must have shape (H, W, 3), got {rgb.shape}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"rgb must not be empty, got shape {rgb.shape}")
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float, np.integer, np.floating)):
        raise ValueError(f"mpp must be a positive number, got {mpp!r}")
    mpp_f = float(mpp)
    if not math.isfinite(mpp_f) or mpp_f <= 0.0:
        raise ValueError(f"mpp must be a positive finite number of um per pixel, got {mpp!r}")
    return rgb, mpp_f


def _he_optical_density(rgb: RGBArray) -> tuple[npt.NDArray[np.float32], ...]:
    """Return (haematoxylin OD, eosin OD, total RGB OD) maps, float32, each ``(H, W)``.

    Colour deconvolution separates the purple nuclear stain from the pink one; thresholding the
    haematoxylin channel is far more robust than thresholding darkness, which also catches
    dense eosinophilic stroma and red blood cells.
    """
    od = cv2.LUT(np.ascontiguousarray(rgb), _OD_LUT)  # (H, W, 3) float32
    # cv2.transform applies the 3x3 matrix per pixel; unlike a numpy matmul it does not go
    # through a multithreaded BLAS, whose thread start-up costs more than the sum itself here.
    het = cv2.transform(od, _HE_TOTAL_FROM_RGB_OD.T)
    return tuple(np.ascontiguousarray(het[:, :, k]) for k in range(3))


def _gaussian(image: npt.NDArray[np.float32], sigma_px: float) -> npt.NDArray[np.float32]:
    """Gaussian blur; a no-op for sigmas too small to change anything."""
    if sigma_px < 0.3:
        return image
    blurred = cv2.GaussianBlur(
        image, (0, 0), sigmaX=sigma_px, sigmaY=sigma_px, borderType=cv2.BORDER_REFLECT
    )
    return cast("npt.NDArray[np.float32]", blurred)


def _otsu(values: npt.NDArray[np.float32]) -> float:
    """Otsu's threshold of ``values`` (1-D, not constant), on a 256-level histogram.

    Same criterion as ``skimage.filters.threshold_otsu`` (maximise the between-class
    variance over 256 levels spanning the values), computed by OpenCV on the values quantised
    to uint8, which is several times faster than building the histogram in numpy.

    Returns:
        A threshold ``t``: ``values > t`` is the upper class.
    """
    lo, hi = float(values.min()), float(values.max())
    scale = 255.0 / (hi - lo)
    levels = cv2.convertScaleAbs(values.reshape(1, -1), alpha=scale, beta=-lo * scale)
    t, _ = cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # Level k holds the values that round to k, so "level > t" is "value > lo + (t + 0.5)/scale".
    return lo + (float(t) + 0.5) / scale


class _UnionFind:
    """Tiny union-find over marker indices, to merge over-split peaks."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            # Keep the smaller root so the result does not depend on call order.
            self.parent[max(ri, rj)] = min(ri, rj)


@dataclass(frozen=True, slots=True)
class _Params:
    """The segmenter's parameters converted to pixels for one ``mpp``."""

    min_area_px: float
    max_area_px: float
    sigma_px: float
    min_peak_distance_px: int
    max_hole_px: float
    open_radius_px: int


class ClassicalNucleusSegmenter:
    """Weight-free, deterministic nucleus segmenter for H&E pictures.

    Steps: colour deconvolution to haematoxylin optical density (Ruifrok & Johnston stain
    vectors); Gaussian smoothing; a threshold that is Otsu's over the tissue pixels but never
    below ``min_h_od``, so a picture without nuclei (white glass, plain pink stroma) gives no
    nuclei instead of a segmentation of noise; a small opening, filling of small holes and
    removal of small objects; splitting of touching nuclei by a marker watershed on the
    distance transform, with markers at the distance maxima at least ``min_peak_distance_um``
    apart (``peak_local_max``'s criterion); size filtering to ``[min_area_um2, max_area_um2]``.

    Two distance peaks are only kept apart when the mask narrows between them (the distance
    along the line joining them dips below ``split_saddle_ratio`` times the lower peak). This
    stops elongated nuclei, whose distance map is a long flat ridge, from being chopped into
    pieces, while true touching pairs, which meet at a narrow neck, are split.

    All sizes are given in micrometres and converted with the ``mpp`` passed to
    :meth:`segment`, so the same instance works at any resolution.

    Attributes:
        segmenter_id: ``"classical"``.
        version: Bumped whenever the output for a given input changes.
        descriptor_names: :data:`NUCLEUS_DESCRIPTOR_NAMES`.
    """

    segmenter_id: str = "classical"
    version: str = "1"
    descriptor_names: tuple[str, ...] = NUCLEUS_DESCRIPTOR_NAMES

    def __init__(
        self,
        *,
        min_area_um2: float = 12.0,
        max_area_um2: float = 400.0,
        min_h_od: float = 0.25,
        smoothing_sigma_um: float = 0.5,
        min_peak_distance_um: float = 3.0,
        split_saddle_ratio: float = 0.75,
        max_hole_um2: float = 20.0,
        opening_radius_um: float = 0.5,
    ) -> None:
        """Set the segmentation parameters (all lengths in um, areas in um^2).

        Args:
            min_area_um2: Smallest nucleus kept; smaller objects are debris or noise.
            max_area_um2: Largest nucleus kept; larger objects are clumps or dark artefacts.
            min_h_od: Floor of the haematoxylin OD threshold (base-10 OD units). Nuclei in
                H&E are typically above 0.4, stroma and cytoplasm below 0.2.
            smoothing_sigma_um: Gaussian sigma applied to the haematoxylin map before the
                threshold, to smooth chromatin texture and JPEG noise.
            min_peak_distance_um: Minimum distance between two nucleus centres; about the
                radius of a small nucleus.
            split_saddle_ratio: In (0, 1]; see the class docstring. Higher splits more.
            max_hole_um2: Holes in a nucleus mask up to this area are filled (pale chromatin,
                nucleoli); larger ones are real gaps between nuclei.
            opening_radius_um: Radius of the morphological opening that removes thin bridges
                and specks; 0 disables it.

        Raises:
            ValueError: If a parameter is out of range.
        """
        values = {
            "min_area_um2": min_area_um2,
            "max_area_um2": max_area_um2,
            "min_h_od": min_h_od,
            "smoothing_sigma_um": smoothing_sigma_um,
            "min_peak_distance_um": min_peak_distance_um,
            "split_saddle_ratio": split_saddle_ratio,
            "max_hole_um2": max_hole_um2,
            "opening_radius_um": opening_radius_um,
        }
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        if min_area_um2 <= 0 or max_area_um2 <= min_area_um2:
            raise ValueError(
                f"need 0 < min_area_um2 < max_area_um2, got {min_area_um2!r} and {max_area_um2!r}"
            )
        if min_h_od <= 0:
            raise ValueError(f"min_h_od must be > 0, got {min_h_od!r}")
        if not 0 < split_saddle_ratio <= 1:
            raise ValueError(f"split_saddle_ratio must be in (0, 1], got {split_saddle_ratio!r}")
        if min_peak_distance_um <= 0:
            raise ValueError(f"min_peak_distance_um must be > 0, got {min_peak_distance_um!r}")
        self.min_area_um2 = float(min_area_um2)
        self.max_area_um2 = float(max_area_um2)
        self.min_h_od = float(min_h_od)
        self.smoothing_sigma_um = float(smoothing_sigma_um)
        self.min_peak_distance_um = float(min_peak_distance_um)
        self.split_saddle_ratio = float(split_saddle_ratio)
        self.max_hole_um2 = float(max_hole_um2)
        self.opening_radius_um = float(opening_radius_um)

    @property
    def params(self) -> dict[str, float]:
        """The parameters, for provenance records next to ``segmenter_id`` and ``version``."""
        return {
            "min_area_um2": self.min_area_um2,
            "max_area_um2": self.max_area_um2,
            "min_h_od": self.min_h_od,
            "smoothing_sigma_um": self.smoothing_sigma_um,
            "min_peak_distance_um": self.min_peak_distance_um,
            "split_saddle_ratio": self.split_saddle_ratio,
            "max_hole_um2": self.max_hole_um2,
            "opening_radius_um": self.opening_radius_um,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"ClassicalNucleusSegmenter({args})"

    def _pixel_params(self, mpp: float) -> _Params:
        px_area = mpp * mpp
        return _Params(
            min_area_px=self.min_area_um2 / px_area,
            max_area_px=self.max_area_um2 / px_area,
            sigma_px=self.smoothing_sigma_um / mpp,
            min_peak_distance_px=max(1, round(self.min_peak_distance_um / mpp)),
            max_hole_px=self.max_hole_um2 / px_area,
            open_radius_px=round(self.opening_radius_um / mpp),
        )

    # ------------------------------------------------------------------------------------
    def segment(self, rgb: RGBArray, *, mpp: float) -> NucleusSet:
        """Find the nuclei in one picture.

        Args:
            rgb: uint8 picture, shape ``(H, W, 3)``, RGB order.
            mpp: Microns per pixel of ``rgb`` (after any downsampling), > 0.

        Returns:
            The nuclei, sorted by centroid ``(y, x)``; empty if there are none.

        Raises:
            ValueError: If ``rgb`` is not a uint8 ``(H, W, 3)`` array or ``mpp`` is not a
                positive finite number.
        """
        rgb, mpp = _check_input(rgb, mpp)
        p = self._pixel_params(mpp)
        h_od, e_od, total_od = _he_optical_density(rgb)
        h_smooth = _gaussian(h_od, p.sigma_px)

        components = self._foreground(h_smooth, total_od, p)
        if components is None:
            return NucleusSet.empty()
        labels, split_mask = self._split(components, p)
        return self._measure(labels, split_mask, h_od, e_od, mpp, p)

    def _foreground(
        self,
        h_smooth: npt.NDArray[np.float32],
        total_od: npt.NDArray[np.float32],
        p: _Params,
    ) -> npt.NDArray[np.int32] | None:
        """Threshold and clean the haematoxylin map.

        Returns:
            The 8-connected components of the cleaned mask as an int32 label image (labels
            need not be consecutive; 0 is background), or None when nothing can be a nucleus.
        """
        # Cheap early exit for glass and pale pictures: nothing reaches the floor.
        if float(h_smooth.max()) <= self.min_h_od:
            return None
        tissue = h_smooth[total_od > _TISSUE_OD]
        threshold = self.min_h_od
        if tissue.size >= 16 and float(tissue.max()) > float(tissue.min()):
            threshold = max(threshold, _otsu(tissue))
        mask = (h_smooth > threshold).astype(np.uint8)

        if p.open_radius_px >= 1:
            k = 2 * p.open_radius_px + 1
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
            mask = cast("npt.NDArray[np.uint8]", cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel))

        # Fill small holes (pale chromatin, nucleoli). The holes are the inner contours of a
        # two-level contour tree; filling the small ones with drawContours costs a fraction of
        # labelling the background. A hole's contour runs through the foreground pixels around
        # it, so its area slightly overstates the hole's: fine for a size cut.
        contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        if hierarchy is not None:
            small_holes = [
                c
                for c, (_, _, _, parent) in zip(contours, hierarchy[0])
                if parent >= 0 and cv2.contourArea(c) <= p.max_hole_px
            ]
            if small_holes:
                cv2.drawContours(mask, small_holes, -1, 1, thickness=cv2.FILLED)

        # Remove components too small to hold even one nucleus.
        n_fg, fg_lab = cv2.connectedComponents(mask, connectivity=8, ltype=cv2.CV_32S)
        keep = np.bincount(fg_lab.ravel(), minlength=n_fg) >= p.min_area_px
        keep[0] = False
        if not keep.any():
            return None
        if not keep[1:].all():
            fg_lab[~keep[fg_lab]] = 0
        return cast("npt.NDArray[np.int32]", fg_lab)

    def _split(
        self, components: npt.NDArray[np.int32], p: _Params
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.bool_]]:
        """Split components holding touching nuclei by a marker watershed on the distance map.

        Markers are the maxima of the smoothed distance transform over a square window of
        half-width ``min_peak_distance_um``: what ``skimage.feature.peak_local_max`` finds with
        that ``min_distance`` and no labels, computed for the whole picture with one maximum
        filter, which is far cheaper than a search per component. (Without labels, a peak
        closer than the window to a higher point of a neighbouring object is suppressed; such
        a peak belongs to a lobe too small to be a nucleus of its own.) Peaks on one flat top
        or ridge are grouped by :meth:`_merge_peaks`; only components left with two or more
        groups are split, all in one watershed call, so isolated nuclei cost nothing here.

        Returns:
            The label image (unsplit components keep their label, pieces get new ones) and the
            mask of pixels whose objects were split (their outlines may touch a neighbour's).
        """
        mask = (components > 0).astype(np.uint8)
        dist = cast(
            "npt.NDArray[np.float32]", cv2.distanceTransform(mask, cv2.DIST_L2, cv2.DIST_MASK_5)
        )
        # Smoothing the distance map removes the one-pixel wiggles that rough outlines create,
        # which would otherwise become spurious peaks.
        dist = _gaussian(dist, 1.0) * mask
        md = p.min_peak_distance_px
        kernel = np.ones((2 * md + 1, 2 * md + 1), dtype=np.uint8)
        dilated = cv2.dilate(dist, kernel, borderType=cv2.BORDER_REPLICATE)
        is_peak = ((dist >= dilated) & (dist >= 1.0)).astype(np.uint8)
        # A flat top marks many touching pixels; keep one per touching group (the first in
        # reading order). Without this a large flat blob (e.g. a picture that is all
        # foreground, whose distance map is constant) would yield thousands of peaks.
        _, tops = cv2.connectedComponents(is_peak, connectivity=8, ltype=cv2.CV_32S)
        rr, cc = np.nonzero(is_peak)  # in reading order
        _, first = np.unique(tops[rr, cc], return_index=True)
        rr, cc = rr[first], cc[first]
        peak_labels = components[rr, cc]
        n_lab = int(components.max()) + 1
        counts = np.bincount(peak_labels, minlength=n_lab)
        split_mask = np.zeros(mask.shape, dtype=bool)
        if not (counts >= 2).any():
            return components, split_mask
        # A component smaller than two minimum nuclei cannot be two nuclei.
        areas = np.bincount(components.ravel(), minlength=n_lab)
        eligible = (counts >= 2) & (areas >= 2 * p.min_area_px)
        sel = eligible[peak_labels]
        rr, cc, peak_labels = rr[sel], cc[sel], peak_labels[sel]
        if rr.size == 0:
            return components, split_mask

        group = self._merge_peaks(dist, rr, cc, peak_labels, md)
        # One marker label per group; a component is split when it holds two or more groups.
        group_ids, first = np.unique(group, return_index=True)
        n_groups = np.bincount(peak_labels[first], minlength=n_lab)
        is_split = n_groups >= 2
        if not is_split.any():
            return components, split_mask
        on_split = is_split[peak_labels]
        markers = np.zeros(mask.shape, dtype=np.int32)
        markers[rr[on_split], cc[on_split]] = (
            n_lab + np.searchsorted(group_ids, group[on_split])
        ).astype(np.int32)
        split_mask = is_split[components]
        # Flood only the bounding box of the split components: watershed's cost is per pixel.
        r_idx, c_idx = np.nonzero(split_mask)
        box = (slice(r_idx.min(), r_idx.max() + 1), slice(c_idx.min(), c_idx.max() + 1))
        # 4-neighbour flooding gives straight cuts between nuclei (8-neighbour flooding leaves
        # them ragged, which spoils the shape descriptors). A pixel joined to its component
        # only diagonally stays unflooded (label 0) and simply belongs to no nucleus.
        ws = watershed(-dist[box], markers[box], mask=split_mask[box], connectivity=1)  # type: ignore[no-untyped-call]
        labels = components.copy()
        labels[box][split_mask[box]] = ws[split_mask[box]]
        return labels, split_mask

    def _merge_peaks(
        self,
        dist: npt.NDArray[np.float32],
        rr: npt.NDArray[np.intp],
        cc: npt.NDArray[np.intp],
        peak_labels: npt.NDArray[np.int32],
        md: int,
    ) -> npt.NDArray[np.intp]:
        """Group the distance peaks of each component that are not separated by a neck.

        Two peaks of the same component are joined when the distance map along the segment
        between them never drops below ``split_saddle_ratio`` times the lower peak: the mask
        does not narrow between them, so they are one nucleus (an elongated one, or a flat
        top that the maximum filter marked more than once). Joining is transitive, so a long
        ridge with several peaks becomes one group. Only pairs within ``8 * md`` pixels are
        compared, which bounds the work; farther peaks of one nucleus are still joined through
        the peaks in between.

        Returns:
            A group id per peak: the index of the group's first peak.
        """
        n = rr.size
        uf = _UnionFind(n)
        pts = np.stack([rr, cc], axis=1).astype(np.float64)
        pairs = cKDTree(pts).query_pairs(r=8 * md, p=np.inf, output_type="ndarray")
        pairs = pairs[peak_labels[pairs[:, 0]] == peak_labels[pairs[:, 1]]]
        if len(pairs):
            ii, jj = pairs[:, 0], pairs[:, 1]
            heights = dist[rr, cc]
            delta = pts[jj] - pts[ii]
            # Sample every segment at the same number of points, enough for the longest to be
            # sampled at least once per pixel, so no one-pixel neck is stepped over.
            steps = int(np.abs(delta).max()) + 1
            t = np.linspace(0.0, 1.0, steps)
            line = np.rint(pts[ii][:, None, :] + t[None, :, None] * delta[:, None, :])
            line = line.astype(np.intp)
            saddle = dist[line[..., 0], line[..., 1]].min(axis=1)
            joined = saddle >= self.split_saddle_ratio * np.minimum(heights[ii], heights[jj])
            for i, j in zip(ii[joined].tolist(), jj[joined].tolist()):
                uf.union(i, j)
        return np.asarray([uf.find(i) for i in range(n)], dtype=np.intp)

    def _measure(
        self,
        labels: npt.NDArray[np.int32],
        split_mask: npt.NDArray[np.bool_],
        h_od: npt.NDArray[np.float32],
        e_od: npt.NDArray[np.float32],
        mpp: float,
        p: _Params,
    ) -> NucleusSet:
        """Outline and describe every labelled object that passes the size and shape checks.

        Per-pixel statistics (area, centroid, second moments, stain means, texture) come from
        ``np.bincount`` over the foreground pixels, once for all nuclei, and the outlines of
        all unsplit objects from one ``findContours`` call; only split pieces, which may touch
        a neighbour, are outlined one by one. This keeps a dense patch within milliseconds.
        """
        hh, ww = labels.shape
        n_lab = int(labels.max()) + 1
        fg = np.flatnonzero(labels)
        lab = labels.ravel()[fg]
        rows_i = (fg // ww).astype(np.float64)
        cols_i = (fg % ww).astype(np.float64)

        def per_label(weights: npt.NDArray[Any] | None) -> npt.NDArray[np.float64]:
            return np.bincount(lab, weights=weights, minlength=n_lab).astype(np.float64)

        area = per_label(None)
        safe = np.maximum(area, 1.0)
        mean_r = per_label(rows_i) / safe
        mean_c = per_label(cols_i) / safe
        cx_all = mean_c + 0.5  # pixel (r, c) has its centre at (c + 0.5, r + 0.5)
        cy_all = mean_r + 0.5
        wanted = (
            (area >= p.min_area_px)
            & (area <= p.max_area_px)
            & (cx_all >= 0)
            & (cx_all <= ww)
            & (cy_all >= 0)
            & (cy_all <= hh)
        )
        wanted[0] = False
        if not wanted.any():
            return NucleusSet.empty()

        contours = _outlines(labels, split_mask, wanted)
        kept: list[int] = []
        polygons: list[npt.NDArray[np.float64]] = []
        shape_rows: list[tuple[float, float, float]] = []
        for idx in sorted(contours):
            contour = contours[idx]
            if len(contour) < 3:  # a line or a point: nothing to outline
                continue
            contour_area = float(cv2.contourArea(contour))
            hull_area = float(cv2.contourArea(cv2.convexHull(contour)))
            perimeter = float(cv2.arcLength(contour, True))
            solidity = min(1.0, contour_area / hull_area) if hull_area > 0 else 1.0
            circularity = (
                min(1.0, 4.0 * math.pi * contour_area / (perimeter * perimeter))
                if perimeter > 0
                else 0.0
            )
            kept.append(idx)
            polygons.append(contour.reshape(-1, 2).astype(np.float64) + 0.5)
            shape_rows.append((perimeter, solidity, circularity))
        if not kept:
            return NucleusSet.empty()
        polygons, valid = _validate_polygons(polygons)
        idx_arr = np.asarray(kept, dtype=np.intp)[valid]
        if idx_arr.size == 0:
            return NucleusSet.empty()
        shape = np.asarray(shape_rows, dtype=np.float64).reshape(-1, 3)[valid]

        # Ellipse axes from the eigenvalues of the coordinate covariance, as regionprops.
        a = per_label(rows_i * rows_i)[idx_arr] / safe[idx_arr] - mean_r[idx_arr] ** 2
        b = per_label(cols_i * cols_i)[idx_arr] / safe[idx_arr] - mean_c[idx_arr] ** 2
        c = per_label(rows_i * cols_i)[idx_arr] / safe[idx_arr] - mean_r[idx_arr] * mean_c[idx_arr]
        half_diff = np.sqrt(((a - b) / 2.0) ** 2 + c * c)
        l1 = np.maximum((a + b) / 2.0 + half_diff, 0.0)
        l2 = np.maximum((a + b) / 2.0 - half_diff, 0.0)
        eccentricity = np.where(
            l1 > 0, np.sqrt(np.clip(1.0 - l2 / np.maximum(l1, 1e-12), 0.0, 1.0)), 0.0
        )

        h_fg = h_od.ravel()[fg].astype(np.float64)
        mean_h = per_label(h_fg) / safe
        var_h = np.maximum(per_label(h_fg * h_fg) / safe - mean_h * mean_h, 0.0)
        mean_e = per_label(e_od.ravel()[fg]) / safe

        # Texture inside the nucleus, not along its edge: the edge gradient is similar for all
        # nuclei and would swamp chromatin texture. "Inside" = all 8 neighbours share the label;
        # nuclei too thin to have an inside fall back to all their pixels.
        grad = _sobel_magnitude(h_od).ravel()[fg]  # OD per pixel
        lab_f = labels.astype(np.float32)  # exact: label values are far below 2**24
        k3 = np.ones((3, 3), dtype=np.uint8)
        inside = (cv2.erode(lab_f, k3, borderType=cv2.BORDER_REPLICATE) == lab_f) & (
            cv2.dilate(lab_f, k3, borderType=cv2.BORDER_REPLICATE) == lab_f
        )
        inside_fg = inside.ravel()[fg]
        inner_n = per_label(inside_fg.astype(np.float64))
        inner_g = per_label(np.where(inside_fg, grad, 0.0))
        texture = np.where(inner_n > 0, inner_g / np.maximum(inner_n, 1.0), per_label(grad) / safe)

        desc = np.column_stack(
            [
                area[idx_arr] * mpp * mpp,
                shape[:, 0] * mpp,
                eccentricity,
                shape[:, 1],
                4.0 * np.sqrt(l1) * mpp,
                4.0 * np.sqrt(l2) * mpp,
                shape[:, 2],
                mean_h[idx_arr],
                np.sqrt(var_h[idx_arr]),
                mean_e[idx_arr],
                texture[idx_arr] / mpp,
            ]
        )
        desc = np.nan_to_num(desc, nan=0.0, posinf=0.0, neginf=0.0)
        cents = np.column_stack([cx_all[idx_arr], cy_all[idx_arr]])
        order = np.lexsort((cents[:, 0], cents[:, 1]))  # by y, then x
        return NucleusSet(
            polygons=tuple(polygons[i] for i in order),
            centroids=cents[order],
            descriptors=desc[order].astype(np.float32),
        )


def _outlines(
    labels: npt.NDArray[np.int32],
    split_mask: npt.NDArray[np.bool_],
    wanted: npt.NDArray[np.bool_],
) -> dict[int, npt.NDArray[np.int32]]:
    """Outer OpenCV contour (picture pixel indices, ``(n, 1, 2)`` x, y) of each wanted label.

    Objects that were not split are separate 8-connected components, so one ``findContours``
    call on their joint mask outlines them all, each contour identified by the label under its
    first point. Split pieces touch their neighbours, and an object lying inside another's
    hole has no external contour of its own there; those are outlined one by one on their own
    mask. A piece that came out in several parts is outlined by its largest part.
    """
    out: dict[int, npt.NDArray[np.int32]] = {}
    whole = (wanted[labels] & ~split_mask).astype(np.uint8)
    # One pixel of padding so objects touching the picture border still get closed outlines.
    padded = cv2.copyMakeBorder(whole, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    contours, _ = cv2.findContours(
        padded, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(-1, -1)
    )
    for contour in contours:
        x, y = contour[0, 0]
        out[int(labels[y, x])] = cast("npt.NDArray[np.int32]", contour)

    missing = wanted.copy()
    missing[list(out)] = False
    if not missing.any():
        return out
    alone = missing[labels]
    # Bounding boxes from the region of those objects only: find_objects over the whole
    # picture would cost more than all the outlines.
    r_idx, c_idx = np.nonzero(alone)
    r0, c0 = int(r_idx.min()), int(c_idx.min())
    box = (slice(r0, int(r_idx.max()) + 1), slice(c0, int(c_idx.max()) + 1))
    region = np.where(alone[box], labels[box], 0)
    for idx0, sl in enumerate(ndi.find_objects(region)):
        idx = idx0 + 1
        if sl is None:
            continue
        obj = cv2.copyMakeBorder(
            (region[sl] == idx).astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0
        )
        found, _ = cv2.findContours(
            obj,
            cv2.RETR_EXTERNAL,
            cv2.CHAIN_APPROX_SIMPLE,
            offset=(c0 + sl[1].start - 1, r0 + sl[0].start - 1),
        )
        if found:
            out[idx] = max(found, key=lambda c: (cv2.contourArea(c), len(c)))
    return out


def _validate_polygons(
    polygons: list[npt.NDArray[np.float64]],
) -> tuple[list[npt.NDArray[np.float64]], npt.NDArray[np.bool_]]:
    """Make every outline a valid polygon, or mark it for dropping.

    Outlines through one-pixel necks touch themselves, which shapely (and GeoJSON consumers
    like QuPath) reject. Those are repaired with ``make_valid`` and the largest resulting
    polygon's exterior is kept. Validity is checked for all outlines in one vectorised call.

    Returns:
        The (possibly repaired) outlines of the kept nuclei, and a boolean per input outline
        saying whether it was kept.
    """
    coords = np.concatenate(polygons, axis=0)
    index = np.repeat(np.arange(len(polygons)), [len(q) for q in polygons])
    geoms = shapely.polygons(shapely.linearrings(coords, indices=index))
    ok = shapely.is_valid(geoms) & (shapely.area(geoms) > 0)
    keep = np.ones(len(polygons), dtype=bool)
    out: list[npt.NDArray[np.float64]] = []
    for i in range(len(polygons)):
        if ok[i]:
            out.append(polygons[i])
            continue
        # buffer(0) resolves a pinched ring into its parts and is much cheaper than
        # make_valid, which remains the fallback for anything buffer(0) collapses.
        repaired = shapely.buffer(geoms[i], 0.0)
        if repaired.is_empty:
            repaired = shapely.make_valid(geoms[i])
        parts = [g for g in getattr(repaired, "geoms", [repaired]) if g.geom_type == "Polygon"]
        parts = [g for g in parts if g.area > 0]
        fixed = None
        if parts:
            best = max(parts, key=lambda g: g.area)
            pts = _drop_repeats(np.asarray(best.exterior.coords, dtype=np.float64))
            if len(pts) >= 3 and shapely.Polygon(pts).is_valid:
                fixed = pts
        if fixed is None:
            keep[i] = False
        else:
            out.append(fixed)
    return out, keep


def _drop_repeats(pts: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Remove consecutive duplicate vertices (and a closing vertex equal to the first)."""
    if len(pts) == 0:
        return pts
    keep = np.ones(len(pts), dtype=bool)
    keep[1:] = np.any(pts[1:] != pts[:-1], axis=1)
    pts = pts[keep]
    if len(pts) > 1 and np.all(pts[0] == pts[-1]):
        pts = pts[:-1]
    return pts


def _sobel_magnitude(image: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
    """Sobel gradient magnitude (3x3, scale 1/8, mirrored border), in float64 with numpy.

    OpenCV's float32 Sobel and magnitude take vectorised or scalar code paths depending on
    where a buffer happens to lie in memory, so the same patch could give a last-bit different
    texture from run to run; plain elementwise numpy is exactly rounded the same way every
    time, which keeps extraction, and the demo model trained on it, byte-for-byte repeatable.
    """
    p = np.pad(image.astype(np.float64), 1, mode="reflect")  # = BORDER_REFLECT_101
    dx = p[:, 2:] - p[:, :-2]
    dy = p[2:, :] - p[:-2, :]
    gx = (dx[:-2] + 2.0 * dx[1:-1] + dx[2:]) * 0.125
    gy = (dy[:, :-2] + 2.0 * dy[:, 1:-1] + dy[:, 2:]) * 0.125
    out: npt.NDArray[np.float64] = np.sqrt(gx * gx + gy * gy)
    return out
