"""Whole synthetic datasets: slides, truth, instruction files, per-scale texts and a corpus.

:func:`generate_dataset` is the one call a demo or a test needs to get data the training
stages read unchanged (WSI-Bench train JSON or test JSONL, ``scale_texts`` JSONL, a stage-0
corpus) together with slides that ``hwsi extract`` reads like scans, and truth to score
answers and evidence against. Everything is a pure function of the arguments: the same
call writes byte-identical files, and slide ids carry the seed and split, so datasets made
with different seeds (or a train and a test split) never share a slide id.

Composition is balanced where a model could otherwise profit from a prior: diagnoses come
in shuffled blocks (each equally often, within one), region classes are filled greedily
towards equal counts within each slide's constraints (one lesion class per slide, next to
some normal tissue or stroma when the slide has 3+ regions, at most one region of necrosis
and only beside a lesion, at least two classes per slide), and the
correct letter of every multiple-choice template is balanced (:class:`~omero_hwsi.synthetic.
questions.LetterBalancer`).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from omero_hwsi._io import write_bytes_atomic, write_json_atomic
from omero_hwsi._types import ProgressFn
from omero_hwsi.slide.grid import GridSpec
from omero_hwsi.synthetic.classes import CLASS_NAMES, LESION_CLASSES, SHAPE_PAIR, TISSUE_CLASSES
from omero_hwsi.synthetic.pathology import (
    DEMO_GRID,
    ArtefactKind,
    ArtefactSpec,
    SlideSpec,
    render_slide,
    write_truth_geojson,
)
from omero_hwsi.synthetic.questions import (
    DIAGNOSES,
    LETTERS,
    TEMPLATES,
    LetterBalancer,
    evidence_target,
    slide_questions,
)
from omero_hwsi.synthetic.texts import caption, diagnosis, report, scale_texts

__all__ = ["DatasetManifest", "compose_specs", "generate_dataset"]

logger = logging.getLogger(__name__)

Split = Literal["train", "test"]
_SPLIT_CODE = {"train": 1, "test": 2}
_FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class DatasetManifest:
    """What :func:`generate_dataset` wrote.

    Attributes:
        out_dir: The dataset folder.
        split: ``train`` or ``test``.
        seed: The dataset seed.
        slide_ids: Slide ids in generation order.
        instructions: ``train.json`` (WSI-Bench train) or ``test.jsonl`` (WSI-Bench test).
        scale_texts: ``scale_texts.jsonl``.
        corpus: ``corpus.txt`` (reports and captions, blank-line separated).
        manifest: ``dataset.json`` (parameters, vocabulary, counts).
        counts: The ``counts`` object of ``dataset.json``.
    """

    out_dir: Path
    split: Split
    seed: int
    slide_ids: tuple[str, ...]
    instructions: Path
    scale_texts: Path
    corpus: Path
    manifest: Path
    counts: dict[str, Any]

    def slide_path(self, slide_id: str) -> Path:
        """The SVS file of ``slide_id``."""
        return self.out_dir / "slides" / f"{slide_id}.svs"

    def truth_path(self, slide_id: str) -> Path:
        """The truth GeoJSON of ``slide_id``."""
        return self.out_dir / "truth" / f"{slide_id}.geojson"


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def compose_specs(
    n_slides: int,
    *,
    seed: int,
    split: Split = "train",
    grid: GridSpec = DEMO_GRID,
    rows: int = 2,
    cols: int = 2,
    mpp: float = 0.5,
    artefact_rate: float = 0.5,
) -> list[SlideSpec]:
    """Draw the slides of a dataset: classes per region, artefacts, seeds and ids.

    Args:
        n_slides: Number of slides (>= 1).
        seed: Dataset seed (>= 0).
        split: Goes into the slide ids and seeds, so splits never share a slide.
        grid: Grid every slide is laid out for.
        rows: Regions per column.
        cols: Regions per row.
        mpp: Level-0 microns per pixel (0.5 or 0.25).
        artefact_rate: Chance of an ink stroke on the glass; half of it, the chance of a
            fold or bubble over one region.

    Raises:
        ValueError: On an invalid argument.
    """
    _check_int("n_slides", n_slides, 1)
    _check_int("seed", seed, 0)
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 0.0 <= artefact_rate <= 1.0:
        raise ValueError(f"artefact_rate must be in [0, 1], got {artefact_rate!r}")
    n_regions = _check_int("rows", rows, 1) * _check_int("cols", cols, 1)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split], 0xD5]))
    kinds: list[str | None] = [*LESION_CLASSES, None]
    counts = Counter({name: 0 for name in CLASS_NAMES})
    deck: list[str | None] = []
    specs: list[SlideSpec] = []
    for n in range(n_slides):
        if not deck:
            deck = [kinds[int(i)] for i in rng.permutation(len(kinds))]
        lesion = deck.pop()
        classes = _fill(lesion, n_regions, counts, rng)
        counts.update(classes)
        artefacts: list[ArtefactSpec] = []
        if rng.random() < artefact_rate:
            artefacts.append(ArtefactSpec("pen"))
        if rng.random() < artefact_rate / 2.0:
            kind: ArtefactKind = "fold" if rng.random() < 0.5 else "bubble"
            artefacts.append(ArtefactSpec(kind, int(rng.integers(n_regions))))
        slide_seed = int(
            np.random.SeedSequence([seed, _SPLIT_CODE[split], n]).generate_state(1)[0]
        )
        specs.append(SlideSpec(
            slide_id=f"syn{seed}-{split}-{n:04d}", rows=rows, cols=cols,
            classes=tuple(classes[int(i)] for i in rng.permutation(n_regions)), grid=grid,
            mpp=mpp, seed=slide_seed, artefacts=tuple(artefacts),
        ))
    return specs


def _fill(
    lesion: str | None, n_regions: int, counts: Counter[str], rng: np.random.Generator
) -> list[str]:
    """A slide's classes: the lesion, some benign tissue, then the least used allowed class."""
    allowed = ["normal", "stroma"] + ([lesion, "necrosis"] if lesion else [])
    caps = {"necrosis": 1}
    if lesion is not None:
        caps[lesion] = max(1, n_regions - 1)
    chosen = [lesion] if lesion is not None else []
    if lesion is not None and n_regions >= 3:
        # A lesion beside some benign tissue: variety over perfect class balance.
        benign = min(("normal", "stroma"), key=lambda c: (counts[c], rng.random()))
        chosen.append(benign)
    while len(chosen) < n_regions:
        options = [c for c in allowed if chosen.count(c) < caps.get(c, n_regions)]
        if len(chosen) == n_regions - 1 and n_regions > 1 and len(set(chosen)) == 1:
            options = [c for c in options if c != chosen[0]]  # at least two classes
        load = {c: counts[c] + chosen.count(c) for c in options}
        low = min(load.values())
        ties = [c for c in options if load[c] == low]
        chosen.append(ties[int(rng.integers(len(ties)))])
    return chosen


