"""Instruction datasets (WSI-Bench formats) and their link to the feature stores.

Training reads precomputed feature stores, never slides, so every question must find its
slide's store by an exact slide id: a prefix or substring match ("TCGA-A1-0001" against
"TCGA-A1-00011") would silently train on the wrong slide's features. Validation is split by
slide, never by record, because records of one slide share its features and would leak the
answer across the split.

This module is pure Python (no torch): the data checks run, and fail, before any GPU work.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omero_hwsi.errors import InputError

__all__ = [
    "DatasetError",
    "InstructionSample",
    "index_stores",
    "json_objects",
    "match_stores",
    "read_samples",
    "read_wsibench_test",
    "read_wsibench_train",
    "slide_id_from_name",
    "split_by_slide",
    "validation_count",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# The image placeholder of LLaVA-style conversations; the model inserts the slide tokens
# itself, so a literal marker left in the text would be tokenised as words.
_IMAGE_MARKER = re.compile(r"<image>[ \t]*\n?")
_QUESTION_ID = re.compile(r"^(?P<slide>.+)-(?P<n>\d+)$")
_MAX_LISTED = 20


class DatasetError(InputError):
    """A dataset file is malformed or does not match the feature stores."""


@dataclass(frozen=True, slots=True)
class InstructionSample:
    """One question -> answer turn about one slide.

    Attributes:
        slide_id: the slide's file name without its last suffix; the key into the stores.
        question: the question, image marker removed, whitespace stripped.
        answer: the reference answer, whitespace stripped.
        record_id: the source record's id (train ``id`` or test ``question_id``), so errors
            and predictions can point back to the file.
        turn: index of this turn in its conversation (train), or the question's trailing
            number (test, ``TCGA-A1-0001-3`` -> 3).
        task: the task family (test ``metadata``: Morphology, Caption, Classification,
            Report); None for the train format, which does not record it.
    """

    slide_id: str
    question: str
    answer: str
    record_id: str
    turn: int
    task: str | None = None


def slide_id_from_name(name: str) -> str:
    """The slide id of a file name or path: its base name without the last suffix.

    Only the last suffix goes, so dotted ids keep their inner dots
    (``a/b/TCGA-A1-0001.DX1.svs`` -> ``TCGA-A1-0001.DX1``), and one rule serves both the
    dataset's ``image`` field and the store manifest's slide name. Backslashes count as
    separators too, since dataset files made on Windows carry such paths.
    """
    return Path(name.replace("\\", "/")).stem


def _clean_question(text: str) -> str:
    return _IMAGE_MARKER.sub("", text).strip()


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; an unreadable file is the user's input problem, not a bug."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the dataset file ({exc})") from exc


def _record_label(index: int, record: Any) -> str:
    if isinstance(record, dict) and isinstance(record.get("id"), str | int):
        return f"record {index} (id {record['id']!r})"
    return f"record {index}"


def _train_record(path: Path, index: int, record: Any) -> list[InstructionSample]:
    where = f"{path}: {_record_label(index, record)}"
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected an object, found {type(record).__name__}")
    for key in ("id", "image", "conversations"):
        if key not in record:
            raise DatasetError(f"{where}: missing key {key!r}")
    record_id = record["id"]
    if isinstance(record_id, bool) or not isinstance(record_id, str | int):
        raise DatasetError(f"{where}: 'id' must be a string or integer")
    image = record["image"]
    if not isinstance(image, str) or not image.strip():
        raise DatasetError(f"{where}: 'image' must be a non-empty string")
    slide_id = slide_id_from_name(image.strip())
    if not slide_id:
        raise DatasetError(f"{where}: 'image' {image!r} has no file name")
    conversations = record["conversations"]
    if not isinstance(conversations, list) or not conversations:
        raise DatasetError(f"{where}: 'conversations' must be a non-empty list")
    if len(conversations) % 2:
        raise DatasetError(f"{where}: the conversation ends with a human turn (no answer)")
    texts: list[str] = []
    for n, message in enumerate(conversations):
        expected = "human" if n % 2 == 0 else "gpt"
        if not isinstance(message, dict):
            raise DatasetError(f"{where}: conversation message {n} is not an object")
        speaker, value = message.get("from"), message.get("value")
        if speaker != expected:
            raise DatasetError(
                f"{where}: conversation message {n} is from {speaker!r}, expected {expected!r} "
                "(turns must alternate human, gpt)"
            )
        if not isinstance(value, str):
            raise DatasetError(f"{where}: conversation message {n} has no string 'value'")
        text = _clean_question(value) if expected == "human" else value.strip()
        if not text:
            raise DatasetError(f"{where}: conversation message {n} is empty")
        texts.append(text)
    return [
        InstructionSample(slide_id=slide_id, question=texts[2 * t], answer=texts[2 * t + 1],
                          record_id=str(record_id), turn=t)
        for t in range(len(texts) // 2)
    ]


def read_wsibench_train(path: str | os.PathLike[str]) -> list[InstructionSample]:
    """Read a WSI-Bench train file: a JSON list of LLaVA-style conversation records.

    Each record is ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}``.
    Every human -> gpt pair becomes one sample (later turns are training data too, not just
    the first question).

    Args:
        path: the JSON file.

    Returns:
        The samples in file order, turns in conversation order.

    Raises:
        DatasetError: the file is unreadable, not JSON or not a list, or a record has
            missing or ill-typed keys, a conversation that does not alternate human/gpt or
            ends with a human turn, or an empty text. The message names the file and record.
    """
    file = Path(path)
    try:
        data = json.loads(_read_text(file))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{file}: not valid JSON ({exc})") from exc
    return _train_records(file, data)


def _train_records(file: Path, data: Any) -> list[InstructionSample]:
    if not isinstance(data, list):
        raise DatasetError(
            f"{file}: expected a JSON list of records (WSI-Bench train format), "
            f"found {type(data).__name__}"
        )
    samples: list[InstructionSample] = []
    for index, record in enumerate(data):
        samples.extend(_train_record(file, index, record))
    return samples


def read_wsibench_test(path: str | os.PathLike[str]) -> list[InstructionSample]:
    """Read a WSI-Bench test file: JSON Lines of single questions.

    Each line is ``{"question_id": "TCGA-A1-0001-3", "question", "T-answer", "metadata"}``;
    the slide id is the question id without its trailing ``-<digits>`` and ``metadata`` is
    the task family. Blank lines are skipped.

    Args:
        path: the JSONL file.

    Returns:
        The samples in file order.

    Raises:
        DatasetError: the file is unreadable, or a line is not a JSON object with string
            ``question_id`` (ending in ``-<digits>``), ``question``, ``T-answer`` and
            ``metadata``, or has an empty text. The message names the file and line number.
    """
    file = Path(path)
    return _test_lines(file, _read_text(file))


def json_objects(file: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The JSON object on each non-blank line of a JSONL text, with ``"<file>: line <n>"``.

    Raises:
        DatasetError: a line is not JSON or not an object (named by file and line).
    """
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}: line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise DatasetError(f"{where}: expected a JSON object, found {type(record).__name__}")
        yield where, record


