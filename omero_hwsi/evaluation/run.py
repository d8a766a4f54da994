"""Run a model over a WSI-Bench test file and score it: ``hwsi evaluate``.

What is measured, and why this way:

* **Closed questions** (options inline, ``"... A) x B) y"``) are answered by option
  likelihood: every option, written as the reference answers are (``"B) y"``), is scored as
  the answer by its teacher-forced log-likelihood (``task="classify"``) and the most likely
  one is the prediction. Generated text is never parsed for a letter: a regex on free text
  measures the parser as much as the model.
* **Blind** is the same model and the same scoring with every floating visual input zeroed
  (masks and ids kept, so the token layout is unchanged). The gap between accuracy and blind
  accuracy is what the slide contributes; a blind score far above chance means the question
  can be answered from its wording (or from priors learned on the training set).
* **Open questions** (no options: reports, captions, open VQA) are generated greedily and
  scored with BLEU-1..4, ROUGE-L and METEOR (exact + stem); reports also with findings recall
  over a closed vocabulary of class labels.
* **Retrieval**: Recall@1/5 of each slide's own report among all reports of the benchmark,
  in the model's alignment space (skipped, with a note, for models without a text tower).
* **Pointing game**: for rows with an ``evidence_target``, occlusion evidence at region depth
  for the *reference* answer (what should the model look at to say the right thing), and
  whether the top region hits a target, beside the chance rate of a random region.

All metric formulas live in :mod:`omero_hwsi.evaluation.metrics`.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omero_hwsi._io import atomic_write, write_json_atomic
from omero_hwsi._types import ProgressFn
from omero_hwsi.errors import InputError
from omero_hwsi.evaluation import metrics
from omero_hwsi.training.data import (
    DatasetError,
    InstructionSample,
    index_stores,
    match_stores,
    read_wsibench_test,
)

__all__ = [
    "METRICS_FILE",
    "PREDICTIONS_FILE",
    "Choices",
    "default_vocabulary",
    "evaluate",
    "parse_choices",
]

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"

_OPTION = re.compile(r"(?<!\S)([A-Z])\)\s")
_REPORT_TEMPLATES = ("report",)
_DIAGNOSIS_TEMPLATE = "diagnosis"
_RETRIEVAL_KS = (1, 5)


def default_vocabulary() -> tuple[str, ...]:
    """The synthetic tissue classes' labels (``omero_hwsi.synthetic.classes``), in order."""
    from omero_hwsi.synthetic.classes import TISSUE_CLASSES

    return tuple(c.label for c in TISSUE_CLASSES.values())


@dataclass(frozen=True, slots=True)
class Choices:
    """A multiple-choice question split into its stem and options.

    Attributes:
        stem: the question before the first option.
        options: the options as answers are written (``"A) carcinoma"``), in letter order.
        texts: the option texts without their letters (``"carcinoma"``).
    """

    stem: str
    options: tuple[str, ...]
    texts: tuple[str, ...]


def parse_choices(question: str) -> Choices | None:
    """Split ``"Stem? A) x B) y"`` into stem and options; None when the question is open.

    Options are recognised only as a run of consecutive letters from ``A``, each written
    ``"<letter>) "`` after whitespace, and at least two of them, so a stray "B)" inside a
    sentence does not turn an open question into a closed one.
    """
    found = list(_OPTION.finditer(question))
    starts: list[re.Match[str]] = []
    for match in found:
        if match[1] == chr(ord("A") + len(starts)):
            starts.append(match)
        elif match[1] == "A":  # a new run: keep the latest one starting at A
            starts = [match]
    if len(starts) < 2:
        return None
    texts: list[str] = []
    for i, match in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(question)
        texts.append(question[match.end():end].strip())
    if any(not t for t in texts):
        return None
    options = tuple(f"{m[1]}) {t}" for m, t in zip(starts, texts, strict=True))
    return Choices(stem=question[: starts[0].start()].strip(), options=options, texts=tuple(texts))


@dataclass(slots=True)
class _Row:
    sample: InstructionSample
    template: str | None
    evidence_target: dict[str, Any] | None
    choices: Choices | None


def _raw_extras(path: Path) -> dict[str, dict[str, Any]]:
    """``question_id`` -> the fields the reader does not keep (``template``, ``evidence_target``)."""
    extras: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            extras[str(record["question_id"])] = record
    return extras


