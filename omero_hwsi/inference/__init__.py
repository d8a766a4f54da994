"""Answers, label scores, retrieval and grounded evidence from a trained model (``worker`` extra).

``HwsiPipeline`` is the entry point; results are plain ``AnalysisResult`` data.
"""

from __future__ import annotations

from omero_hwsi._deps import require

require("torch", extra="worker", purpose="model inference")
require("transformers", extra="worker", purpose="model inference")

from omero_hwsi.inference.evidence import EvidenceBudget, explain  # noqa: E402
from omero_hwsi.inference.pipeline import Decoding, HwsiPipeline, RetrievalResult  # noqa: E402
from omero_hwsi.results.schema import AnalysisResult, EvidenceItem, LabelScore  # noqa: E402

__all__ = [
    "AnalysisResult",
    "Decoding",
    "EvidenceBudget",
    "EvidenceItem",
    "HwsiPipeline",
    "LabelScore",
    "RetrievalResult",
    "explain",
]
