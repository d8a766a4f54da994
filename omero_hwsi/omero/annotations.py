"""What omero-hwsi attaches to an OMERO image: namespaces, file names and the provenance pairs.

Why fixed namespaces: a rerun must find and delete exactly our objects for one job, and a lab
manager's report index must find every analysis, without touching anything a user made. Every
object we write carries the job id (the UUIDv5 of the job key, so one id per key) in its
description or values; file names carry the image id and the job id.

The provenance MapAnnotation is written last: its presence marks a complete write-back. It uses
our own namespace, so OMERO.web shows it read-only (only the client namespace is editable).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from omero_hwsi import __version__

__all__ = [
    "NS_ANALYSIS",
    "NS_EVIDENCE",
    "NS_REPORT",
    "NS_ROI",
    "OUR_NAMESPACES",
    "PROVENANCE_KEYS",
    "attachment_name",
    "is_ours",
    "job_marker",
    "roi_marker",
    "provenance_pairs",
]

NS_ROI: Final = "omero-hwsi/roi"
NS_EVIDENCE: Final = "omero-hwsi/evidence"
NS_REPORT: Final = "omero-hwsi/report"
NS_ANALYSIS: Final = "omero-hwsi/analysis"
OUR_NAMESPACES: Final = (NS_ROI, NS_EVIDENCE, NS_REPORT, NS_ANALYSIS)

PROVENANCE_KEYS: Final = ("model", "model sha256", "model config sha256", "omero-hwsi version",
                          "task", "question", "answer", "evidence method", "evidence depth",
                          "evidence score", "job id", "input sha256", "image id",
                          "requested by", "analysed", "notice")
"""The keys of the provenance MapAnnotation, in the order OMERO.web shows them."""

ANSWER_LIMIT: Final = 250
"""The answer (and question) are cut to this many characters in the key-value table."""


def job_marker(job_id: str) -> str:
    """The description that ties an annotation to its job (annotations also have our ns)."""
    return f"omero-hwsi job {job_id}"


def roi_marker(job_id: str) -> str:
    """The description of a job's ROIs: OMERO ROIs have no namespace, so it leads with ours."""
    return f"{NS_ROI} {job_marker(job_id)}"


def is_ours(description: str | None) -> bool:
    """Whether an object's description marks it as written by an omero-hwsi job."""
    text = str(description or "")
    return text.startswith(job_marker("")) or text.startswith(f"{NS_ROI} ")


def attachment_name(image_id: int, job_id: str, kind: str) -> str:
    """File name of an attachment: ``hwsi-<image id>-<job id first 8>-<kind>``.

    ``kind`` is the file's role and extension, e.g. ``evidence.geojson`` or ``report.md``.
    """
    return f"hwsi-{image_id}-{job_id[:8]}-{kind}"


def _short(text: str, limit: int = ANSWER_LIMIT) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\u2026"


def provenance_pairs(result: Mapping[str, Any], *, job_id: str, model: str, model_sha256: str,
                     evidence_depth: str, input_sha256: str, image_id: int,
                     user: str) -> list[list[str]]:
    """The provenance key-value pairs (:data:`PROVENANCE_KEYS`) of one analysis.

    ``result`` is the ``result.json`` document of the analysis; ``model`` is the ledger's
    ``<id>@<digest prefix>``. Values are strings, as MapAnnotations store them.
    """
    methods = result.get("evidence_methods") or {}
    method = next(iter(methods), "none") if evidence_depth != "none" else "none"
    values = {
        "model": model,
        "model sha256": model_sha256,
        "model config sha256": str((result.get("model") or {}).get("config_sha256", "")),
        "omero-hwsi version": __version__,
        "task": str(result.get("task", "")),
        "question": _short(result.get("question", "")),
        "answer": _short(result.get("answer", "")),
        "evidence method": method,
        "evidence depth": evidence_depth,
        "evidence score": _short(methods.get(method, "no evidence was computed")),
        "job id": job_id,
        "input sha256": input_sha256,
        "image id": str(image_id),
        "requested by": user,
        "analysed": str(result.get("created", "")),
        "notice": _short(result.get("notice", "")),
    }
    return [[key, values[key]] for key in PROVENANCE_KEYS]
