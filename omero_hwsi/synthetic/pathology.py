"""Synthetic pathology slides with ground truth: a class per region, every nucleus known.

Real slides come without pixel-exact answers, so nothing can check that an answer's
evidence points at the right region or that the cell scale really carries information.
These slides can: a :class:`SlideSpec` (a grid of regions, a tissue class each, a seed)
renders to a pyramidal Aperio SVS (through :func:`~omero_hwsi.synthetic.svs.write_svs`) and
a :class:`SlideTruth` holding the region classes and outlines (region ids ``r<i>`` of our
grid for the spec's :class:`~omero_hwsi.slide.grid.GridSpec`), every nucleus polygon with
its class, and the artefacts. The classes (:mod:`omero_hwsi.synthetic.classes`) are made so
that some differ in patch colour and others only in nuclear shape.

Region ``i`` of the spec is region ``r<i>`` of :func:`~omero_hwsi.slide.hierarchy.build_hierarchy`
on the rendered file: the slide is exactly ``cols x rows`` regions of ``region_px`` pixels at
the grid's ``target_mpp``, anchored at level-0 (0, 0). The same spec gives a byte-identical
file and truth on the same machine (seeded numpy, OpenCV, libjpeg).
"""

from __future__ import annotations

import logging
import math
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry

from omero_hwsi._types import Box, RGBArray
from omero_hwsi.results.geojson import feature_id, qupath_feature, write_feature_collection
from omero_hwsi.slide.grid import GridSpec
from omero_hwsi.slide.hierarchy import region_hid
from omero_hwsi.synthetic import _paint
from omero_hwsi.synthetic.classes import CLASS_NAMES, TISSUE_CLASSES, tissue_class
from omero_hwsi.synthetic.svs import _Waves, write_svs

__all__ = [
    "DEMO_GRID",
    "ArtefactKind",
    "ArtefactSpec",
    "ArtefactTruth",
    "NucleusTruth",
    "RegionTruth",
    "SlideSpec",
    "SlideTruth",
    "paint_slide",
    "region_location",
    "render_slide",
    "write_truth_geojson",
]

logger = logging.getLogger(__name__)

DEMO_GRID = GridSpec(region_px=1024, patch_px=256)
"""Small regions (512 um) of 16 patches: slides of a few regions render and extract fast."""

ArtefactKind = Literal["pen", "fold", "bubble"]

_SLIDE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_MARGIN = (0.04, 0.09)
"""Range of the glass margin around the tissue, as a fraction of a region side."""
_PEN_MARGIN = (0.16, 0.2)
"""Wider margin on the side that carries an ink stroke."""
_MAX_PIXELS = 1 << 28
"""Level 0 is painted in memory; beyond 268 M px (800 MB of RGB) use fewer regions."""
_CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "normal": (80, 160, 80),
    "tumour": (200, 0, 0),
    "stroma": (150, 200, 150),
    "necrosis": (50, 50, 50),
    "epithelioid": (220, 120, 0),
    "spindle": (0, 120, 220),
}


@dataclass(frozen=True, slots=True)
class ArtefactSpec:
    """An artefact to paint: an ink stroke on the glass, or a fold or bubble over a region.

    Attributes:
        kind: ``pen`` (ink on the glass beside the tissue), ``fold`` (a band of doubled,
            darker tissue) or ``bubble`` (a disc with a dark rim, slightly paler inside).
        region: Region grid index the fold or bubble lies in (the region is *flagged*);
            ``None`` for ``pen``, which is always on background.
    """

    kind: ArtefactKind
    region: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("pen", "fold", "bubble"):
            raise ValueError(f"artefact kind must be pen, fold or bubble, got {self.kind!r}")
        if self.kind == "pen" and self.region is not None:
            raise ValueError("a pen artefact lies on the glass: give no region")
        if self.kind != "pen" and (
            not isinstance(self.region, int) or isinstance(self.region, bool) or self.region < 0
        ):
            raise ValueError(f"a {self.kind} artefact needs a region index >= 0")