def _load_rows(benchmark: Path, limit: int | None) -> list[_Row]:
    samples = read_wsibench_test(benchmark)
    extras = _raw_extras(benchmark)
    if limit is not None:
        if limit < 1:
            raise InputError(f"limit must be >= 1 slide, got {limit}")
        keep: list[str] = []
        for s in samples:
            if s.slide_id not in keep:
                keep.append(s.slide_id)
        allowed = set(keep[:limit])
        samples = [s for s in samples if s.slide_id in allowed]
    rows = []
    for sample in samples:
        extra = extras.get(sample.record_id, {})
        template = extra.get("template")
        target = extra.get("evidence_target")
        rows.append(_Row(
            sample=sample, template=template if isinstance(template, str) else None,
            evidence_target=target if isinstance(target, dict) and target.get("polygons") else None,
            choices=parse_choices(sample.question),
        ))
    return rows


def _truth_labels(ground_truth: Path, slide_id: str, vocabulary: Sequence[str]) -> set[str]:
    """Class labels of a slide's regions from its truth GeoJSON (``truth/<id>.geojson``)."""
    from omero_hwsi.synthetic.classes import TISSUE_CLASSES

    path = ground_truth / f"{slide_id}.geojson"
    if not path.is_file():
        raise DatasetError(f"{path}: no ground truth for slide {slide_id}")
    data = json.loads(path.read_text(encoding="utf-8"))
    labels = set()
    for feature in data.get("features", []):
        props = feature.get("properties") or {}
        name = (props.get("classification") or {}).get("name")
        if props.get("objectType") != "annotation" or not isinstance(props.get("hid"), str):
            continue
        if isinstance(name, str):
            label = TISSUE_CLASSES[name].label if name in TISSUE_CLASSES else name
            if label in vocabulary:
                labels.add(label)
    return labels


