"""The main job: slide in, answer with its evidence out, as files a pathologist opens.

:func:`analyze_slide` runs hierarchy -> features -> model -> evidence -> result files in one
process. ``hwsi analyze`` calls it, and so will the Celery worker and the OMERO script: one
function, so every front end computes the same thing. The feature store is reused when the
same slide was extracted before with the same grid and encoders.

The model decides how features are made: a model records the encoders and grid it was trained
on (``expected_features``), and extraction follows them, so a demo model trained on a small
grid reads slides on that grid without any setting to change.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omero_hwsi._types import ProgressFn
from omero_hwsi.errors import InputError, ModelFileNotFoundError, UnknownEncoderError
from omero_hwsi.features.extract import ExtractionConfig, extract_slide
from omero_hwsi.features.registry import is_encoder
from omero_hwsi.features.store import SlideFeatures, load_features
from omero_hwsi.inference.evidence import EvidenceBudget, EvidenceDepth
from omero_hwsi.inference.pipeline import Decoding, HwsiPipeline, Task
from omero_hwsi.results.analysis_files import write_analysis_files
from omero_hwsi.results.schema import AnalysisResult, EvidenceMethod
from omero_hwsi.settings import Settings
from omero_hwsi.slide.grid import GridSpec
from omero_hwsi.slide.local import open_slide
from omero_hwsi.slide.reader import plan_for, read_thumbnail
from qupath_bridge.geojson import ReadOptions, read_regions

__all__ = ["DEFAULT_MODEL", "AnalysisRequest", "analyze_slide", "default_model", "evidence_budget",
           "output_dirs"]

DEFAULT_MODEL = Path(__file__).parent / "models" / "demo"
"""The embedded default model: a small demo model trained on synthetic slides."""

_OVERVIEW_PX = 2048
"""Longest side of the overview picture behind the overlay."""


@dataclass(frozen=True, slots=True)
class AnalysisRequest:
    """What to ask about a slide; the same vocabulary in the CLI, ``result.json`` and OMERO.

    Attributes:
        task: ``vqa``, ``report``, ``caption``, ``classify`` or ``retrieve``.
        question: the question (default prompt per task when None; ``vqa`` needs one).
        labels: candidate labels (``classify``) or texts (``retrieve``).
        evidence: deepest evidence level (``region``, ``patch``, ``cell`` or ``none``).
        evidence_method: ``occlusion``, ``grad_x_input`` or ``attention``.
        regions: a GeoJSON file limiting the analysis to the areas drawn in it.
        mpp: level-0 microns per pixel overriding the slide's metadata.
        decoding: generation settings (greedy unless sampling with a seed).
    """

    task: Task = "vqa"
    question: str | None = None
    labels: tuple[str, ...] = ()
    evidence: EvidenceDepth = "cell"
    evidence_method: EvidenceMethod = "occlusion"
    regions: Path | None = None
    mpp: float | None = None
    decoding: Decoding = field(default_factory=Decoding)


def evidence_budget(settings: Settings) -> EvidenceBudget:
    """The hierarchical evidence budgets from the settings (``HWSI_EVIDENCE_*``)."""
    return EvidenceBudget(top_regions=settings.evidence_top_regions,
                          top_patches=settings.evidence_top_patches,
                          batch_size=settings.evidence_batch_size)


def default_model() -> Path:
    """The embedded demo model's folder.

    Raises:
        ModelFileNotFoundError: this installation carries no default model.
    """
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise ModelFileNotFoundError(
            f"{DEFAULT_MODEL}: no default model in this installation; pass --model DIR"
        )
    return DEFAULT_MODEL


def output_dirs(slides: list[Path], out: Path) -> list[Path]:
    """Where each slide's files go: ``out`` itself for one slide, ``out/<stem>`` for several.

    Raises:
        InputError: two slides share a file stem (their results would overwrite each other);
            checked before anything is written.
    """
    if len(slides) == 1:
        return [out]
    seen: dict[str, Path] = {}
    for slide in slides:
        if slide.stem in seen:
            raise InputError(f"{seen[slide.stem]} and {slide} share the name {slide.stem!r}; their "
                             "results would collide in the output folder: analyse them separately")
        seen[slide.stem] = slide
    return [out / slide.stem for slide in slides]


def _grid(pipeline: HwsiPipeline, settings: Settings) -> GridSpec:
    """The model's grid when it records one, else the settings'."""
    expected = pipeline.model.config.expected_features or {}
    grid = expected.get("grid") or {}
    return GridSpec(
        target_mpp=float(grid.get("target_mpp", settings.target_mpp)),
        region_px=int(grid.get("region_px", settings.region_px)),
        patch_px=int(grid.get("patch_px", settings.patch_px)),
        min_tissue_fraction=settings.min_tissue_fraction,
    )


def _extraction(pipeline: HwsiPipeline, settings: Settings) -> ExtractionConfig:
    """The encoders the model was trained on (they must be installed here)."""
    expected = pipeline.model.config.expected_features or {}
    names: dict[str, str] = {}
    for scale, default in (("patch", "hed_texture"), ("region", "layout")):
        name = str(expected.get(scale, {}).get("id", default))
        if not is_encoder(name):
            raise UnknownEncoderError(
                f"the model expects {scale} features from the encoder {name!r}, which is not "
                "installed here; install it or use a model trained on the built-in encoders"
            )
        names[scale] = name
    return ExtractionConfig(patch_encoder=names["patch"], region_encoder=names["region"],
                            n_candidates=settings.candidates_per_region,
                            k=settings.patches_per_region, workers=settings.extract_workers)


def _overview(slide: Path, mpp: float | None, tolerance: float) -> tuple[Any, float, tuple[float, float]]:
    with open_slide(slide, mpp=mpp, mpp_tolerance=tolerance) as reader:
        width, height = reader.dimensions
        picture_mpp = max(reader.mpp, max(width, height) * reader.mpp / _OVERVIEW_PX)
        picture = read_thumbnail(reader, picture_mpp)
        return picture, plan_for(reader, picture_mpp).level0_per_px, (float(width), float(height))


def analyze_slide(
    slide: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    pipeline: HwsiPipeline,
    request: AnalysisRequest,
    settings: Settings,
    progress: ProgressFn | None = None,
) -> AnalysisResult:
    """Analyse one slide and write its result files into ``out_dir``.

    Writes ``result.json``, ``evidence.geojson``, ``report.md``, ``report.html`` and
    ``overlay.png`` (see :mod:`omero_hwsi.results.analysis_files`); all of them or none.

    Raises:
        InputError subclasses: unusable slide, MPP, regions file, question or labels.
        MissingResourceError subclasses: the model's encoders are not installed.
    """
    path = Path(slide)
    started = time.perf_counter()
    restrict = (read_regions(request.regions, options=ReadOptions.from_settings(settings))
                if request.regions is not None else None)
    grid = _grid(pipeline, settings)
    extracted = extract_slide(
        path, settings.features_path, grid=grid, config=_extraction(pipeline, settings),
        mpp=request.mpp, mpp_tolerance=settings.mpp_tolerance, restrict=restrict,
        progress=progress,
    )
    features: SlideFeatures = load_features(extracted.path)
    features_s = time.perf_counter() - started
    (result,) = pipeline.ask(
        [features], request.question, task=request.task, labels=list(request.labels) or None,
        evidence=request.evidence, evidence_method=request.evidence_method,
        budget=evidence_budget(settings),
        decoding=request.decoding, progress=progress,
    )
    picture, level0_per_px, size = _overview(path, request.mpp, settings.mpp_tolerance)
    timings = {"features_s": round(features_s, 3), **result.timings}
    provenance = {k: features.provenance.get(k) for k in ("slide", "grid", "encoders", "selection",
                                                           "key")}
    provenance.update(store=str(features.path), features_reused=extracted.already_complete,
                      regions_file=None if request.regions is None else str(request.regions))
    result = replace(result, timings={**timings, "total_s": round(time.perf_counter() - started, 3)})
    write_analysis_files(result, out_dir, thumbnail=picture, level0_per_px=level0_per_px,
                         slide_size=size, provenance=provenance)
    return result