@dataclass(frozen=True, slots=True)
class SlideSpec:
    """Everything a synthetic slide is rendered from.

    Attributes:
        slide_id: File stem and id in every dataset file (letters, digits, ``-``, ``_``).
        rows: Regions per column of the grid.
        cols: Regions per row of the grid.
        classes: Tissue class of each region, row-major (region ``i`` = row ``i // cols``,
            column ``i % cols``), names from :data:`~omero_hwsi.synthetic.classes.CLASS_NAMES`.
        grid: The region/patch grid the slide is laid out for; ``target_mpp / mpp`` must
            be a whole number so regions are whole level-0 pixels.
        mpp: Microns per level-0 pixel: 0.5, or 0.25 (twice the pixels per side and a
            pyramid level at 0.5).
        seed: Seed of every random choice (layout, nuclei, texture, noise).
        artefacts: Artefacts to paint (at most one fold or bubble per region).
    """

    slide_id: str
    rows: int
    cols: int
    classes: tuple[str, ...]
    grid: GridSpec = field(default_factory=lambda: DEMO_GRID)
    mpp: float = 0.5
    seed: int = 0
    artefacts: tuple[ArtefactSpec, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.slide_id, str) or not _SLIDE_ID.match(self.slide_id):
            raise ValueError(
                f"slide_id must be letters, digits, '-' or '_' (no dots or slashes), "
                f"got {self.slide_id!r}"
            )
        for name, minimum in (("rows", 1), ("cols", 1), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        object.__setattr__(self, "classes", tuple(self.classes))
        if len(self.classes) != self.rows * self.cols:
            raise ValueError(
                f"classes must name one class per region: {self.rows} x {self.cols} regions, "
                f"got {len(self.classes)} classes"
            )
        for name in self.classes:
            tissue_class(name)
        if not (isinstance(self.mpp, (int, float)) and math.isfinite(self.mpp) and self.mpp > 0):
            raise ValueError(f"mpp must be a positive number, got {self.mpp!r}")
        ratio = self.grid.target_mpp / self.mpp
        if ratio < 1.0 - 1e-9 or abs(ratio - round(ratio)) > 1e-9:
            raise ValueError(
                f"mpp {self.mpp} must divide the grid's target_mpp {self.grid.target_mpp} "
                "a whole number of times (e.g. 0.5 or 0.25 for 0.5 um/px)"
            )
        object.__setattr__(self, "artefacts", tuple(self.artefacts))
        flagged = [a.region for a in self.artefacts if a.region is not None]
        if any(r >= self.rows * self.cols for r in flagged):
            raise ValueError(f"artefact region out of range: {flagged} for {self.n_regions} regions")
        if len(set(flagged)) != len(flagged):
            raise ValueError(f"at most one fold or bubble per region, got regions {flagged}")
        if self.width * self.height > _MAX_PIXELS:
            raise ValueError(
                f"slide of {self.width} x {self.height} px is too large to paint in memory "
                f"(limit {_MAX_PIXELS} px); use fewer or smaller regions"
            )

    @property
    def n_regions(self) -> int:
        """Number of regions, ``rows * cols``."""
        return self.rows * self.cols

    @property
    def level0_per_px(self) -> int:
        """Level-0 pixels per pixel at the grid's target MPP (1 at 0.5, 2 at 0.25)."""
        return int(round(self.grid.target_mpp / self.mpp))

    @property
    def region_level0(self) -> int:
        """Side of a region in level-0 pixels."""
        return self.grid.region_px * self.level0_per_px

    @property
    def width(self) -> int:
        """Slide width in level-0 pixels."""
        return self.cols * self.region_level0

    @property
    def height(self) -> int:
        """Slide height in level-0 pixels."""
        return self.rows * self.region_level0

    @property
    def downsamples(self) -> tuple[int, ...]:
        """Pyramid downsamples: 1, the grid's target MPP when finer, then x4 and x16 of it."""
        r = self.level0_per_px
        levels = [1, r, 4 * r, 16 * r]
        return tuple(sorted(set(levels)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (for dataset manifests)."""
        return {
            "slide_id": self.slide_id,
            "rows": self.rows,
            "cols": self.cols,
            "classes": list(self.classes),
            "grid": self.grid.to_dict(),
            "mpp": self.mpp,
            "seed": self.seed,
            "artefacts": [{"kind": a.kind, "region": a.region} for a in self.artefacts],
        }


@dataclass(frozen=True, slots=True, eq=False)
class RegionTruth:
    """One region: its id, class, place and outline on tissue.

    Attributes:
        hid: ``r<i>``, the hierarchy id of this region for the spec's grid.
        index: Grid index ``i`` (row-major).
        row: Grid row (0 = top).
        col: Grid column (0 = left).
        location: Words for where it is (``"upper left"``), see :func:`region_location`.
        tissue_class: Class name.
        box: ``(x, y, w, h)`` in level-0 pixels.
        geometry: The tissue inside the box (level-0 pixels).
        artefacts: Kinds of artefact over this region (``fold``, ``bubble``).
        n_nuclei: Truth nuclei in the region.
        n_debris: Nuclear fragments drawn (not nuclei; necrosis only).
    """

    hid: str
    index: int
    row: int
    col: int
    location: str
    tissue_class: str
    box: Box
    geometry: BaseGeometry
    artefacts: tuple[str, ...]
    n_nuclei: int
    n_debris: int


@dataclass(frozen=True, slots=True, eq=False)
class NucleusTruth:
    """Every drawn nucleus, as flat arrays (``N`` nuclei, ``V`` vertices each).

    Attributes:
        polygons: ``(N, V, 2)`` outline vertices ``(x, y)`` in level-0 pixels (open rings).
        centroids: ``(N, 2)`` centres in level-0 pixels.
        region: ``(N,)`` grid index of the region holding the nucleus.
        class_index: ``(N,)`` index into :data:`~omero_hwsi.synthetic.classes.CLASS_NAMES`.
        semi_axes_um: ``(N, 2)`` semi-major and semi-minor axis in um (before wobble).
    """

    polygons: npt.NDArray[np.float64]
    centroids: npt.NDArray[np.float64]
    region: npt.NDArray[np.int64]
    class_index: npt.NDArray[np.int64]
    semi_axes_um: npt.NDArray[np.float64]

    def __len__(self) -> int:
        """Number of nuclei."""
        return int(self.region.shape[0])

    def class_name(self, n: int) -> str:
        """Class of nucleus ``n``."""
        return CLASS_NAMES[int(self.class_index[n])]


@dataclass(frozen=True, slots=True, eq=False)
class ArtefactTruth:
    """A painted artefact: its kind, the flagged region (``None`` on glass) and its outline."""

    kind: ArtefactKind
    region: str | None
    geometry: BaseGeometry


@dataclass(frozen=True, slots=True, eq=False)
class SlideTruth:
    """Ground truth of a rendered slide, in level-0 pixels.

    Attributes:
        spec: What was rendered.
        tissue: The tissue section (lumina of glands are not cut out).
        regions: One entry per region, in grid order.
        nuclei: Every nucleus drawn.
        artefacts: Every artefact drawn.
    """

    spec: SlideSpec
    tissue: BaseGeometry
    regions: tuple[RegionTruth, ...]
    nuclei: NucleusTruth
    artefacts: tuple[ArtefactTruth, ...]

    @property
    def slide_id(self) -> str:
        """The spec's slide id."""
        return self.spec.slide_id

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` in level-0 pixels."""
        return self.spec.width, self.spec.height

    def classes_present(self) -> tuple[str, ...]:
        """Classes of at least one region, in vocabulary order."""
        present = {r.tissue_class for r in self.regions}
        return tuple(name for name in CLASS_NAMES if name in present)

    def regions_of(self, name: str) -> tuple[RegionTruth, ...]:
        """Regions of class ``name``, in grid order."""
        return tuple(r for r in self.regions if r.tissue_class == name)


def region_location(row: int, col: int, rows: int, cols: int) -> str:
    """Words for a region's place on the slide, unique within grids of up to 3 x 3.

    ``upper``/``middle``/``lower`` by row and ``left``/``centre``/``right`` by column, the
    part that does not vary dropped (a single row says only ``left`` ... ``right``). Larger
    grids say ``row r, column c`` (1-based) so that every region keeps a distinct name.
    """
    if rows > 3 or cols > 3:
        return f"row {row + 1}, column {col + 1}"
    vertical = {1: [""], 2: ["upper", "lower"], 3: ["upper", "middle", "lower"]}[rows][row]
    horizontal = {1: [""], 2: ["left", "right"], 3: ["left", "centre", "right"]}[cols][col]
    words = " ".join(w for w in (vertical, horizontal) if w)
    if words == "middle centre":
        return "centre"
    return words or "whole slide"


# --------------------------------------------------------------------------------------------
# Painting
# --------------------------------------------------------------------------------------------
def _streams(seed: int, n_regions: int) -> tuple[np.random.Generator, list[np.random.Generator]]:
    """One generator for the slide layout and one per region, independent of each other.

    Separate streams mean that changing one region's class leaves every other region's
    nuclei exactly where they were.
    """
    root = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, 0x5A7D0])
    children = root.spawn(n_regions + 1)
    return np.random.default_rng(children[0]), [np.random.default_rng(c) for c in children[1:]]


def paint_slide(spec: SlideSpec) -> tuple[RGBArray, SlideTruth]:
    """Paint level 0 of ``spec`` in memory and build its truth (no file is written).

    Returns:
        ``(H, W, 3)`` uint8 RGB level 0 and the :class:`SlideTruth`.
    """
    width, height = spec.width, spec.height
    px_um = 1.0 / spec.mpp
    side = float(spec.region_level0)
    layout, region_rngs = _streams(spec.seed, spec.n_regions)

    pen_sides: list[int] = []
    margins = [layout.uniform(*_MARGIN) * side for _ in range(4)]
    for artefact in spec.artefacts:
        if artefact.kind == "pen":
            s = int(layout.integers(0, 4))
            pen_sides.append(s)
            margins[s] = layout.uniform(*_PEN_MARGIN) * side
    left, top, right, bottom = margins
    tissue = _paint.tissue_outline(layout, width, height, (left, top, right, bottom))
    slow = _Waves(layout, 3, (600.0 * px_um, 2400.0 * px_um), 0.05)

    paints: list[_paint.RegionPaint] = []
    parts: list[_paint.Nuclei] = []
    part_regions: list[int] = []
    debris_parts: list[npt.NDArray[np.float64]] = []
    debris_counts: list[int] = []
    lumina: list[Polygon] = []
    region_boxes: list[Polygon] = []
    for i, name in enumerate(spec.classes):
        rng = region_rngs[i]
        tc = TISSUE_CLASSES[name]
        row, col = divmod(i, spec.cols)
        x0, y0 = col * spec.region_level0, row * spec.region_level0
        cell = box(x0, y0, x0 + side, y0 + side)
        region_boxes.append(cell)
        theta = float(rng.uniform(0.0, math.pi))
        fibres = None
        if tc.fibre > 0:
            spread = 0.25 if tc.fibre >= 0.2 else math.pi / 2.0
            across = theta + math.pi / 2.0
            fibres = _Waves(
                rng, 5, (6.0 * px_um, 24.0 * px_um), 2.0 * tc.fibre, (across - spread, across + spread)
            )
        paints.append(_paint.RegionPaint(
            (x0, y0, x0 + spec.region_level0, y0 + spec.region_level0), tc, fibres
        ))
        if tc.nuclei is not None:
            if tc.arrangement == "glands":
                found, glands = _paint.gland_nuclei(rng, tc.nuclei, cell, tissue, px_um)
                lumina.extend(glands)
            else:
                found = _paint.lattice_nuclei(rng, tc.nuclei, cell, tissue, theta, px_um)
            parts.append(found)
            part_regions.append(i)
        debris = (
            _paint.debris_polygons(rng, tc.debris_per_1000um2, cell, tissue, px_um)
            if tc.debris_per_1000um2 > 0
            else np.zeros((0, 6, 2))
        )
        debris_parts.append(debris)
        debris_counts.append(len(debris))

    folds: list[BaseGeometry] = []
    bubbles: list[Polygon] = []
    pens: list[tuple[BaseGeometry, str]] = []
    artefacts: list[ArtefactTruth] = []
    region_artefacts: dict[int, list[str]] = {}
    pen_iter = iter(pen_sides)
    for artefact in spec.artefacts:
        if artefact.kind == "pen":
            s = next(pen_iter)
            ink = "green" if layout.random() < 0.5 else "blue"
            stroke = _paint.pen_stroke(layout, width, height, s, margins[s], tissue)
            pens.append((stroke, ink))
            artefacts.append(ArtefactTruth("pen", None, stroke))
            continue
        assert artefact.region is not None
        cell = region_boxes[artefact.region]
        geometry: BaseGeometry
        if artefact.kind == "fold":
            geometry = _paint.fold_band(layout, cell, tissue, px_um)
            folds.append(geometry)
        else:
            disc = _paint.bubble_disc(layout, cell)
            bubbles.append(disc)
            geometry = disc
        region_artefacts.setdefault(artefact.region, []).append(artefact.kind)
        artefacts.append(ArtefactTruth(artefact.kind, region_hid(artefact.region), geometry))

    nuclei = _paint.concat_nuclei(parts)
    debris = np.concatenate(debris_parts) if debris_parts else np.zeros((0, 6, 2))
    h, e = _paint.paint_stains(
        (height, width), paints, nuclei, debris, tissue, lumina, folds, bubbles, layout, px_um,
        slow,
    )
    rgb = _paint.colour(h, e, layout, 0.25 * px_um, pens, bubbles, 2.5 * px_um)

    counts = [len(p.centroids) for p in parts]
    region_of = np.repeat(np.asarray(part_regions, dtype=np.int64), counts)
    region_class = np.asarray([CLASS_NAMES.index(c) for c in spec.classes], dtype=np.int64)
    class_index = region_class[region_of]
    nucleus_truth = NucleusTruth(
        polygons=nuclei.polygons,
        centroids=nuclei.centroids,
        region=region_of,
        class_index=class_index,
        semi_axes_um=nuclei.semi_axes_um,
    )
    per_region = np.bincount(region_of, minlength=spec.n_regions)
    regions = tuple(
        RegionTruth(
            hid=region_hid(i),
            index=i,
            row=i // spec.cols,
            col=i % spec.cols,
            location=region_location(i // spec.cols, i % spec.cols, spec.rows, spec.cols),
            tissue_class=spec.classes[i],
            box=(float(b.bounds[0]), float(b.bounds[1]), side, side),
            geometry=b.intersection(tissue),
            artefacts=tuple(region_artefacts.get(i, [])),
            n_nuclei=int(per_region[i]),
            n_debris=debris_counts[i],
        )
        for i, b in enumerate(region_boxes)
    )
    truth = SlideTruth(spec, tissue, regions, nucleus_truth, tuple(artefacts))
    return rgb, truth


class _PictureRenderer:
    """A :class:`~omero_hwsi.synthetic.svs.TileRenderer` over a painted level 0.

    Pyramid levels are area averages of level 0, computed once; windows past the slide
    border (the TIFF's tile padding) are white.
    """

    def __init__(self, level0: RGBArray, downsamples: tuple[int, ...]) -> None:
        self._levels: dict[int, RGBArray] = {1: level0}
        previous, prev_d = level0, 1
        for d in downsamples[1:]:
            factor = d // prev_d
            h, w = previous.shape[0] // factor, previous.shape[1] // factor
            previous = _area(previous, (w, h))
            self._levels[d] = previous
            prev_d = d

    def render(self, x0: float, y0: float, w: int, h: int, step: float) -> RGBArray:
        """Window of ``w x h`` output pixels at ``step`` level-0 px per pixel."""
        level = self._levels.get(int(step)) if float(step).is_integer() else None
        if level is None:
            base = self._levels[1]
            x, y = int(round(x0)), int(round(y0))
            crop = _crop(base, x, y, int(round(w * step)), int(round(h * step)))
            return _area(crop, (w, h))
        d = int(step)
        return _crop(level, int(round(x0 / d)), int(round(y0 / d)), w, h)


def _area(picture: RGBArray, size: tuple[int, int]) -> RGBArray:
    return np.ascontiguousarray(cv2.resize(picture, size, interpolation=cv2.INTER_AREA))


def _crop(picture: RGBArray, x: int, y: int, w: int, h: int) -> RGBArray:
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    ph, pw = picture.shape[:2]
    x1, y1 = min(x + w, pw), min(y + h, ph)
    if x1 > x and y1 > y:
        out[: y1 - y, : x1 - x] = picture[y:y1, x:x1]
    return out


def render_slide(
    spec: SlideSpec, path: str | os.PathLike[str], *, quality: int = 85
) -> SlideTruth:
    """Render ``spec`` to a pyramidal Aperio SVS at ``path`` and return its ground truth.

    The file is written atomically by :func:`~omero_hwsi.synthetic.svs.write_svs` (tiled
    JPEG, Aperio description with the spec's MPP, levels :attr:`SlideSpec.downsamples`).

    Raises:
        ValueError: On an invalid ``quality``.
    """
    rgb, truth = paint_slide(spec)
    renderer = _PictureRenderer(rgb, spec.downsamples)
    write_svs(
        path, width=spec.width, height=spec.height, mpp=spec.mpp, downsamples=spec.downsamples,
        quality=quality, renderer=renderer,
    )
    logger.debug("%s: %d nuclei, %s", spec.slide_id, len(truth.nuclei), ",".join(spec.classes))
    return truth


# --------------------------------------------------------------------------------------------
# GeoJSON
# --------------------------------------------------------------------------------------------
def _rounded(geometry: BaseGeometry) -> BaseGeometry:
    """Coordinates to 0.01 px (small files, still valid for outlines many px wide)."""
    return shapely.set_precision(geometry, 0.01)


def write_truth_geojson(
    truth: SlideTruth, path: str | os.PathLike[str], *, nuclei: bool = True
) -> int:
    """Write the truth as a QuPath-importable GeoJSON FeatureCollection.

    Regions are annotations named by their hierarchy id (``r3``) with the tissue class as
    ``classification`` and ``location`` / ``artefacts`` properties; nuclei are detections
    with their class; artefacts are annotations classified ``artefact`` with a ``kind``.
    Coordinates are level-0 pixels inside the slide rectangle. Feature ids are UUIDv5 of
    the slide id and the object (nuclei: consecutive ids after one UUIDv5 per slide), so
    rewrites give identical files.

    Args:
        truth: What :func:`render_slide` returned.
        path: Destination (written atomically).
        nuclei: Include the nuclei (thousands per slide); off for smaller files.

    Returns:
        The number of features written.
    """
    sid = truth.slide_id
    features: list[dict[str, Any] | None] = []
    for region in truth.regions:
        features.append(qupath_feature(
            _rounded(region.geometry), object_type="annotation", name=region.hid,
            fid=feature_id("synthetic", sid, region.hid),
            classification=region.tissue_class, color=_CLASS_COLORS[region.tissue_class],
            properties={"hid": region.hid, "location": region.location,
                        "artefacts": list(region.artefacts), "nuclei": region.n_nuclei},
            clip_to=truth.dimensions,
        ))
    for n, artefact in enumerate(truth.artefacts):
        features.append(qupath_feature(
            _rounded(artefact.geometry), object_type="annotation", name=artefact.kind,
            fid=feature_id("synthetic", sid, f"artefact{n}"), classification="artefact",
            color=(0, 0, 0), properties={"kind": artefact.kind, "region": artefact.region},
            clip_to=truth.dimensions,
        ))
    if nuclei:
        table = truth.nuclei
        closed = np.concatenate([table.polygons, table.polygons[:, :1]], axis=1)
        rings = np.round(closed, 2).tolist()
        # One UUIDv5 per slide, then consecutive ids: thousands of uuid5 calls cost more
        # than drawing the nuclei.
        base = uuid.UUID(feature_id("synthetic", sid, "nuclei")).int
        for n, ring in enumerate(rings):
            name = table.class_name(n)
            features.append({
                "type": "Feature",
                "id": str(uuid.UUID(int=(base + n) % (1 << 128))),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection", "name": f"nucleus {n}", "isLocked": False,
                    "classification": {"name": name, "color": list(_CLASS_COLORS[name])},
                    "region": region_hid(int(table.region[n])),
                },
            })
    return write_feature_collection(path, features)
