"""Synthetic whole-slide images, so tests and demos need no real (large, licensed) scans.

``svs`` writes pyramidal Aperio files of any size; ``pathology`` renders small slides of
known tissue classes with their ground truth; ``dataset`` turns many of them into
instruction data, per-scale texts and a corpus (see ``docs/synthetic-data.md``).
"""

from __future__ import annotations

from omero_hwsi.synthetic.classes import CLASS_NAMES, SHAPE_PAIR, TISSUE_CLASSES, TissueClass
from omero_hwsi.synthetic.dataset import DatasetManifest, compose_specs, generate_dataset
from omero_hwsi.synthetic.pathology import (
    DEMO_GRID,
    ArtefactSpec,
    SlideSpec,
    SlideTruth,
    paint_slide,
    render_slide,
    write_truth_geojson,
)
from omero_hwsi.synthetic.svs import SyntheticTissue, TileRenderer, write_svs

__all__ = [
    "CLASS_NAMES",
    "DEMO_GRID",
    "SHAPE_PAIR",
    "TISSUE_CLASSES",
    "ArtefactSpec",
    "DatasetManifest",
    "SlideSpec",
    "SlideTruth",
    "SyntheticTissue",
    "TileRenderer",
    "TissueClass",
    "compose_specs",
    "generate_dataset",
    "paint_slide",
    "render_slide",
    "write_svs",
    "write_truth_geojson",
]
