"""What an analysis returns: the answer, the evidence behind it, and how both were made.

An :class:`AnalysisResult` is plain data (JSON-serialisable with :meth:`AnalysisResult.to_dict`)
because it crosses process and server boundaries: Celery results, OMERO attachments, QuPath
imports. Every evidence score names its hierarchy id (``r<i>``, ``r<i>.p<j>``,
``r<i>.p<j>.c<k>``), its level-0 geometry and the method that produced it, so a reader can
always tell an occlusion score (faithful to the model) from a gradient one (fast, approximate).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = [
    "EVIDENCE_METHODS",
    "RESEARCH_USE",
    "AnalysisResult",
    "EvidenceItem",
    "EvidenceLevel",
    "EvidenceMethod",
    "LabelScore",
    "TextMatch",
]

EvidenceLevel = Literal["region", "patch", "cell"]
EvidenceMethod = Literal["occlusion", "grad_x_input", "attention"]

EVIDENCE_METHODS: dict[str, str] = {
    "occlusion": (
        "drop in the teacher-forced log-likelihood (nats) of the answer when the element is "
        "removed from the model's input (a region with its patches and nuclei, a patch with its "
        "cell token, a nucleus by re-fusing its patch without it); positive = the answer "
        "relies on it"
    ),
    "grad_x_input": (
        "gradient of the answer's log-likelihood times the element's projected token (region "
        "and patch: their tokens in the LLM space; nucleus: its input descriptor), summed over "
        "features; one backward pass, a first-order approximation of occlusion"
    ),
    "attention": (
        "attention flow, approximate: the answer's attention to each visual token (last LLM "
        "layer, heads and answer positions averaged), followed through the resampler's "
        "query->region attention or to each region's and patch's own tokens (concat), and to "
        "nuclei by CCAF's CLS->nucleus attention; attention is not attribution"
    ),
}
"""How each evidence method computes its score, written into every result."""

RESEARCH_USE = (
    "Research use only. Not for diagnosis or treatment decisions. Generated text and evidence "
    "scores describe the model's behaviour, not ground truth."
)


@dataclass(frozen=True, slots=True)
class EvidenceItem:
    """One scored element of the slide hierarchy.

    Attributes:
        id: hierarchy id (``r3``, ``r3.p41``, ``r3.p41.c7``).
        level: ``region``, ``patch`` or ``cell`` (a nucleus).
        method: the evidence method (see :data:`EVIDENCE_METHODS`).
        score: the method's score; for occlusion, nats of log-likelihood lost without it.
        geometry: GeoJSON geometry in level-0 pixel coordinates (a box polygon for regions
            and patches, the nucleus outline for cells).
        parent: id of the enclosing element (None for regions).
    """

    id: str
    level: EvidenceLevel
    method: EvidenceMethod
    score: float
    geometry: dict[str, Any]
    parent: str | None = None


@dataclass(frozen=True, slots=True)
class LabelScore:
    """A candidate label of a classification and the model's belief in it.

    Attributes:
        label: the label text, scored as the answer.
        log_likelihood: teacher-forced log-likelihood of the label's tokens (nats, summed).
        probability: softmax of the log-likelihoods over the candidate labels.
    """

    label: str
    log_likelihood: float
    probability: float


@dataclass(frozen=True, slots=True)
class TextMatch:
    """A text compared with the slide by ``retrieve``.

    Attributes:
        text: the candidate text.
        similarity: cosine similarity of slide and text in the alignment space, in [-1, 1].
    """

    text: str
    similarity: float


@dataclass(frozen=True, slots=True)
class AnalysisResult:
    """The answer for one slide, with its provenance and evidence.

    Attributes:
        slide: what was analysed: ``slide_id``, ``store`` (feature store path), ``checksum``.
        task: ``vqa``, ``report``, ``caption``, ``classify`` or ``retrieve``.
        question: the prompt given to the model (for ``retrieve``: what was matched).
        answer: generated text, the most likely label (``classify``) or the closest text
            (``retrieve``).
        labels: per-label scores for ``classify`` (most likely first), else empty.
        matches: per-text similarities for ``retrieve`` (closest first), else empty.
        evidence: scored elements, best first within each level.
        evidence_methods: method name -> how its scores were computed, for the methods used.
        evidence_notes: why some depth was not scored (e.g. no nuclei in the top patches).
        model: which model answered (folder, LLM family, prompt layout, fusion, ...).
        decoding: the generation settings (greedy unless sampling was asked, with its seed).
        timings: seconds spent per step.
        created: ISO 8601 UTC time of the analysis.
        notice: the research-use statement.
    """

    slide: dict[str, Any]
    task: str
    question: str
    answer: str
    model: dict[str, Any]
    decoding: dict[str, Any]
    created: str
    labels: list[LabelScore] = field(default_factory=list)
    matches: list[TextMatch] = field(default_factory=list)
    evidence: list[EvidenceItem] = field(default_factory=list)
    evidence_methods: dict[str, str] = field(default_factory=dict)
    evidence_notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notice: str = RESEARCH_USE

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``json.dumps`` works on it as is)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalysisResult:
        """Rebuild a result written by :meth:`to_dict`."""
        values = dict(data)
        values["labels"] = [LabelScore(**x) for x in values.get("labels", [])]
        values["matches"] = [TextMatch(**x) for x in values.get("matches", [])]
        values["evidence"] = [EvidenceItem(**x) for x in values.get("evidence", [])]
        return cls(**values)

    def top(self, level: EvidenceLevel, n: int = 5) -> list[EvidenceItem]:
        """The ``n`` highest-scoring elements of one level."""
        items = [e for e in self.evidence if e.level == level]
        return sorted(items, key=lambda e: e.score, reverse=True)[:n]
