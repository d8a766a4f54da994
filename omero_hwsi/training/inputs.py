"""The training and validation sets of a run, and the micro-batches made from them.

Stage 0 reads a text corpus and packs it into chunks; stages 1-3 read a WSI-Bench file
(every turn of every conversation), find each slide's feature store by exact id, split
validation by slide and cache each slide's model inputs. Both kinds show the loop the same
face: ``groups`` (what must differ inside a micro-batch) and ``micro_batch(indices)``.

Files are read and matched (:func:`read_slide_data`, :func:`read_corpus`) before the model
is built, so a wrong feature folder fails in seconds rather than after loading an LLM.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from omero_hwsi.model.compat import feature_signature
from omero_hwsi.model.processing_hwsi import IGNORE_INDEX, HwsiProcessor, collate_visual
from omero_hwsi.training.batching import FeatureCache, chunk_tokens, split_documents
from omero_hwsi.training.config import TrainConfig
from omero_hwsi.training.data import (
    DatasetError,
    InstructionSample,
    index_stores,
    match_stores,
    read_samples,
    split_by_slide,
)
from omero_hwsi.training.objective import MicroBatch
from omero_hwsi.training.texts import SlideTexts, batch_texts, read_scale_texts, texts_by_slide

__all__ = [
    "CorpusSet",
    "SlideData",
    "SlideSet",
    "TrainingSet",
    "corpus_sets",
    "read_slide_data",
    "store_signature",
]

logger = logging.getLogger(__name__)


class TrainingSet(Protocol):
    """What the loop needs from a data set."""

    @property
    def groups(self) -> list[Hashable]:
        """Per item, what may appear only once per micro-batch (the slide)."""

    def micro_batch(self, indices: Sequence[int]) -> MicroBatch:
        """The tensors of the items ``indices`` (on the CPU)."""

    def __len__(self) -> int:
        """Number of items."""


# -- stage 0 ------------------------------------------------------------------------------------


@dataclass(slots=True)
class CorpusSet:
    """Token chunks of a corpus; every chunk is its own group (no slide to keep apart)."""

    chunks: list[list[int]]
    pad_id: int

    @property
    def groups(self) -> list[Hashable]:
        return list(range(len(self.chunks)))

    def __len__(self) -> int:
        return len(self.chunks)

    def micro_batch(self, indices: Sequence[int]) -> MicroBatch:
        rows = [self.chunks[i] for i in indices]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), length), dtype=torch.int64)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.int64)
        for b, row in enumerate(rows):
            values = torch.tensor(row, dtype=torch.int64)
            ids[b, : len(row)] = values
            mask[b, : len(row)] = 1
            labels[b, : len(row)] = values
        return MicroBatch(slides=len(rows), text={"input_ids": ids, "attention_mask": mask,
                                                  "labels": labels})


def corpus_sets(
    config: TrainConfig, tokenizer: Any, documents: Sequence[str]
) -> tuple[CorpusSet, CorpusSet | None]:
    """Training and validation chunks of the stage-0 corpus (validation by whole document).

    Args:
        documents: the corpus (:func:`~omero_hwsi.training.batching.read_corpus`).

    Raises:
        DatasetError: the corpus is too short for one chunk, or the tokenizer has no
            end-of-text token.
    """
    train_docs, val_docs = split_documents(documents, validation_fraction=config.val_fraction,
                                           seed=config.seed)
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise DatasetError(f"{config.corpus}: the tokenizer has no end-of-text token to separate documents")
    pad = tokenizer.pad_token_id if isinstance(tokenizer.pad_token_id, int) else eos

    def chunks(docs: list[str]) -> list[list[int]]:
        ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
        return chunk_tokens(ids, eos_id=eos, max_length=config.max_length)

    train = CorpusSet(chunks(train_docs), pad)
    if not train.chunks:
        raise DatasetError(f"{config.corpus}: too short for one training chunk")
    val = CorpusSet(chunks(val_docs), pad) if val_docs else None
    logger.info("corpus: %d document(s), %d training chunk(s) of <= %d tokens, %d validation chunk(s)",
                len(documents), len(train), config.max_length, len(val) if val else 0)
    return train, (val if val is not None and len(val) else None)


# -- stages 1-3 ---------------------------------------------------------------------------------


@dataclass(slots=True)
class SlideData:
    """Samples split by slide, their stores and per-scale texts (read before the model)."""

    train: list[InstructionSample]
    validation: list[InstructionSample]
    stores: dict[str, Path]
    scale_texts: dict[str, SlideTexts] = field(default_factory=dict)


def read_slide_data(config: TrainConfig) -> SlideData:
    """Read the dataset, match every slide to its store exactly and split by slide.

    Raises:
        DatasetError: a malformed dataset or scale-texts file, or slide ids without a complete
            store (all listed, see :func:`~omero_hwsi.training.data.match_stores`).
    """
    assert config.train is not None and config.feature_dir is not None
    samples = read_samples(config.train)
    if not samples:
        raise DatasetError(f"{config.train}: the dataset holds no samples")
    stores = match_stores(samples, index_stores(config.feature_dir))
    train, validation = split_by_slide(samples, validation_fraction=config.val_fraction,
                                       seed=config.seed)
    texts = read_scale_texts(config.scale_texts) if config.scale_texts is not None else {}
    logger.info("%d sample(s) on %d slide(s): %d for training, %d for validation", len(samples),
                len(stores), len(train), len(validation))
    return SlideData(train=train, validation=validation, stores=stores, scale_texts=texts)


def store_signature(store: Path) -> dict[str, Any]:
    """The encoders and grid a store was made with (a new model records them)."""
    manifest = json.loads((store / "manifest.json").read_text(encoding="utf-8"))
    return feature_signature(manifest)


@dataclass(slots=True)
class SlideSet:
    """Instruction samples over cached slide features.

    Attributes:
        samples: one question -> answer turn each.
        cache: the slides' model inputs.
        processor: builds the LM inputs (stages 2-3); None for stage 1.
        scale_texts: per-scale texts by slide id.
        contrastive: collect the contrastive texts.
    """

    samples: list[InstructionSample]
    cache: FeatureCache
    processor: HwsiProcessor | None
    scale_texts: dict[str, SlideTexts]
    contrastive: bool

    @property
    def groups(self) -> list[Hashable]:
        return [s.slide_id for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def micro_batch(self, indices: Sequence[int]) -> MicroBatch:
        samples = [self.samples[i] for i in indices]
        visual = collate_visual([self.cache.get(s.slide_id) for s in samples])
        text: dict[str, torch.Tensor] = {}
        if self.processor is not None:
            encoded = self.processor([s.question for s in samples], visual,
                                     [s.answer for s in samples], padding_side="right")
            text = {k: encoded[k] for k in ("input_ids", "attention_mask", "labels")}
        texts = None
        if self.contrastive:
            texts = batch_texts(
                [s.answer for s in samples],
                texts_by_slide([s.slide_id for s in samples], self.scale_texts),
                visual["region_index"].numpy(), visual["patch_index"].numpy(),
            )
        return MicroBatch(slides=len(samples), text=text, visual=visual, texts=texts)