def _mean_group(values: Mapping[str, list[tuple[bool, bool, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted(values):
        items = values[key]
        out[key] = {
            "n": len(items),
            "accuracy": sum(c for c, _, _ in items) / len(items),
            "blind_accuracy": sum(b for _, b, _ in items) / len(items),
            "chance": sum(p for _, _, p in items) / len(items),
        }
    return out


def _finite(value: Any) -> Any:
    """NaN -> None, recursively: metrics.json is strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def evaluate(
    benchmark: str | os.PathLike[str],
    stores_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    *,
    ground_truth: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str],
    limit: int | None = None,
    vocabulary: Sequence[str] | None = None,
    device: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Score a model on a WSI-Bench test JSONL and write ``metrics.json`` + ``predictions.jsonl``.

    Args:
        benchmark: the test file (``{question_id, question, T-answer, metadata[, template,
            evidence_target]}`` per line).
        stores_dir: folder of feature stores; every slide of the benchmark needs one, matched
            by exact slide id.
        model_dir: the model folder (:meth:`HwsiPipeline.from_pretrained`).
        ground_truth: optional folder of truth GeoJSONs (``<slide id>.geojson``, as
            ``generate_dataset`` writes under ``truth/``); when given, findings recall counts
            the classes of the slide's regions, else the classes the reference report names.
        out_dir: where the two files go (written atomically).
        limit: evaluate only the first ``limit`` slides of the file (all their questions).
        vocabulary: class labels for findings recall (default: the synthetic classes).
        device: ``cpu`` or ``cuda`` (default: CUDA when available).
        batch_size: slides per forward pass for scoring and generation.
        max_new_tokens: longest generated answer.
        progress: ``progress(stage, done, total)`` callback.

    Returns:
        The metrics (also in ``metrics.json``); NaN-free (missing values are None).

    Raises:
        DatasetError: a malformed benchmark, missing feature stores or truth files.
        InputError: ``limit`` < 1, or the benchmark has no rows.
        FeatureStoreError: stores made with other encoders or grid than the model's.
    """
    import torch

    from omero_hwsi.features.store import SlideFeatures, load_features
    from omero_hwsi.inference import Decoding, HwsiPipeline
    from omero_hwsi.inference.evidence import explain
    from omero_hwsi.inference.scoring import split_prompt

    began = time.perf_counter()
    bench = Path(benchmark)
    out = Path(out_dir)
    vocab = tuple(vocabulary) if vocabulary is not None else default_vocabulary()
    rows = _load_rows(bench, limit)
    if not rows:
        raise InputError(f"{bench}: no questions to evaluate")
    stores = match_stores([r.sample for r in rows], index_stores(stores_dir))
    truth_dir = Path(ground_truth) if ground_truth is not None else None
    pipeline = HwsiPipeline.from_pretrained(model_dir, device=device)
    cache: dict[str, SlideFeatures] = {}

    def features(slide_id: str) -> SlideFeatures:
        if slide_id not in cache:
            cache[slide_id] = load_features(stores[slide_id])
        return cache[slide_id]

    def tick(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)

    predictions: list[dict[str, Any]] = [
        {"question_id": r.sample.record_id, "slide_id": r.sample.slide_id,
         "metadata": r.sample.task, "template": r.template, "question": r.sample.question,
         "reference": r.sample.answer, "kind": "closed" if r.choices else "open"}
        for r in rows
    ]

    # -- closed questions: option likelihood, with and without the slide --------------------
    closed = [i for i, r in enumerate(rows) if r.choices is not None]
    by_options: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i in closed:
        choices = rows[i].choices
        assert choices is not None
        by_options[choices.options].append(i)
    done = 0
    for options, members in by_options.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            slides = [features(rows[i].sample.slide_id) for i in chunk]
            questions = [rows[i].sample.question for i in chunk]
            results = pipeline.ask(slides, questions, task="classify", labels=list(options),
                                   evidence="none", batch_size=len(chunk))
            with torch.no_grad():
                batch = pipeline.visual_batch(slides)
                blind = {k: (torch.zeros_like(v) if v.is_floating_point() else v)
                         for k, v in batch.items()}
                blind_answers, _ = pipeline._classify(blind, questions, list(options))
            for i, result, blind_answer in zip(chunk, results, blind_answers, strict=True):
                reference = rows[i].sample.answer
                predictions[i].update(
                    options=list(options), prediction=result.answer,
                    probabilities={s.label: round(s.probability, 6) for s in result.labels},
                    correct=result.answer == reference, blind_prediction=blind_answer,
                    blind_correct=blind_answer == reference,
                )
            done += len(chunk)
            tick("closed", done, len(closed))

    closed_metrics: dict[str, Any] = {"n": len(closed)}
    if closed:
        refs = [rows[i].sample.answer for i in closed]
        closed_metrics.update(
            accuracy=metrics.accuracy([predictions[i]["prediction"] for i in closed], refs),
            blind_accuracy=metrics.accuracy([predictions[i]["blind_prediction"] for i in closed],
                                            refs),
            chance=sum(1 / len(predictions[i]["options"]) for i in closed) / len(closed),
        )
        families: dict[str, list[tuple[bool, bool, float]]] = defaultdict(list)
        templates: dict[str, list[tuple[bool, bool, float]]] = defaultdict(list)
        for i in closed:
            item = (predictions[i]["correct"], predictions[i]["blind_correct"],
                    1 / len(predictions[i]["options"]))
            families[rows[i].sample.task or "unknown"].append(item)
            template = rows[i].template
            if template is not None:
                templates[template].append(item)
        closed_metrics["by_family"] = _mean_group(families)
        closed_metrics["by_template"] = _mean_group(templates)
        diag = [i for i in closed if rows[i].template == _DIAGNOSIS_TEMPLATE]
        if diag:
            closed_metrics["diagnosis_balanced_accuracy"] = metrics.balanced_accuracy(
                [predictions[i]["prediction"] for i in diag], [rows[i].sample.answer for i in diag])
            closed_metrics["diagnosis_blind_balanced_accuracy"] = metrics.balanced_accuracy(
                [predictions[i]["blind_prediction"] for i in diag],
                [rows[i].sample.answer for i in diag])

    # -- open questions: greedy generation -------------------------------------------------
    open_rows = [i for i, r in enumerate(rows) if r.choices is None]
    decoding = Decoding(max_new_tokens=max_new_tokens)
    for start in range(0, len(open_rows), batch_size):
        chunk = open_rows[start:start + batch_size]
        results = pipeline.ask([features(rows[i].sample.slide_id) for i in chunk],
                               [rows[i].sample.question for i in chunk], task="vqa",
                               evidence="none", decoding=decoding, batch_size=len(chunk))
        for i, result in zip(chunk, results, strict=True):
            predictions[i]["prediction"] = result.answer
        tick("open", min(start + batch_size, len(open_rows)), len(open_rows))

    open_metrics: dict[str, Any] = {"n": len(open_rows)}
    groups: dict[str, list[int]] = {"all": open_rows}
    for i in open_rows:
        groups.setdefault(f"template:{rows[i].template}" if rows[i].template
                          else f"family:{rows[i].sample.task}", []).append(i)
    for name, members in groups.items():
        if members:
            open_metrics[name] = _text_scores(
                [predictions[i]["prediction"] for i in members],
                [rows[i].sample.answer for i in members])
    reports = [i for i in open_rows if rows[i].template in _REPORT_TEMPLATES
               or (rows[i].template is None and rows[i].sample.task == "Report")]
    findings: dict[str, Any] = {"n": len(reports), "vocabulary": list(vocab),
                                "truth": "ground-truth regions" if truth_dir else
                                "classes named in the reference report"}
    if reports:
        truths = [(_truth_labels(truth_dir, rows[i].sample.slide_id, vocab) if truth_dir
                   else metrics.named_labels(rows[i].sample.answer, vocab)) for i in reports]
        texts = [predictions[i]["prediction"] for i in reports]
        findings["recall"] = metrics.findings_recall(texts, truths, vocab)
        for i, truth in zip(reports, truths, strict=True):
            named = metrics.named_labels(predictions[i]["prediction"], vocab)
            predictions[i]["findings"] = {"truth": sorted(truth), "named": sorted(named)}
    open_metrics["findings"] = findings

    # -- retrieval: slide -> its report ------------------------------------------------------
    retrieval: dict[str, Any]
    report_of: dict[str, str] = {}
    for i in reports:
        report_of.setdefault(rows[i].sample.slide_id, rows[i].sample.answer)
    if pipeline.text_encoder is None or pipeline.model.model.align_heads is None:
        retrieval = {"skipped": "the model has no text tower or alignment heads"}
    elif len(report_of) < 2:
        retrieval = {"skipped": "fewer than two slides with a reference report"}
    else:
        ids = sorted(report_of)
        matched = pipeline.retrieve([features(s) for s in ids], [report_of[s] for s in ids])
        retrieval = {"n": len(ids), "direction": "slide -> report text"}
        for k in _RETRIEVAL_KS:
            retrieval[f"recall@{k}"] = metrics.recall_at_k(matched.similarity, k)
            retrieval[f"chance@{k}"] = min(k, len(ids)) / len(ids)

    # -- pointing game on the reference answer ----------------------------------------------
    targeted = [i for i, r in enumerate(rows) if r.evidence_target is not None]
    outcomes: list[metrics.PointingOutcome] = []
    by_template: dict[str, list[metrics.PointingOutcome]] = defaultdict(list)
    for n, i in enumerate(targeted, start=1):
        row = rows[i]
        assert row.evidence_target is not None
        slide = features(row.sample.slide_id)
        with torch.no_grad():
            batch = pipeline.visual_batch([slide])
            parts = split_prompt(pipeline.processor, row.sample.question, row.sample.answer)
            items, _ = explain(pipeline.model, parts, batch, slide, depth="region",
                               method="occlusion")
        regions = [e for e in items if e.level == "region"]
        if regions:
            outcome = metrics.pointing_outcome([e.score for e in regions],
                                               [e.geometry for e in regions],
                                               row.evidence_target["polygons"])
            outcomes.append(outcome)
            by_template[row.template or row.sample.task or "unknown"].append(outcome)
            predictions[i]["pointing"] = {
                "top_region": regions[outcome.top].id, "hit": outcome.hit,
                "chance": round(outcome.chance, 6),
                "targets": row.evidence_target.get("region_ids", []),
            }
        tick("pointing", n, len(targeted))
    pointing: dict[str, Any] = {
        **metrics.pointing_game(outcomes), "evidence": "occlusion, region depth",
        "answer": "reference (T-answer)",
        "by_template": {k: metrics.pointing_game(v) for k, v in sorted(by_template.items())},
    }

    summary: dict[str, Any] = _finite({
        "benchmark": str(bench), "stores": str(stores_dir), "model": pipeline.model_info(),
        "n_questions": len(rows), "n_slides": len(stores), "limit": limit,
        "closed": closed_metrics, "open": open_metrics, "retrieval": retrieval,
        "pointing_game": pointing,
        "notes": [
            "closed questions: option likelihood (teacher-forced), never parsed text",
            "blind: same model and scoring with every floating visual input zeroed",
            "meteor_exact_stem: METEOR with exact and Porter-stem matching only (no synonyms)",
        ],
        "seconds": round(time.perf_counter() - began, 2),
    })
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / PREDICTIONS_FILE, "w") as handle:
        for record in predictions:
            handle.write(json.dumps(_finite(record), ensure_ascii=False) + "\n")
    write_json_atomic(out / METRICS_FILE, summary)
    return summary


def _text_scores(predictions: list[str], references: list[str]) -> dict[str, Any]:
    scores: dict[str, Any] = {"n": len(predictions)}
    for order in range(1, 5):
        scores[f"bleu{order}"] = metrics.bleu(predictions, references, max_order=order)
    scores["rouge_l"] = metrics.rouge_l(predictions, references)
    scores["meteor_exact_stem"] = metrics.meteor_exact_stem(predictions, references)
    return scores