def _test_lines(file: Path, text: str) -> list[InstructionSample]:
    samples: list[InstructionSample] = []
    for where, record in json_objects(file, text):
        fields: dict[str, str] = {}
        for key in ("question_id", "question", "T-answer", "metadata"):
            value = record.get(key)
            if not isinstance(value, str):
                problem = "missing key" if key not in record else "non-string value for"
                raise DatasetError(f"{where}: {problem} {key!r}")
            fields[key] = _clean_question(value) if key == "question" else value.strip()
            if not fields[key]:
                raise DatasetError(f"{where}: {key!r} is empty")
        match = _QUESTION_ID.match(fields["question_id"])
        if match is None:
            raise DatasetError(
                f"{where}: question_id {fields['question_id']!r} does not end in '-<number>' "
                "after the slide id"
            )
        samples.append(InstructionSample(
            slide_id=match["slide"], question=fields["question"], answer=fields["T-answer"],
            record_id=fields["question_id"], turn=int(match["n"]), task=fields["metadata"],
        ))
    return samples


def read_samples(path: str | os.PathLike[str]) -> list[InstructionSample]:
    """Read either WSI-Bench format, chosen by content (file suffixes are unreliable).

    A file whose first non-blank character is ``[`` is a JSON list (train format); anything
    else is read as JSON Lines (test format).

    Raises:
        DatasetError: as :func:`read_wsibench_train` or :func:`read_wsibench_test`.
    """
    file = Path(path)
    text = _read_text(file)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{file}: not valid JSON ({exc})") from exc
        return _train_records(file, data)
    return _test_lines(file, text)


def _manifest_identity(folder: Path) -> tuple[str, str, str]:
    """``(slide id, sha256, key)`` from a complete store's manifest."""
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{manifest_path}: unreadable feature store manifest ({exc})") from exc
    if isinstance(manifest, dict) and isinstance(manifest.get("slide"), dict):
        slide: dict[str, Any] = manifest["slide"]
        name = slide.get("name")
        if isinstance(name, str) and slide_id_from_name(name):
            return slide_id_from_name(name), str(slide.get("sha256")), str(manifest.get("key"))
    raise DatasetError(f"{manifest_path}: manifest has no slide name ('slide.name')")


