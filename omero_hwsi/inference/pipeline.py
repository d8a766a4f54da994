"""Ask a trained MLLM-HWSI model about slides: answers, label scores, retrieval, evidence.

:class:`HwsiPipeline` is the Python API behind ``hwsi ask`` (and, later, the Celery worker). It
holds one model in eval mode with its processor (the stored prompt layout) and, when the model
has one, its contrastive text tower. Inputs are loaded feature stores, never slides: feature
extraction is a separate, cacheable step.

Tasks:

* ``vqa``, ``report``, ``caption``: generated text, batched across slides; greedy by default
  so a rerun gives the same text, sampling only when asked, with a seed.
* ``classify``: every candidate label is scored as the answer by its teacher-forced
  log-likelihood; probabilities are the softmax over the labels. The generated text is never
  parsed for a label.
* ``retrieve`` (:meth:`HwsiPipeline.retrieve`): cosine similarity of slide and text in the
  contrastive alignment space.

Each answer can carry evidence (:mod:`omero_hwsi.inference.evidence`).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast, get_args

import torch
from torch import Tensor, nn

from omero_hwsi.errors import CheckpointMismatchError, InputError
from omero_hwsi.features.store import SlideFeatures
from omero_hwsi.inference.evidence import EvidenceBudget, EvidenceDepth, explain
from omero_hwsi.inference.scoring import answer_log_likelihood, split_prompt
from omero_hwsi.model.convert_official import is_official_folder, load_official
from omero_hwsi.model.losses import TextEncoder
from omero_hwsi.model.modeling_hwsi import HwsiForConditionalGeneration
from omero_hwsi.model.processing_hwsi import HwsiProcessor, collate_visual, visual_inputs
from omero_hwsi.model.text_tower import load_text_encoder
from omero_hwsi.results.schema import (
    EVIDENCE_METHODS,
    AnalysisResult,
    EvidenceItem,
    EvidenceMethod,
    LabelScore,
    TextMatch,
)

__all__ = ["DEFAULT_QUESTIONS", "Decoding", "HwsiPipeline", "RetrievalResult", "Task"]

Task = Literal["vqa", "report", "caption", "classify", "retrieve"]

DEFAULT_QUESTIONS: dict[str, str] = {
    "report": "Write the pathology report for this slide.",
    "caption": "Describe this slide in one sentence.",
    "classify": "What is the diagnosis of this slide?",
    "retrieve": "Which of these texts describes this slide best?",
}
"""Prompts used when a task is run without a question."""

_MODEL_INPUTS = ("region", "region_mask", "patch", "patch_mask", "cell", "cell_mask", "cell_pos",
                 "region_pos")
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True, slots=True)
class Decoding:
    """Text generation settings; greedy unless ``do_sample``.

    Attributes:
        max_new_tokens: most tokens generated per answer.
        do_sample: sample instead of greedy decoding (needs ``seed`` for reproducibility).
        temperature, top_p, repetition_penalty: the usual sampling controls.
        seed: seeds torch's generator before sampling; part of a job's identity.
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.seed is None:
            raise InputError("sampling needs a seed (--seed), so the answer can be reproduced")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise InputError(f"invalid sampling settings: {self}")

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                                  "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


