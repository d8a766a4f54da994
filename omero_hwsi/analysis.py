"""The main job: slide in, answer with its evidence out, as files a pathologist opens.

:func:`analyze_slide` runs hierarchy -> features -> model -> evidence -> result files in one
process. ``hwsi analyze`` calls it, and so will the Celery worker and the OMERO script: one
function, so every front end computes the same thing. The feature store is reused when the
same slide was extracted before with the same grid and encoders.

The model decides how features are made: a model records the encoders and grid it was trained
on (``expected_features``), and extraction follows them, so a demo model trained on a small
grid reads slides on that grid without any setting to change.

The stages are separate functions (:func:`extract_features`, :func:`ask_slide`,
:func:`result_provenance`, :func:`write_result`) because the job system runs them as separate
Celery tasks on different queues (``omero_hwsi.jobs.tasks``); :func:`analyze_slide` runs the
same functions in one process, so both compute the same thing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omero_hwsi._types import ProgressFn
from omero_hwsi.features.extract import ExtractionResult, extract_slide
from omero_hwsi.features.store import SlideFeatures, load_features
from omero_hwsi.plan import DEFAULT_MODEL, default_model, extraction_config, grid_spec, output_dirs
from omero_hwsi.results.analysis_files import write_analysis_files
from omero_hwsi.settings import Settings
from omero_hwsi.slide.local import open_slide
from omero_hwsi.slide.reader import plan_for, read_thumbnail
from qupath_bridge.geojson import ReadOptions, read_regions

if TYPE_CHECKING:  # torch loads with the model, not with this module: CPU workers import it
    from omero_hwsi.inference.evidence import EvidenceBudget, EvidenceDepth
    from omero_hwsi.inference.pipeline import Decoding, HwsiPipeline, Task
    from omero_hwsi.results.schema import AnalysisResult, EvidenceMethod

__all__ = ["DEFAULT_MODEL", "AnalysisRequest", "analyze_slide", "ask_slide", "default_model",
           "evidence_budget", "extract_features", "output_dirs", "result_provenance",
           "write_result"]

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
    decoding: Decoding = field(default_factory=lambda: _greedy())


def _greedy() -> Decoding:
    """Default decoding, built on use: the request type stays importable without torch."""
    from omero_hwsi.inference.pipeline import Decoding

    return Decoding()


def evidence_budget(settings: Settings) -> EvidenceBudget:
    """The hierarchical evidence budgets from the settings (``HWSI_EVIDENCE_*``)."""
    from omero_hwsi.inference.evidence import EvidenceBudget

    return EvidenceBudget(top_regions=settings.evidence_top_regions,
                          top_patches=settings.evidence_top_patches,
                          batch_size=settings.evidence_batch_size)


def _overview(slide: Path, mpp: float | None, tolerance: float) -> tuple[Any, float, tuple[float, float]]:
    with open_slide(slide, mpp=mpp, mpp_tolerance=tolerance) as reader:
        width, height = reader.dimensions
        picture_mpp = max(reader.mpp, max(width, height) * reader.mpp / _OVERVIEW_PX)
        picture = read_thumbnail(reader, picture_mpp)
        return picture, plan_for(reader, picture_mpp).level0_per_px, (float(width), float(height))


def extract_features(
    slide: str | os.PathLike[str],
    *,
    expected: Mapping[str, Any] | None,
    settings: Settings,
    regions: Path | None = None,
    mpp: float | None = None,
    progress: ProgressFn | None = None,
) -> ExtractionResult:
    """Stage 1: the slide's features on the model's grid and encoders (a complete store is reused).

    ``expected`` is the model's ``expected_features`` (from the loaded config, or read from the
    folder's JSON by :func:`omero_hwsi.plan.expected_features` where torch is not loaded);
    ``regions`` and ``mpp`` are the request's (a GeoJSON of areas, an MPP override).

    Raises:
        InputError subclasses: unusable slide, MPP or regions file.
        MissingResourceError subclasses: the model's encoders are not installed.
    """
    restrict = (read_regions(regions, options=ReadOptions.from_settings(settings))
                if regions is not None else None)
    return extract_slide(
        Path(slide), settings.features_path, grid=grid_spec(expected, settings),
        config=extraction_config(expected, settings), mpp=mpp,
        mpp_tolerance=settings.mpp_tolerance, restrict=restrict, progress=progress,
    )


def ask_slide(
    features: SlideFeatures,
    *,
    pipeline: HwsiPipeline,
    request: AnalysisRequest,
    settings: Settings,
    progress: ProgressFn | None = None,
) -> AnalysisResult:
    """Stage 2: the model's answer and its evidence for one slide's features.

    Raises:
        InputError subclasses: a question or labels the task cannot use.
    """
    (result,) = pipeline.ask(
        [features], request.question, task=request.task, labels=list(request.labels) or None,
        evidence=request.evidence, evidence_method=request.evidence_method,
        budget=evidence_budget(settings),
        decoding=request.decoding, progress=progress,
    )
    return result


def result_provenance(features: SlideFeatures, *, reused: bool,
                      request: AnalysisRequest) -> dict[str, Any]:
    """What ``result.json`` records about the pixels and encoders behind the answer."""
    provenance = {k: features.provenance.get(k) for k in ("slide", "grid", "encoders", "selection",
                                                           "key")}
    provenance.update(store=str(features.path), features_reused=reused,
                      regions_file=None if request.regions is None else str(request.regions))
    return provenance


def write_result(
    slide: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    result: AnalysisResult,
    *,
    provenance: dict[str, Any],
    settings: Settings,
    mpp: float | None = None,
) -> list[Path]:
    """Stage 3: the five result files (overlay on the slide's overview), all or none.

    ``mpp`` is the request's MPP override, for reading the overview.
    """
    picture, level0_per_px, size = _overview(Path(slide), mpp, settings.mpp_tolerance)
    return write_analysis_files(result, out_dir, thumbnail=picture, level0_per_px=level0_per_px,
                                slide_size=size, provenance=provenance)


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
    extracted = extract_features(path, expected=pipeline.model.config.expected_features,
                                 settings=settings, regions=request.regions, mpp=request.mpp,
                                 progress=progress)
    features = load_features(extracted.path)
    features_s = time.perf_counter() - started
    result = ask_slide(features, pipeline=pipeline, request=request, settings=settings,
                       progress=progress)
    timings = {"features_s": round(features_s, 3), **result.timings,
               "total_s": round(time.perf_counter() - started, 3)}
    result = replace(result, timings=timings)
    write_result(path, out_dir, result, settings=settings, mpp=request.mpp,
                 provenance=result_provenance(features, reused=extracted.already_complete,
                                              request=request))
    return result
