"""What goes into each micro-batch: slide-distinct batches, cached features, corpus chunks.

No DataLoader: features are precomputed and small, so a micro-batch is a list of indices
planned up front per epoch from ``(seed, epoch)`` alone. The plan of any epoch can thus be
rebuilt on resume without saving it, and a resumed run sees exactly the batches an
uninterrupted run would have seen.

A micro-batch holds each slide at most once: two questions about one slide in a batch would
be each other's negatives in the contrastive loss although they show the same slide.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections import OrderedDict, deque
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy.typing as npt

from omero_hwsi.errors import FeatureStoreError
from omero_hwsi.training.data import DatasetError, validation_count

__all__ = [
    "FeatureCache",
    "check_slide_count",
    "chunk_tokens",
    "plan_batches",
    "read_corpus",
    "split_documents",
]

logger = logging.getLogger(__name__)

_SCAN_PER_SLOT = 64
"""How far ahead (items per batch slot) a batch looks for a slide it does not hold yet."""


def plan_batches(
    groups: Sequence[Hashable],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    distinct: bool = True,
    min_groups: int = 1,
) -> list[list[int]]:
    """Micro-batches of item indices for one epoch.

    Items are shuffled with a generator seeded by ``(seed, epoch)`` (independent of the global
    random state), then taken in order; with ``distinct`` an item whose group (slide) is
    already in the batch waits for a later batch, keeping its place in line. The search for a
    fitting item stops after ``64 * batch_size`` items so a long tail of one slide cannot make
    planning quadratic; the batch is then closed smaller.

    Args:
        groups: the group (slide id) of each item.
        batch_size: most items per batch.
        seed, epoch: the shuffle's seed.
        shuffle: False keeps the given order (validation).
        distinct: one item per group per batch.
        min_groups: batches with fewer distinct groups are dropped (2 when a contrastive loss
            needs in-batch negatives; only the tail of an epoch can be affected).

    Returns:
        Lists of item indices, in training order.
    """
    order = list(range(len(groups)))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    pending = deque(order)
    batches: list[list[int]] = []
    scan = _SCAN_PER_SLOT * batch_size
    while pending:
        batch: list[int] = []
        seen: set[Hashable] = set()
        skipped: list[int] = []
        while pending and len(batch) < batch_size and len(skipped) < scan:
            item = pending.popleft()
            if distinct and groups[item] in seen:
                skipped.append(item)
                continue
            batch.append(item)
            seen.add(groups[item])
        pending.extendleft(reversed(skipped))
        batches.append(batch)
    kept = [b for b in batches if len({groups[i] for i in b}) >= min_groups]
    dropped = sum(len(b) for b in batches) - sum(len(b) for b in kept)
    if dropped:
        logger.info("epoch %d: %d item(s) left out: their batch had fewer than %d slides",
                    epoch, dropped, min_groups)
    return kept


def read_corpus(path: str | os.PathLike[str]) -> list[str]:
    """Documents of a stage-0 text corpus.

    A file with a blank line holds blank-line separated documents (lines inside one are
    joined with newlines); otherwise every non-empty line is a document.

    Raises:
        DatasetError: the file is unreadable or holds no text.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{file}: cannot read the corpus ({err})") from err
    blocks = [b.strip() for b in re.split(r"\n[ \t]*\n", text.strip()) if b.strip()]
    if len(blocks) > 1:
        documents = ["\n".join(line.rstrip() for line in b.splitlines()) for b in blocks]
    else:
        documents = [line.strip() for line in text.splitlines() if line.strip()]
    if not documents:
        raise DatasetError(f"{file}: the corpus holds no text")
    return documents


def split_documents(
    documents: Sequence[str], *, validation_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Hold out whole documents for validation (a chunk never straddles the split)."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    held = set(order[: validation_count(len(order), validation_fraction)])
    train = [d for i, d in enumerate(documents) if i not in held]
    val = [d for i, d in enumerate(documents) if i in held]
    return train, val


def chunk_tokens(documents: Sequence[Sequence[int]], *, eos_id: int, max_length: int) -> list[list[int]]:
    """Concatenate tokenised documents, each ended by ``eos_id``, and cut ``max_length`` chunks.

    Packing wastes no compute on padding; the end-of-text token tells the model where one
    document stops. The last chunk may be shorter; one of a single token (nothing to predict)
    is dropped.
    """
    stream: list[int] = []
    for doc in documents:
        stream.extend(int(t) for t in doc)
        stream.append(eos_id)
    chunks = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    return [c for c in chunks if len(c) >= 2]


class FeatureCache:
    """Model inputs of each slide, made from its store once and kept in memory.

    Training reads every slide many times; loading a zarr store and building its inputs costs
    far more than a step of a small model, so each slide's :func:`visual_inputs` are kept
    (all of them, or the ``capacity`` most recently used).

    Args:
        stores: slide id -> store folder.
        max_cells: most nuclei per patch.
        expected: the model's ``expected_features`` (a store made otherwise is refused).
        dims: the model's ``(region_dim, patch_dim, cell_dim)``.
        capacity: slides kept; 0 = all.
    """

    def __init__(
        self,
        stores: Mapping[str, Path],
        *,
        max_cells: int,
        expected: dict[str, Any] | None,
        dims: tuple[int, int, int],
        capacity: int = 0,
    ) -> None:
        self.stores = dict(stores)
        self.max_cells = max_cells
        self.expected = expected
        self.dims = dims
        self.capacity = capacity
        self._items: OrderedDict[str, dict[str, npt.NDArray[Any]]] = OrderedDict()

    def get(self, slide_id: str) -> dict[str, npt.NDArray[Any]]:
        """The slide's visual inputs (no batch axis).

        Raises:
            FeatureStoreError: the store is incomplete, made with other encoders or grid than
                the model expects, or its feature widths differ from the model's.
        """
        if slide_id in self._items:
            self._items.move_to_end(slide_id)
            return self._items[slide_id]
        from omero_hwsi.features.store import load_features
        from omero_hwsi.model.processing_hwsi import visual_inputs

        path = self.stores[slide_id]
        features = load_features(path)
        inputs = visual_inputs(features, max_cells=self.max_cells, expected=self.expected)
        for name, key, want in (("region_dim", "region", self.dims[0]),
                                ("patch_dim", "patch", self.dims[1]),
                                ("cell_dim", "cell", self.dims[2])):
            got = int(inputs[key].shape[-1])
            if got != want:
                raise FeatureStoreError(
                    f"{path}: {key} features are {got}-d but the model's {name} is {want}; "
                    "use a model config made for these encoders"
                )
        self._items[slide_id] = inputs
        if self.capacity and len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return inputs


def check_slide_count(n_slides: int, *, needed: int, what: str) -> None:
    """Refuse a training set with fewer slides than a contrastive batch needs.

    Raises:
        DatasetError: naming the count.
    """
    if n_slides < needed:
        raise DatasetError(
            f"{what} has {n_slides} slide(s); the contrastive loss needs at least {needed} "
            "different slides per batch (add slides or set contrastive_weight = 0)"
        )