@dataclass(frozen=True, slots=True)
class RetrievalResult:
    """Slide <-> text similarities in the alignment space.

    Attributes:
        slides: slide ids, rows of ``similarity``.
        texts: the texts, columns.
        similarity: cosine similarities ``[slide][text]`` in [-1, 1].
        model: which model embedded them.
    """

    slides: list[str]
    texts: list[str]
    similarity: list[list[float]]
    model: dict[str, Any]

    def best_texts(self, slide: int, n: int = 3) -> list[tuple[str, float]]:
        """The ``n`` texts closest to slide ``slide``."""
        row = self.similarity[slide]
        order = sorted(range(len(row)), key=lambda j: -row[j])[:n]
        return [(self.texts[j], row[j]) for j in order]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _slide_info(features: SlideFeatures) -> dict[str, Any]:
    slide = features.provenance.get("slide", {})
    path = slide.get("path")
    return {
        "slide_id": Path(path).stem if path else features.path.name,
        "slide_path": path,
        "checksum": slide.get("sha256"),
        "store": str(features.path),
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class HwsiPipeline:
    """A loaded model, ready to answer questions about feature stores."""

    def __init__(
        self,
        model: HwsiForConditionalGeneration,
        processor: HwsiProcessor,
        *,
        text_encoder: TextEncoder | None = None,
        source: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.text_encoder = text_encoder.eval() if text_encoder is not None else None
        self.source = None if source is None else str(source)
        self.device = next(model.parameters()).device
        if self.text_encoder is not None:
            self.text_encoder.to(self.device)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], *, device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> HwsiPipeline:
        """Load model, processor and text tower from a local folder.

        ``path`` is a folder in this project's format (``hwsi train``, ``hwsi model
        import-official``) or a released MLLM-HWSI folder, converted on load. ``device``
        defaults to CUDA when available; ``dtype`` to bf16 on CUDA, fp32 on CPU.
        """
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if target.type == "cuda" else torch.float32)
        model: HwsiForConditionalGeneration
        if is_official_folder(path):
            # The authors' released layout: converted on load, its tokenizer in the released
            # prompt layout (the importer writes the same processor into our format).
            from transformers import AutoTokenizer

            model = load_official(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            processor = HwsiProcessor.for_config(tokenizer, model.config)
        else:
            model = HwsiForConditionalGeneration.from_pretrained(path, dtype=dtype)
            processor = HwsiProcessor.from_pretrained(path)
        rows = cast(nn.Embedding, model.get_input_embeddings()).num_embeddings
        if len(processor.tokenizer) > rows:
            raise CheckpointMismatchError(
                f"{path}: the tokenizer has {len(processor.tokenizer)} tokens but the model's "
                f"embeddings {rows}; save model and processor together"
            )
        model = cast(Any, model).to(target)
        return cls(model, processor, text_encoder=load_text_encoder(path), source=path)

    # -- description -------------------------------------------------------------------------

    def model_info(self) -> dict[str, Any]:
        """Which model this is, as recorded with every result."""
        config = self.model.config
        text = config.get_text_config(decoder=True)
        digest = hashlib.sha256(config.to_json_string(use_diff=False).encode("utf-8")).hexdigest()
        return {
            "path": self.source,
            "model_type": config.model_type,
            "config_sha256": digest,
            "llm": text.model_type,
            "llm_hidden_size": config.hidden_size,
            "fusion_mode": config.fusion_mode,
            "cell_fusion": config.cell_fusion,
            "region_position_encoding": config.region_position_encoding,
            "wsi_aggregator": config.wsi_aggregator,
            "visual_scales": list(config.scales),
            "prompt_layout": self.processor.prompt_layout,
            "expected_features": config.expected_features,
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }

    # -- inputs ------------------------------------------------------------------------------

    def visual_batch(self, slides: Sequence[SlideFeatures]) -> dict[str, Tensor]:
        """Model inputs for ``slides`` on the model's device (refuses mismatched stores)."""
        config = self.model.config
        if config.cell_fusion == "precomputed":
            raise InputError(
                "this model takes precomputed per-patch cell vectors, which the feature stores "
                "made here do not hold; use a model with cell_fusion 'ccaf'"
            )
        items = [visual_inputs(f, max_cells=config.max_cells, expected=config.expected_features)
                 for f in slides]
        batch = collate_visual(items)
        dtype = self.model.get_input_embeddings().weight.dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in batch.items()}

    @staticmethod
    def _single(batch: dict[str, Tensor], i: int) -> dict[str, Tensor]:
        return {k: v[i : i + 1] for k, v in batch.items()}

    # -- tasks -------------------------------------------------------------------------------

    @torch.no_grad()
    def ask(
        self,
        slides: Sequence[SlideFeatures],
        question: str | Sequence[str] | None = None,
        *,
        task: Task = "vqa",
        labels: Sequence[str] | None = None,
        evidence: EvidenceDepth = "cell",
        evidence_method: EvidenceMethod = "occlusion",
        budget: EvidenceBudget | None = None,
        decoding: Decoding | None = None,
        batch_size: int = 4,
        progress: ProgressFn | None = None,
    ) -> list[AnalysisResult]:
        """Answer one question per slide (the same one for all when a single string is given).

        Raises:
            InputError: an unknown task, no question for ``vqa``, labels missing for
                ``classify`` or given to another task, no slides.
            FeatureStoreError: a store made with other encoders or grid than the model's.
        """
        if task not in get_args(Task):
            raise InputError(f"unknown task {task!r}; tasks: {', '.join(get_args(Task))}")
        if not slides:
            raise InputError("no slides to analyse")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        questions = self._questions(question, task, len(slides))
        if task in ("classify", "retrieve"):
            if not labels or len(set(labels)) < 2 or any(not str(x).strip() for x in labels):
                raise InputError(f"{task} needs at least two distinct, non-empty labels (--labels)")
        elif labels:
            raise InputError(f"labels are for the classify task, not {task}")
        decoding = decoding or Decoding()
        budget = budget or EvidenceBudget()
        model = self.model_info()
        record = self._decoding_record(task, decoding)
        results: list[AnalysisResult] = []
        total = len(slides)
        for start in range(0, total, batch_size):
            chunk = list(slides[start : start + batch_size])
            chunk_questions = questions[start : start + batch_size]
            began = time.perf_counter()
            batch = self.visual_batch(chunk)
            scores: list[list[LabelScore]] = [[] for _ in chunk]
            matches: list[list[TextMatch]] = [[] for _ in chunk]
            if task == "classify":
                assert labels is not None
                answers, scores = self._classify(batch, chunk_questions, list(labels))
            elif task == "retrieve":
                assert labels is not None
                answers, matches = self._match(batch, list(labels))
            else:
                answers = self._generate(batch, chunk_questions, decoding)
            answer_time = (time.perf_counter() - began) / len(chunk)
            for i, features in enumerate(chunk):
                began = time.perf_counter()
                items: list[EvidenceItem] = []
                notes: list[str] = []
                if task == "retrieve" and evidence != "none":
                    notes.append("retrieval compares embeddings: there is no answer likelihood "
                                 "to explain, so no evidence was scored")
                elif evidence != "none":
                    parts = split_prompt(self.processor, chunk_questions[i], answers[i])
                    items, notes = explain(self.model, parts, self._single(batch, i), features,
                                           depth=evidence, method=evidence_method, budget=budget)
                results.append(AnalysisResult(
                    slide=_slide_info(features), task=task, question=chunk_questions[i],
                    answer=answers[i], model=model, decoding=record, created=_now(),
                    labels=scores[i], matches=matches[i], evidence=items,
                    evidence_methods={evidence_method: EVIDENCE_METHODS[evidence_method]} if items else {},
                    evidence_notes=notes,
                    timings={"answer_s": round(answer_time, 4),
                             "evidence_s": round(time.perf_counter() - began, 4)},
                ))
                if progress is not None:
                    progress("slides", len(results), total)
        return results

    @staticmethod
    def _questions(question: str | Sequence[str] | None, task: str, count: int) -> list[str]:
        if question is None:
            if task not in DEFAULT_QUESTIONS:
                raise InputError(f"the {task} task needs a question (--question)")
            return [DEFAULT_QUESTIONS[task]] * count
        if isinstance(question, str):
            questions = [question] * count
        else:
            questions = list(question)
            if len(questions) != count:
                raise InputError(f"{len(questions)} questions for {count} slides")
        if any(not q.strip() for q in questions):
            raise InputError("a question is empty")
        return questions

    @staticmethod
    def _decoding_record(task: str, decoding: Decoding) -> dict[str, Any]:
        if task == "classify":
            return {"mode": "label likelihood", "scoring": "teacher-forced log-likelihood, summed over the label's tokens"}
        if task == "retrieve":
            return {"mode": "embedding similarity", "scoring": "cosine of slide and text in the alignment space"}
        record = asdict(decoding)
        record["mode"] = "sampling" if decoding.do_sample else "greedy"
        return record

    def _generate(self, batch: dict[str, Tensor], questions: list[str], decoding: Decoding) -> list[str]:
        visual = {k: v for k, v in batch.items() if k in _MODEL_INPUTS}
        encoded = self.processor(questions, visual, padding_side="left")
        encoded = {k: v.to(self.device) for k, v in encoded.items()}
        if decoding.do_sample:
            assert decoding.seed is not None
            torch.manual_seed(decoding.seed)
        tokenizer = self.processor.tokenizer
        new = self.model.generate(
            **encoded, **decoding.generate_kwargs(),
            pad_token_id=tokenizer.pad_token_id, eos_token_id=self._stop_ids(),
        )
        return [self.processor.decode(row) for row in new]

    def _stop_ids(self) -> list[int]:
        """Token ids that end an answer: eos and the chat template's end-of-turn token."""
        tokenizer = self.processor.tokenizer
        ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
        for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
            value = tokenizer.convert_tokens_to_ids(token)
            if isinstance(value, int) and value != tokenizer.unk_token_id:
                ids.add(value)
        return sorted(ids)

    def _classify(
        self, batch: dict[str, Tensor], questions: list[str], labels: list[str]
    ) -> tuple[list[str], list[list[LabelScore]]]:
        visual = {k: v for k, v in batch.items() if k in _MODEL_INPUTS}
        out = self.model.model(**visual)
        answers: list[str] = []
        scores: list[list[LabelScore]] = []
        for i, question in enumerate(questions):
            tokens = out.visual_tokens[i][out.visual_mask[i]]
            parts = [split_prompt(self.processor, question, label) for label in labels]
            ll = answer_log_likelihood(self.model.language_model, parts, [tokens] * len(labels))
            probs = torch.softmax(ll, dim=0).tolist()
            ranked = sorted(
                (LabelScore(label=label, log_likelihood=float(v), probability=float(p))
                 for label, v, p in zip(labels, ll.tolist(), probs, strict=True)),
                key=lambda s: -s.log_likelihood,
            )
            answers.append(ranked[0].label)
            scores.append(ranked)
        return answers, scores

    def _similarity(self, batch: dict[str, Tensor], texts: Sequence[str]) -> Tensor:
        """``(B, T)`` cosine similarity of the batch's slides and ``texts``."""
        heads = self.model.model.align_heads
        if heads is None or self.text_encoder is None:
            raise InputError(
                "this model cannot retrieve: it has no alignment heads or text tower (train "
                "stages 1-2 with align_dim set; imported released weights have none)"
            )
        hwsi = self.model.model
        slide_vec = hwsi.aggregate_wsi(batch["region"], batch["region_mask"].bool())
        slide_emb = heads["wsi"](slide_vec).float()
        encoded = self.processor.tokenizer(list(texts), padding=True, return_tensors="pt")
        text_emb = self.text_encoder(encoded["input_ids"].to(self.device),
                                     encoded["attention_mask"].to(self.device)).float()
        similarity: Tensor = (slide_emb @ text_emb.T).clamp(-1.0, 1.0)
        return similarity

    def _match(self, batch: dict[str, Tensor], texts: list[str]) -> tuple[list[str], list[list[TextMatch]]]:
        similarity = self._similarity(batch, texts)
        matches = [
            sorted((TextMatch(text=t, similarity=round(float(v), 6)) for t, v in zip(texts, row, strict=True)),
                   key=lambda m: -m.similarity)
            for row in similarity.tolist()
        ]
        return [m[0].text for m in matches], matches

    @torch.no_grad()
    def retrieve(self, slides: Sequence[SlideFeatures], texts: Sequence[str]) -> RetrievalResult:
        """Cosine similarity of every slide with every text in the alignment space.

        Raises:
            InputError: no slides or texts, or the model has no alignment heads or text tower
                (imported released weights have neither).
        """
        if not slides or not texts:
            raise InputError("retrieval needs at least one slide and one text")
        similarity = self._similarity(self.visual_batch(slides), texts)
        return RetrievalResult(
            slides=[_slide_info(f)["slide_id"] for f in slides], texts=list(texts),
            similarity=[[round(float(x), 6) for x in row] for row in similarity.tolist()],
            model=self.model_info(),
        )

