"""Tissue classes of the synthetic pathology slides: how each one looks, and what it is called.

A class is a recipe in physical units (microns, optical densities), so a slide rendered at
0.25 um/px shows the same tissue as one at 0.5 um/px with twice the pixels. Every visual
difference between classes is chosen so that a particular *scale* of the model must see it:

* ``normal``, ``tumour``, ``stroma`` and ``necrosis`` differ in stain colour and nuclear
  density, so patch colour statistics (the ``hed_texture`` descriptor) already tell them
  apart; ``normal`` also has an architecture (glands around white lumina) that region
  layouts show.
* ``epithelioid`` and ``spindle`` are the *shape pair*: the same stain concentrations, the
  same nuclear density and the same mean nuclear area (so the same nuclear area fraction and
  colour statistics), but round versus elongated nuclei. Only the cell scale (segmented
  nucleus shape: eccentricity, solidity, axes) separates them.

The texts (:mod:`omero_hwsi.synthetic.texts`) only state what these recipes make true.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "CLASS_NAMES",
    "LESION_CLASSES",
    "SHAPE_PAIR",
    "TISSUE_CLASSES",
    "NucleusLook",
    "TissueClass",
    "tissue_class",
]

Arrangement = Literal["sheet", "glands", "fascicles", "scattered"]


@dataclass(frozen=True, slots=True)
class NucleusLook:
    """How the nuclei of one class are drawn.

    Nuclei sit on a jittered, staggered lattice turned to the region's main direction, which
    keeps them apart (the segmenter sees separate nuclei, and ground-truth polygons never
    overlap) while looking irregular. Density is ``occupancy / (pitch_along * pitch_across)``.

    Attributes:
        pitch_um: Lattice pitch ``(along, across)`` the region's main direction, in um.
        occupancy: Fraction of lattice sites holding a nucleus.
        semi_major_um: Mean semi-major axis (um).
        aspect: Range ``(lo, hi)`` of the minor / major axis ratio, drawn uniformly.
        size_jitter: Relative half-range of the per-nucleus size factor (uniform).
        angle_jitter_deg: Half-range of a nucleus's angle around the main direction; 90 for
            random orientation.
        irregularity: Amplitude of smooth radial wobble of the outline (0 = true ellipse).
        haematoxylin: Mean haematoxylin optical density (base 10) inside the nucleus.
        haematoxylin_jitter: Relative half-range of the per-nucleus haematoxylin.
        chromatin: Relative amplitude of the granular texture inside nuclei.
    """

    pitch_um: tuple[float, float]
    occupancy: float
    semi_major_um: float
    aspect: tuple[float, float]
    size_jitter: float
    angle_jitter_deg: float
    irregularity: float
    haematoxylin: float
    haematoxylin_jitter: float
    chromatin: float

    @property
    def mean_area_um2(self) -> float:
        """Expected nuclear area, ``pi a^2 E[size^2] E[aspect]`` (size and aspect independent)."""
        s = self.size_jitter
        size2 = 1.0 + s * s / 3.0  # E[(1 + U(-s, s))^2]
        return 3.141592653589793 * self.semi_major_um**2 * size2 * sum(self.aspect) / 2.0

    @property
    def area_fraction(self) -> float:
        """Expected fraction of tissue area covered by nuclei."""
        along, across = self.pitch_um
        return self.occupancy * self.mean_area_um2 / (along * across)


@dataclass(frozen=True, slots=True)
class TissueClass:
    """One tissue class: its look (stains, texture, nuclei) and its words.

    Attributes:
        name: Identifier used in specs, truth files and answers (``"tumour"``).
        label: Name in running text (``"carcinoma"``).
        eosin: Eosin optical density (base 10) of the tissue between nuclei.
        fibre: Relative amplitude of fibrous eosin texture along the main direction.
        haem_background: Diffuse haematoxylin optical density (cross-staining, smudge).
        arrangement: How nuclei are laid out (``glands`` adds white lumina ringed by nuclei).
        nuclei: The nucleus recipe; ``None`` for a class without intact nuclei.
        debris_per_1000um2: Small dark nuclear fragments (karyorrhexis) per 1000 um^2; they
            are smaller than any nucleus the segmenter keeps, and are not truth nuclei.
        nucleus_word: One word for the nuclei (the "word" of the cell scale).
        nucleus_shape: ``round`` or ``spindle``: what the shape question answers.
        detail: What the class looks like, for region sentences and reports ("<label>:
            <detail>").
        phrase: The patch phrase's head ("<phrase> with densely packed ... nuclei").
    """

    name: str
    label: str
    eosin: float
    fibre: float
    haem_background: float
    arrangement: Arrangement
    nuclei: NucleusLook | None
    debris_per_1000um2: float
    nucleus_word: str
    nucleus_shape: Literal["round", "spindle", "none"]
    detail: str
    phrase: str


# The shape pair shares every stain value and the nuclear density; only geometry differs.
_PAIR_EOSIN = 0.30
_PAIR_FIBRE = 0.06
_PAIR_HAEM_BACKGROUND = 0.05
_PAIR_PITCH_AREA_UM2 = 144.0
_PAIR_HAEM = 0.80

TISSUE_CLASSES: Final[dict[str, TissueClass]] = {
    c.name: c
    for c in (
        TissueClass(
            name="normal",
            label="normal glandular tissue",
            eosin=0.34,
            fibre=0.15,
            haem_background=0.04,
            arrangement="glands",
            nuclei=NucleusLook(
                pitch_um=(7.5, 7.5), occupancy=0.95, semi_major_um=2.9, aspect=(0.8, 0.95),
                size_jitter=0.08, angle_jitter_deg=90.0, irregularity=0.02,
                haematoxylin=0.55, haematoxylin_jitter=0.08, chromatin=0.12,
            ),
            debris_per_1000um2=0.0,
            nucleus_word="bland",
            nucleus_shape="round",
            detail=(
                "glands lined by a single layer of small, uniform, bland nuclei around open "
                "lumina"
            ),
            phrase="normal glands",
        ),
        TissueClass(
            name="tumour",
            label="carcinoma",
            eosin=0.22,
            fibre=0.05,
            haem_background=0.07,
            arrangement="sheet",
            nuclei=NucleusLook(
                pitch_um=(11.5, 11.5), occupancy=0.96, semi_major_um=4.2, aspect=(0.6, 0.95),
                size_jitter=0.25, angle_jitter_deg=90.0, irregularity=0.12,
                haematoxylin=1.0, haematoxylin_jitter=0.15, chromatin=0.35,
            ),
            debris_per_1000um2=0.0,
            nucleus_word="pleomorphic",
            nucleus_shape="round",
            detail="solid sheets of crowded, enlarged, hyperchromatic and pleomorphic nuclei",
            phrase="carcinoma",
        ),
        TissueClass(
            name="stroma",
            label="fibrous stroma",
            eosin=0.48,
            fibre=0.45,
            haem_background=0.02,
            arrangement="scattered",
            nuclei=NucleusLook(
                pitch_um=(36.0, 14.0), occupancy=0.55, semi_major_um=6.0, aspect=(0.22, 0.3),
                size_jitter=0.15, angle_jitter_deg=6.0, irregularity=0.02,
                haematoxylin=0.75, haematoxylin_jitter=0.1, chromatin=0.1,
            ),
            debris_per_1000um2=0.0,
            nucleus_word="fibroblastic",
            nucleus_shape="spindle",
            detail="dense eosinophilic collagen fibres with sparse, thin fibroblast nuclei",
            phrase="fibrous stroma",
        ),
        TissueClass(
            name="necrosis",
            label="necrosis",
            eosin=0.2,
            fibre=0.0,
            haem_background=0.12,
            arrangement="scattered",
            nuclei=None,
            debris_per_1000um2=6.0,
            nucleus_word="karyorrhectic",
            nucleus_shape="none",
            detail=(
                "pale, smudged eosinophilic debris with scattered nuclear fragments and no "
                "intact nuclei"
            ),
            phrase="necrosis",
        ),
        TissueClass(
            name="epithelioid",
            label="epithelioid neoplasm",
            eosin=_PAIR_EOSIN,
            fibre=_PAIR_FIBRE,
            haem_background=_PAIR_HAEM_BACKGROUND,
            arrangement="sheet",
            nuclei=NucleusLook(
                pitch_um=(12.0, _PAIR_PITCH_AREA_UM2 / 12.0), occupancy=0.92,
                semi_major_um=4.0, aspect=(0.88, 1.0), size_jitter=0.1, angle_jitter_deg=90.0, irregularity=0.0,
                haematoxylin=_PAIR_HAEM, haematoxylin_jitter=0.08, chromatin=0.2,
            ),
            debris_per_1000um2=0.0,
            nucleus_word="round",
            nucleus_shape="round",
            detail="sheets of cells with round to oval nuclei",
            phrase="epithelioid neoplasm",
        ),
        TissueClass(
            name="spindle",
            label="spindle cell neoplasm",
            eosin=_PAIR_EOSIN,
            fibre=_PAIR_FIBRE,
            haem_background=_PAIR_HAEM_BACKGROUND,
            arrangement="fascicles",
            nuclei=NucleusLook(
                # Same lattice area (144 um^2) and mean nuclear area (a^2 * mean aspect) as
                # the epithelioid class: 7^2 * 0.3071 == 4^2 * 0.94.
                pitch_um=(18.0, _PAIR_PITCH_AREA_UM2 / 18.0), occupancy=0.92,
                semi_major_um=7.0, aspect=(0.2914, 0.3229), size_jitter=0.1,
                angle_jitter_deg=3.0, irregularity=0.0,
                haematoxylin=_PAIR_HAEM, haematoxylin_jitter=0.08, chromatin=0.2,
            ),
            debris_per_1000um2=0.0,
            nucleus_word="spindle",
            nucleus_shape="spindle",
            detail="intersecting fascicles of cells with elongated, spindle-shaped nuclei",
            phrase="spindle cell neoplasm",
        ),
    )
}
"""All classes by name, in vocabulary order."""

CLASS_NAMES: Final[tuple[str, ...]] = tuple(TISSUE_CLASSES)
"""Class names in vocabulary order."""

SHAPE_PAIR: Final[tuple[str, str]] = ("epithelioid", "spindle")
"""The two classes that only nuclear shape separates (round first)."""

LESION_CLASSES: Final[tuple[str, ...]] = ("tumour", "epithelioid", "spindle")
"""Classes that make a slide's diagnosis; a generated slide holds at most one of them."""


def tissue_class(name: str) -> TissueClass:
    """The class called ``name``.

    Raises:
        ValueError: ``name`` is not a known class (the message lists the known ones).
    """
    try:
        return TISSUE_CLASSES[name]
    except KeyError:
        raise ValueError(
            f"unknown tissue class {name!r}; known: {', '.join(CLASS_NAMES)}"
        ) from None
