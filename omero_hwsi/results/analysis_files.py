"""The result files of ``hwsi analyze``: JSON, QuPath GeoJSON, reports and the overlay picture.

Why one function: the CLI, the Celery task and the OMERO sink all need the same five files
from an :class:`~omero_hwsi.results.schema.AnalysisResult`. They are rendered into a
staging folder inside ``out_dir`` and moved in only when all five exist, so a failure leaves
no partial set behind (and a rerun replaces an old set file by file).

``result.json`` is the result's own dict (``AnalysisResult.to_dict``) with two keys added at
the top: ``schema_version`` (:data:`SCHEMA_VERSION`) and ``provenance`` (as the caller gives
it: at least the feature store's ``slide``, ``grid`` and ``encoders`` manifest entries), so the
file alone says which pixels and encoders produced the answer. Dropping both keys gives back what ``AnalysisResult.from_dict``
reads.
"""

from __future__ import annotations

import io
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omero_hwsi._io import write_bytes_atomic, write_json_atomic
from omero_hwsi._types import RGBArray
from omero_hwsi.results.evidence import write_evidence_geojson
from omero_hwsi.results.overlay import render_overlay
from omero_hwsi.results.report import render_html, render_markdown

if TYPE_CHECKING:  # the result module's package needs torch at runtime; results/ must not
    from omero_hwsi.results.schema import AnalysisResult

__all__ = ["ANALYSIS_FILES", "SCHEMA_VERSION", "result_document", "write_analysis_files"]

logger = logging.getLogger(__name__)

ANALYSIS_FILES = ("result.json", "evidence.geojson", "report.md", "report.html", "overlay.png")
"""The files :func:`write_analysis_files` writes, in this order."""

SCHEMA_VERSION = 1
"""Version of ``result.json``'s layout; raised when a key changes meaning or goes away."""

def _finite(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None, so the JSON stays strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def result_document(result: AnalysisResult, provenance: dict[str, Any]) -> dict[str, Any]:
    """What ``result.json`` holds: ``schema_version``, ``provenance``, then the result's dict."""
    document: dict[str, Any] = _finite(
        {"schema_version": SCHEMA_VERSION, "provenance": dict(provenance), **result.to_dict()})
    return document


def _check_inputs(
    thumbnail: RGBArray, level0_per_px: float, slide_size: tuple[float, float]
) -> None:
    """Refuse bad arguments before anything is created on disk."""
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3 or 0 in thumbnail.shape:
        raise ValueError(f"thumbnail must be an (H, W, 3) RGB array, got shape {thumbnail.shape}")
    if not (math.isfinite(level0_per_px) and level0_per_px > 0):
        raise ValueError(f"level0_per_px must be positive, got {level0_per_px}")
    if len(slide_size) != 2 or not all(math.isfinite(v) and v > 0 for v in slide_size):
        raise ValueError(f"slide size must be two positive numbers, got {slide_size!r}")


def write_analysis_files(
    result: AnalysisResult,
    out_dir: str | os.PathLike[str],
    *,
    thumbnail: RGBArray,
    level0_per_px: float,
    slide_size: tuple[float, float],
    provenance: dict[str, Any],
) -> list[Path]:
    """Write the five :data:`ANALYSIS_FILES` into ``out_dir`` (created if needed).

    Args:
        result: the analysis of one slide.
        out_dir: destination folder; files of an earlier run there are replaced.
        thumbnail: the whole slide, RGB uint8 ``(H, W, 3)``, for the overlay.
        level0_per_px: level-0 pixels per thumbnail pixel.
        slide_size: ``(width, height)`` of level 0; evidence geometry is clipped to it.
        provenance: written as ``result.json``'s ``provenance``: at least the feature store
            manifest's ``slide``, ``grid`` and ``encoders`` (not its timings: keep it small).

    Returns:
        The paths written, in :data:`ANALYSIS_FILES` order.

    Raises:
        ValueError: a bad thumbnail, scale or slide size (nothing is written).
    """
    _check_inputs(thumbnail, level0_per_px, slide_size)
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".hwsi-analysis-", dir=out))
    try:
        picture = io.BytesIO()
        render_overlay(thumbnail, level0_per_px, result).save(picture, format="PNG")
        overlay_png = picture.getvalue()
        write_json_atomic(staging / "result.json", result_document(result, provenance))
        write_evidence_geojson(result, slide_size, staging / "evidence.geojson")
        markdown = render_markdown(result, overlay_name="overlay.png")
        write_bytes_atomic(staging / "report.md", markdown.encode("utf-8"))
        write_bytes_atomic(staging / "report.html", render_html(result, overlay_png).encode("utf-8"))
        write_bytes_atomic(staging / "overlay.png", overlay_png)
        written = []
        for name in ANALYSIS_FILES:
            os.replace(staging / name, out / name)
            written.append(out / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    logger.info("%s: wrote %d analysis files to %s", result.slide.get("slide_id"),
                len(written), out)
    return written