def generate_dataset(
    out_dir: str | os.PathLike[str],
    *,
    n_slides: int,
    seed: int,
    grid: GridSpec = DEMO_GRID,
    split: Split = "train",
    rows: int = 2,
    cols: int = 2,
    mpp: float = 0.5,
    artefact_rate: float = 0.5,
    truth_nuclei: bool = True,
    progress: ProgressFn | None = None,
) -> DatasetManifest:
    """Render a synthetic dataset into ``out_dir``.

    Writes ``slides/<id>.svs``, ``truth/<id>.geojson``, ``train.json`` (split ``train``) or
    ``test.jsonl`` (split ``test``), ``scale_texts.jsonl``, ``corpus.txt`` and
    ``dataset.json``; every file atomically. Arguments are those of :func:`compose_specs`,
    plus:

    Args:
        out_dir: Dataset folder (created if missing).
        truth_nuclei: Write every nucleus into the truth GeoJSON (~1-2 MB per slide of
            four 1024 px regions); regions and artefacts are always written.
        progress: Called as ``progress("slides", done, total)``.

    Returns:
        The :class:`DatasetManifest`.

    Raises:
        ValueError: On an invalid argument (nothing is written then).
    """
    specs = compose_specs(
        n_slides, seed=seed, split=split, grid=grid, rows=rows, cols=cols, mpp=mpp,
        artefact_rate=artefact_rate,
    )
    root = Path(out_dir)
    balancer = LetterBalancer(seed * 2 + _SPLIT_CODE[split])
    records: list[dict[str, Any]] = []
    text_lines: list[str] = []
    corpus: list[str] = []
    slides: list[dict[str, Any]] = []
    nuclei_per_class: Counter[str] = Counter()
    templates: Counter[str] = Counter()
    families: Counter[str] = Counter()
    letters: dict[str, Counter[str]] = {}
    if progress:
        progress("slides", 0, len(specs))
    for done, spec in enumerate(specs, start=1):
        sid = spec.slide_id
        truth = render_slide(spec, root / "slides" / f"{sid}.svs")
        write_truth_geojson(truth, root / "truth" / f"{sid}.geojson", nuclei=truth_nuclei)
        text_lines.append(json.dumps(scale_texts(truth), ensure_ascii=False))
        corpus.extend([report(truth), caption(truth)])
        for k, question in enumerate(slide_questions(truth, balancer)):
            templates[question.template] += 1
            families[question.metadata] += 1
            if question.correct >= 0:
                letters.setdefault(question.template, Counter())[LETTERS[question.correct]] += 1
            target = evidence_target(question, truth)
            qid = f"{sid}-{k}"
            if split == "train":
                record: dict[str, Any] = {
                    "id": qid,
                    "image": f"slides/{sid}.svs",
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{question.question}"},
                        {"from": "gpt", "value": question.answer},
                    ],
                    "metadata": question.metadata,
                    "template": question.template,
                }
            else:
                record = {
                    "question_id": qid,
                    "question": question.question,
                    "T-answer": question.answer,
                    "metadata": question.metadata,
                    "template": question.template,
                }
            if target is not None:
                record["evidence_target"] = target
            records.append(record)
        for index in truth.nuclei.class_index.tolist():
            nuclei_per_class[CLASS_NAMES[index]] += 1
        slides.append({
            "slide_id": sid, "seed": spec.seed, "classes": list(spec.classes),
            "diagnosis": diagnosis(truth),
            "artefacts": [{"kind": a.kind, "region": a.region} for a in spec.artefacts],
            "nuclei": len(truth.nuclei),
        })
        if progress:
            progress("slides", done, len(specs))

    if split == "train":
        instructions = root / "train.json"
        write_json_atomic(instructions, records, indent=None)
    else:
        instructions = root / "test.jsonl"
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        write_bytes_atomic(instructions, body.encode("utf-8"))
    texts_path = root / "scale_texts.jsonl"
    write_bytes_atomic(texts_path, ("\n".join(text_lines) + "\n").encode("utf-8"))
    corpus_path = root / "corpus.txt"
    write_bytes_atomic(corpus_path, ("\n\n".join(corpus) + "\n").encode("utf-8"))

    region_counts = Counter(c for s in specs for c in s.classes)
    counts: dict[str, Any] = {
        "slides": len(specs),
        "regions": sum(region_counts.values()),
        "regions_per_class": {c: region_counts[c] for c in CLASS_NAMES},
        "slides_per_diagnosis": {d: sum(s["diagnosis"] == d for s in slides) for d in DIAGNOSES},
        "nuclei_per_class": {c: nuclei_per_class[c] for c in CLASS_NAMES},
        "questions": len(records),
        "questions_per_template": {t: templates[t] for t in TEMPLATES},
        "questions_per_family": dict(sorted(families.items())),
        "correct_letter_per_template": {
            t: dict(sorted(letters[t].items())) for t in TEMPLATES if t in letters
        },
    }
    manifest_path = root / "dataset.json"
    write_json_atomic(manifest_path, {
        "format_version": _FORMAT_VERSION,
        "generator": "omero_hwsi.synthetic.dataset.generate_dataset",
        "split": split,
        "seed": seed,
        "parameters": {
            "n_slides": n_slides, "rows": rows, "cols": cols, "mpp": mpp,
            "grid": grid.to_dict(), "artefact_rate": artefact_rate,
            "truth_nuclei": truth_nuclei,
        },
        "vocabulary": {
            "classes": [
                {"name": c.name, "label": c.label, "nucleus_word": c.nucleus_word,
                 "nucleus_shape": c.nucleus_shape, "detail": c.detail}
                for c in TISSUE_CLASSES.values()
            ],
            "shape_pair": list(SHAPE_PAIR),
            "diagnoses": list(DIAGNOSES),
            "templates": {t: {"metadata": f, "wordings": list(w)} for t, (f, w) in TEMPLATES.items()},
        },
        "files": {
            "slides": "slides/<slide_id>.svs",
            "truth": "truth/<slide_id>.geojson",
            "instructions": instructions.name,
            "scale_texts": texts_path.name,
            "corpus": corpus_path.name,
        },
        "counts": counts,
        "slides": slides,
    })
    logger.info("%s: %d %s slide(s), %d question(s)", root, len(specs), split, len(records))
    return DatasetManifest(
        out_dir=root, split=split, seed=seed, slide_ids=tuple(s.slide_id for s in specs),
        instructions=instructions, scale_texts=texts_path, corpus=corpus_path,
        manifest=manifest_path, counts=counts,
    )