def index_stores(feature_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Map slide id -> store folder over the complete stores directly under ``feature_dir``.

    Incomplete stores (no manifest: extraction crashed or is running) are skipped, since
    their features are partial. Two complete stores of one slide id are accepted only when
    they are the same extraction (same slide checksum and store key); otherwise training
    could not know which to use.

    Args:
        feature_dir: the folder holding one store folder per slide and parameter set.

    Returns:
        Slide id -> store folder, sorted by slide id.

    Raises:
        DatasetError: ``feature_dir`` is not a folder, a manifest is unreadable or has no
            slide name, or a slide id has two complete stores whose sha256 or key differ
            (extracted twice with different parameters, or two different files with one
            name); the message names both folders.
    """
    root = Path(feature_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: feature folder does not exist or is not a folder")
    seen: dict[str, tuple[Path, str, str]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if not (folder / MANIFEST).is_file():
            logger.info("%s: incomplete feature store (no manifest), ignored", folder)
            continue
        slide_id, sha256, key = _manifest_identity(folder)
        if slide_id in seen:
            other, other_sha, other_key = seen[slide_id]
            if (other_sha, other_key) != (sha256, key):
                what = "slide checksums" if other_sha != sha256 else "extraction parameters"
                raise DatasetError(
                    f"slide id {slide_id!r} has two feature stores with different {what}: "
                    f"{other} and {folder}; remove one or use a feature folder that holds "
                    "one extraction per slide"
                )
            continue
        seen[slide_id] = (folder, sha256, key)
    return {slide_id: seen[slide_id][0] for slide_id in sorted(seen)}


def match_stores(
    samples: Sequence[InstructionSample], index: Mapping[str, Path]
) -> dict[str, Path]:
    """Find the store of every sample's slide, by exact slide id only.

    Args:
        samples: the dataset.
        index: slide id -> store folder, from :func:`index_stores`.

    Returns:
        Slide id -> store folder for the slide ids the samples use.

    Raises:
        DatasetError: some slide ids have no store; the message lists them (sorted, at most
            20, then "... and N more") with how many samples they hold, so a wrong feature
            folder is told apart from a few missing extractions.
    """
    counts = Counter(sample.slide_id for sample in samples)
    missing = sorted(slide_id for slide_id in counts if slide_id not in index)
    if missing:
        shown = ", ".join(missing[:_MAX_LISTED])
        if len(missing) > _MAX_LISTED:
            shown += f", ... and {len(missing) - _MAX_LISTED} more"
        n_samples = sum(counts[slide_id] for slide_id in missing)
        raise DatasetError(
            f"{len(missing)} of {len(counts)} slide ids ({n_samples} of {len(samples)} samples) "
            f"have no complete feature store: {shown}; extract their features or check the "
            "feature folder"
        )
    return {slide_id: index[slide_id] for slide_id in sorted(counts)}


def validation_count(total: int, fraction: float) -> int:
    """How many of ``total`` items (slides, documents) to hold out for ``fraction``.

    At least one when validation is asked for and there are two or more, and never all: a
    split must leave something to train on.
    """
    n_val = round(fraction * total)
    if fraction > 0 and total >= 2:
        n_val = max(n_val, 1)
    return min(n_val, max(total - 1, 0))


def split_by_slide(
    samples: Sequence[InstructionSample], *, validation_fraction: float = 0.1, seed: int = 0
) -> tuple[list[InstructionSample], list[InstructionSample]]:
    """Split into training and validation samples by slide, never by record.

    All samples of a slide land on one side: samples of one slide share its features, so a
    record-level split would validate on slides the model trained on. The slide ids are
    sorted, shuffled with ``random.Random(seed)`` and the first
    ``round(validation_fraction * n_slides)`` go to validation (at least one when the
    fraction is positive and there are two or more slides; never all slides).

    Args:
        samples: the dataset.
        validation_fraction: share of slides held out, in ``[0, 1)``.
        seed: shuffling seed; the split is a pure function of the slide ids and the seed.

    Returns:
        ``(train, validation)``, each keeping the input order of its samples.

    Raises:
        ValueError: ``validation_fraction`` is outside ``[0, 1)``.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    slide_ids = sorted({sample.slide_id for sample in samples})
    random.Random(seed).shuffle(slide_ids)
    held_out = set(slide_ids[: validation_count(len(slide_ids), validation_fraction)])
    train = [s for s in samples if s.slide_id not in held_out]
    validation = [s for s in samples if s.slide_id in held_out]
    return train, validation
