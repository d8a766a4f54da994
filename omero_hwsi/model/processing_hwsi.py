"""Turn a slide's features and a question into the tensors and token ids the model reads.

The processor is where the visual-token count meets the text: like ``processing_llava.py`` it
expands one marker into exactly as many placeholder ids as the model will produce visual
tokens, so the model never guesses counts, it only checks them. It owns the one prompt layout
used for training *and* inference (the reference code trained with a chat template and
prompted with the bare question; every answer it gave was off-distribution). It never reads
slides or weights: its inputs are a loaded feature store and a tokenizer.

Two prompt layouts, a stored setting (``processor_config.json``):

- ``hwsi``: ``<hwsi_start>`` + visual placeholders + ``<hwsi_end>`` inside the user turn. The
  three marker tokens are added to the tokenizer as special tokens (the model resizes its
  embeddings for them) so the LLM can tell where the slide starts and ends.
- ``released``: the released checkpoint's layout: the visual placeholders come before the whole
  chat-templated prompt, with its fixed system prompt and no added tokens (its embedding table
  has none).

Shape letters: B batch, R regions, C selected patch slots per region (``K`` in the feature
store), N nuclei per patch, D feature width, T tokens.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import numpy as np
import numpy.typing as npt
import torch

from omero_hwsi._io import write_json_atomic
from omero_hwsi.errors import ModelFileNotFoundError
from omero_hwsi.model._json import read_json_object
from omero_hwsi.model.budget import ALL_SCALES, concat_token_count
from omero_hwsi.model.compat import check_features
from omero_hwsi.model.configuration_hwsi import CellFusion, FusionMode, PromptLayout

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from omero_hwsi.features.store import SlideFeatures
    from omero_hwsi.model.configuration_hwsi import HwsiConfig

__all__ = [
    "HWSI_SYSTEM_PROMPT",
    "IGNORE_INDEX",
    "PROCESSOR_CONFIG",
    "RELEASED_SYSTEM_PROMPT",
    "VISUAL_PLACEHOLDER_ID",
    "CellFusion",
    "FusionMode",
    "HwsiProcessor",
    "PromptLayout",
    "collate_visual",
    "visual_inputs",
]

logger = logging.getLogger(__name__)

VISUAL_PLACEHOLDER_ID: int = -200
"""Marks visual-token positions in ``input_ids``; the model swaps in the visual embeddings.

Negative so it can never collide with a vocabulary id, and an embedding lookup on it fails
loudly instead of silently reading a real token's vector.
"""

IGNORE_INDEX: int = -100
"""Label value ignored by the LM loss (``torch.nn.CrossEntropyLoss``'s default)."""

RELEASED_SYSTEM_PROMPT = "You are an expert histopathology assistant."
"""The released checkpoint's system prompt; its weights were tuned under exactly this text."""

HWSI_SYSTEM_PROMPT = "You are a pathology assistant. Answer from the slide shown."
"""Default system prompt of the ``hwsi`` layout."""

PROCESSOR_CONFIG = "processor_config.json"


# Leading hierarchy axes (R, C, N) of each visual input, for padding in collate_visual.
_AXES: dict[str, int] = {
    "wsi": 0,
    "region": 1, "region_mask": 1, "region_pos": 1, "region_index": 1,
    "patch": 2, "patch_mask": 2, "patch_index": 2,
    "cell": 3, "cell_mask": 3, "cell_pos": 3, "cell_k": 3,
}
_CELL_KEYS = ("cell", "cell_mask", "cell_pos", "cell_k")


def _slide_size(features: SlideFeatures) -> tuple[float, float]:
    """Level-0 ``(width, height)`` of the slide, from provenance or the region boxes.

    Stores written by ``extract_slide`` record the size; the fallback (right/bottom edge of the
    furthest region) keeps hand-built stores usable.
    """
    slide = features.provenance.get("slide", {})
    if "width" in slide and "height" in slide:
        return float(slide["width"]), float(slide["height"])
    boxes = features.region_boxes
    if boxes.size == 0:
        return 1.0, 1.0
    return float((boxes[:, 0] + boxes[:, 2]).max()), float((boxes[:, 1] + boxes[:, 3]).max())


def visual_inputs(
    features: SlideFeatures, *, max_cells: int = 64, expected: dict[str, Any] | None = None
) -> dict[str, npt.NDArray[Any]]:
    """One slide's visual model inputs, with per-nucleus cells (for CCAF fusion).

    Only the *selected* patches enter the model, in selection rank order (slot ``c`` of a
    region is its rank-``c`` patch), because the ``concat`` token budget keeps patches by rank.
    Each selected patch brings the descriptors of its own nuclei. Nuclei are taken by ``k``
    (centroid (y, x) order) and capped at ``max_cells`` per patch: a dense patch beyond the
    cap loses its bottom-most nuclei. The cap bounds memory for CCAF, whose cost grows with N;
    raise it when every nucleus must be seen (cells dropped are logged at DEBUG).

    Args:
        features: a complete feature store, from :func:`~omero_hwsi.features.store.load_features`.
        max_cells: most nuclei kept per patch (>= 1).
        expected: the model's ``config.expected_features``; a store made with other encoders
            or grid is refused (see :func:`omero_hwsi.model.compat.check_features`).

    Returns:
        numpy arrays, no batch axis (see :func:`collate_visual`):

        - ``region`` ``(R, D_region)`` float32, ``region_mask`` ``(R,)`` bool (all True),
          ``region_pos`` ``(R, 2)`` float32: region box centre as ``(x, y)`` over the slide's
          level-0 width and height, clipped to [0, 1] (edge regions may pass the border);
        - ``patch`` ``(R, C, D_patch)`` float32, ``patch_mask`` ``(R, C)`` bool; an empty
          selection slot is zeros with mask False;
        - ``cell`` ``(R, C, N, D_cell)`` float32, ``cell_mask`` ``(R, C, N)`` bool,
          ``cell_pos`` ``(R, C, N, 2)`` float32: centroid ``(x, y)`` relative to its patch box,
          in [0, 1]; ``N = min(max_cells, most nuclei in any selected patch)``, at least 1;
        - no slide vector: the model aggregates it from the regions (``wsi_aggregator``), so
          masking a region for evidence changes it, and an attention pool is trained;
        - ids for evidence, -1 where empty: ``region_index`` ``(R,)`` int64 (grid index ``i``),
          ``patch_index`` ``(R, C)`` int64 (patch slot ``j``), ``cell_k`` ``(R, C, N)`` int64
          (nucleus ``k`` within its patch), so slot ``[r, c, n]`` is ``r<i>.p<j>.c<k>``.

    Raises:
        ValueError: ``max_cells`` is below 1.
        FeatureStoreError: the store does not match ``expected``.
    """
    if max_cells < 1:
        raise ValueError(f"max_cells must be at least 1, got {max_cells}")
    check_features(expected, features.provenance, store=str(features.path))
    n_regions = int(features.region_index.shape[0])
    selected = np.asarray(features.selected, dtype=np.int64).reshape(n_regions, -1)
    slots = selected.shape[1]
    patch_mask = selected >= 0

    width, height = _slide_size(features)
    boxes = features.region_boxes.reshape(n_regions, 4)
    centre = boxes[:, :2] + boxes[:, 2:] / 2
    region_pos = np.clip(centre / np.array([width, height]), 0.0, 1.0).astype(np.float32)

    d_patch = features.patch_features.shape[-1]
    patch = np.zeros((n_regions, slots, d_patch), dtype=np.float32)
    rows, cols = np.nonzero(patch_mask)
    patch[rows, cols] = features.patch_features[rows, selected[rows, cols]]

    # Nuclei of each (region position, patch slot), in k order.
    table = features.nuclei
    order = np.lexsort((table.k, table.patch, table.region))
    members: dict[tuple[int, int], npt.NDArray[np.int64]] = {}
    if order.size:
        keys = np.stack([table.region[order], table.patch[order]], axis=1).astype(np.int64)
        starts = np.r_[0, np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1]
        for start, stop in zip(starts, np.r_[starts[1:], order.size], strict=True):
            members[(int(keys[start, 0]), int(keys[start, 1]))] = order[start:stop]
    chosen = {
        (r, c): members.get((r, int(selected[r, c])), np.zeros(0, dtype=np.int64))
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
    }
    most = max((len(v) for v in chosen.values()), default=0)
    n_cells = max(1, min(max_cells, most))
    d_cell = table.descriptor.shape[1] if table.descriptor.ndim == 2 else 0
    cell = np.zeros((n_regions, slots, n_cells, d_cell), dtype=np.float32)
    cell_mask = np.zeros((n_regions, slots, n_cells), dtype=bool)
    cell_pos = np.zeros((n_regions, slots, n_cells, 2), dtype=np.float32)
    cell_k = np.full((n_regions, slots, n_cells), -1, dtype=np.int64)
    dropped = 0
    for (r, c), idx in chosen.items():
        dropped += max(0, len(idx) - n_cells)
        idx = idx[:n_cells]
        n = len(idx)
        if n == 0:
            continue
        x, y, w, h = features.patch_boxes[r, selected[r, c]]
        rel = (table.centroid[idx] - (x, y)) / (w, h)
        cell[r, c, :n] = table.descriptor[idx]
        cell_mask[r, c, :n] = True
        cell_pos[r, c, :n] = np.clip(rel, 0.0, 1.0)
        cell_k[r, c, :n] = table.k[idx]
    if dropped:
        logger.debug("%s: %d nuclei beyond max_cells=%d left out", features.path, dropped, max_cells)

    return {
        "region": np.asarray(features.region_features, dtype=np.float32).reshape(n_regions, -1),
        "region_mask": np.ones(n_regions, dtype=bool),
        "region_pos": region_pos,
        "patch": patch,
        "patch_mask": patch_mask,
        "cell": cell,
        "cell_mask": cell_mask,
        "cell_pos": cell_pos,
        "region_index": np.asarray(features.region_index, dtype=np.int64),
        "patch_index": np.where(patch_mask, selected, -1).astype(np.int64),
        "cell_k": cell_k,
    }


def collate_visual(items: Sequence[Mapping[str, npt.NDArray[Any]]]) -> dict[str, torch.Tensor]:
    """Pad slides to a common size and stack them into batch tensors.

    Slides differ in region count R, and with per-nucleus cells in N (and C when stores were
    made with different ``k``); padding to the batch maximum keeps one tensor per input, and the
    masks tell the model which entries are real. Padding is False in masks, -1 in ids and 0 in
    features. Works for per-nucleus cells (``cell`` ``(R, C, N, D_cell)``, ``cell_mask``
    ``(R, C, N)``, ``cell_pos``) and for precomputed cells (``cell`` ``(R, C, D_cell)``,
    ``cell_mask`` ``(R, C)``, no ``cell_pos``: one token per patch made outside the model).

    Args:
        items: per-slide dicts as made by :func:`visual_inputs`, all with the same keys.

    Returns:
        The same keys with a leading B axis, e.g. ``patch`` ``(B, R, C, D_patch)``; floats as
        float32, masks as bool, ids as int64.

    Raises:
        ValueError: no items, differing keys, an unknown key, or per-nucleus and precomputed
            cells mixed in one batch.
    """
    if not items:
        raise ValueError("collate_visual needs at least one slide")
    keys = list(items[0])
    for item in items[1:]:
        if set(item) != set(keys):
            raise ValueError(f"slides have different inputs: {sorted(keys)} vs {sorted(item)}")
    unknown = [k for k in keys if k not in _AXES]
    if unknown:
        raise ValueError(f"unknown visual input(s) {unknown}; known: {sorted(_AXES)}")
    if "cell_mask" in keys:
        cell_axes = {np.asarray(item["cell_mask"]).ndim for item in items}
        if len(cell_axes) != 1:
            raise ValueError("a batch mixes per-nucleus and precomputed cells; use one cell fusion")
        cell_depth = cell_axes.pop()
    else:
        cell_depth = 3
    batch = len(items)
    # Batch maximum of R, C and N, read from the inputs that carry each axis.
    sizes = [0, 0, 0]
    for item in items:
        for key in keys:
            depth = cell_depth if key in _CELL_KEYS else _AXES[key]
            shape = np.shape(item[key])
            for axis in range(depth):
                sizes[axis] = max(sizes[axis], shape[axis])
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        depth = cell_depth if key in _CELL_KEYS else _AXES[key]
        arrays = [np.asarray(item[key]) for item in items]
        tails = {a.shape[depth:] for a in arrays}
        if len(tails) != 1:
            raise ValueError(f"{key}: feature shapes differ between slides: {sorted(tails)}")
        kind = arrays[0].dtype.kind
        if kind == "b":
            dtype: type[np.generic] = np.bool_
            fill: float | bool = False
        elif kind in "iu":
            dtype, fill = np.int64, -1
        else:
            dtype, fill = np.float32, 0.0
        stacked = np.full((batch, *sizes[:depth], *tails.pop()), fill, dtype=dtype)
        for b, array in enumerate(arrays):
            index: tuple[int | slice, ...] = (b, *(slice(0, n) for n in array.shape[:depth]))
            stacked[index] = array
        out[key] = torch.from_numpy(stacked)
    return out


class HwsiProcessor:
    """Builds token ids, labels and masks around a slide's visual tokens.

    The same :meth:`encode_prompt` serves training and inference, so the model is always asked
    in the layout it was trained on.

    Attributes:
        tokenizer: the LLM's tokenizer (with the hwsi markers added for layout ``hwsi``).
        added_tokens: special tokens this layout adds on top of the LLM's vocabulary (the three
            markers for ``hwsi``, none for ``released``); when non-empty the model must resize
            its embeddings to ``len(tokenizer)``. Stable across save/load.
    """

    # The settings from_pretrained passes back to __init__ (processor_config.json's other keys
    # are informational).
    _CONFIG_KEYS: ClassVar[frozenset[str]] = frozenset({
        "prompt_layout", "fusion_mode", "num_queries", "token_budget", "system_prompt",
        "visual_start_token", "visual_end_token", "visual_token", "visual_scales",
    })

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        prompt_layout: PromptLayout = "hwsi",
        fusion_mode: FusionMode = "concat",
        num_queries: int = 64,
        token_budget: int = 1024,
        system_prompt: str | None = None,
        visual_start_token: str = "<hwsi_start>",
        visual_end_token: str = "<hwsi_end>",
        visual_token: str = "<hwsi_visual>",
        visual_scales: Sequence[str] | None = None,
    ) -> None:
        """Wrap ``tokenizer``; for layout ``hwsi`` add the marker tokens to it (in place).

        A tokenizer without a pad token gets ``pad = eos`` (also in place): padded positions
        are masked by ``attention_mask`` and ignored by the labels, so reusing eos is harmless.

        Args:
            tokenizer: the LLM's tokenizer; it must carry a chat template.
            prompt_layout: ``hwsi`` or ``released`` (see the module docstring).
            fusion_mode: ``concat`` (token count follows the budget rule) or ``resampler``
                (``num_queries`` tokens per slide).
            num_queries: visual tokens per slide in ``resampler`` mode.
            token_budget: most visual tokens per slide in ``concat`` mode.
            system_prompt: system turn text; default depends on the layout (the released
                weights only know :data:`RELEASED_SYSTEM_PROMPT`).
            visual_start_token: marker before the visual tokens (layout ``hwsi``).
            visual_end_token: marker after the visual tokens (layout ``hwsi``).
            visual_token: marker expanded into the placeholders (layout ``hwsi``).
            visual_scales: the scales the model reads in ``concat`` mode (None: all four);
                the model config's ``visual_scales``.

        Raises:
            ValueError: an unknown layout or fusion mode, non-positive sizes, a tokenizer with
                no chat template, or with neither pad nor eos token.
        """
        if prompt_layout not in get_args(PromptLayout):
            raise ValueError(f"prompt_layout {prompt_layout!r} is not one of {get_args(PromptLayout)}")
        if fusion_mode not in get_args(FusionMode):
            raise ValueError(f"fusion_mode {fusion_mode!r} is not one of {get_args(FusionMode)}")
        if num_queries < 1 or token_budget < 1:
            raise ValueError(f"num_queries ({num_queries}) and token_budget ({token_budget}) must be >= 1")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat template; use the instruction-tuned LLM's tokenizer or "
                "set tokenizer.chat_template to its Jinja template before building HwsiProcessor"
            )
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.prompt_layout: PromptLayout = prompt_layout
        self.fusion_mode: FusionMode = fusion_mode
        self.num_queries = num_queries
        self.token_budget = token_budget
        self.visual_scales = None if visual_scales is None else tuple(visual_scales)
        default = HWSI_SYSTEM_PROMPT if prompt_layout == "hwsi" else RELEASED_SYSTEM_PROMPT
        self.system_prompt = default if system_prompt is None else system_prompt
        self.visual_start_token = visual_start_token
        self.visual_end_token = visual_end_token
        self.visual_token = visual_token
        self.added_tokens: list[str] = []
        if prompt_layout == "hwsi":
            self.added_tokens = [visual_start_token, visual_token, visual_end_token]
            new = tokenizer.add_special_tokens(
                {"extra_special_tokens": list(self.added_tokens)},
                replace_extra_special_tokens=False,
            )
            if new:
                logger.info("added %d visual marker token(s) to the tokenizer", new)

    # -- token ids of the markers ----------------------------------------------------------

    def _token_id(self, token: str) -> int | None:
        if self.prompt_layout != "hwsi":
            return None
        value = self.tokenizer.convert_tokens_to_ids(token)
        return int(value) if isinstance(value, int) else None

    @property
    def visual_start_id(self) -> int | None:
        """Id of ``<hwsi_start>`` (None for layout ``released``), for the model config."""
        return self._token_id(self.visual_start_token)

    @property
    def visual_end_id(self) -> int | None:
        """Id of ``<hwsi_end>`` (None for layout ``released``), for the model config."""
        return self._token_id(self.visual_end_token)

    # -- counts and prompts ----------------------------------------------------------------

    def num_visual_tokens(self, visual: Mapping[str, torch.Tensor]) -> list[int]:
        """Visual tokens the model will make for each slide of a batch.

        Args:
            visual: batch tensors from :func:`collate_visual`; uses ``region_mask`` ``(B, R)``
                and, for ``concat``, ``patch_mask`` ``(B, R, C)``.

        Returns:
            One count per slide: ``num_queries`` for ``resampler``; for ``concat`` the budget
            rule of :func:`~omero_hwsi.model.budget.concat_token_count`, where every real patch
            gets a cell token (an empty patch's is the learned "no cells" token).

        Raises:
            TokenBudgetError: a slide's regions alone exceed ``token_budget`` (``concat``).
        """
        region_mask = visual["region_mask"]
        if self.fusion_mode == "resampler":
            return [self.num_queries] * int(region_mask.shape[0])
        patch_mask = visual["patch_mask"]
        return concat_token_count(region_mask, patch_mask, patch_mask, self.token_budget,
                                  self.visual_scales or ALL_SCALES)

    def _messages(self, question: str, answer: str | None) -> list[dict[str, str]]:
        if self.prompt_layout == "hwsi":
            user = f"{self.visual_start_token}{self.visual_token}{self.visual_end_token}\n{question}"
        else:
            user = question
        messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return messages

    def _tokens(self, question: str, answer: str | None) -> list[int]:
        """Chat-templated ids; with no answer the template's generation prompt ends the text."""
        text = self.tokenizer.apply_chat_template(
            self._messages(question, answer), tokenize=False, add_generation_prompt=answer is None
        )
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
        # The template writes any bos/eos itself; adding them again would double them.
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [int(i) for i in ids]

    def encode_prompt(
        self, question: str, n_visual: int, answer: str | None = None
    ) -> tuple[list[int], list[int]]:
        """Token ids and labels of one sample; the only place a prompt is built.

        Labels supervise the answer and the end-of-turn token(s) the template writes after it
        (so the model learns to stop), nothing else. They are found by rendering the prompt with
        the generation prompt on and checking it is a token prefix of the full conversation:
        then inference (which sends exactly that prefix) sees what training saw.

        Args:
            question: the user's question.
            n_visual: visual tokens the model will insert (see :meth:`num_visual_tokens`).
            answer: the assistant's answer for training; None for inference (the ids then end
                with the generation prompt).

        Returns:
            ``(input_ids, labels)``, both length T; ``input_ids`` holds exactly ``n_visual``
            :data:`VISUAL_PLACEHOLDER_ID` entries (between the start/end markers for layout
            ``hwsi``, first for ``released``); ``labels`` is :data:`IGNORE_INDEX` except on the
            answer and end-of-turn tokens (all ignored when ``answer`` is None).

        Raises:
            ValueError: ``n_visual`` is negative, the text contains a visual marker, or the chat
                template is not prefix-stable.
        """
        if n_visual < 0:
            raise ValueError(f"n_visual must be >= 0, got {n_visual}")
        if self.prompt_layout == "hwsi":
            for text in (question, answer or "", self.system_prompt):
                for reserved in self.added_tokens:
                    if reserved in text:
                        raise ValueError(f"the prompt text contains the reserved marker {reserved!r}; remove it")
        prompt = self._tokens(question, None)
        if answer is None:
            ids, labels = prompt, [IGNORE_INDEX] * len(prompt)
        else:
            ids = self._tokens(question, answer)
            if ids[: len(prompt)] != prompt:
                raise ValueError(
                    "the chat template is not prefix-stable: the prompt with the generation prompt "
                    "is not a token prefix of the conversation with the answer, so training and "
                    "inference would see different tokens; use a template whose assistant turn "
                    "starts exactly with its generation prompt"
                )
            labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
        if self.prompt_layout == "released":
            return (
                [VISUAL_PLACEHOLDER_ID] * n_visual + ids,
                [IGNORE_INDEX] * n_visual + labels,
            )
        visual_id = self._token_id(self.visual_token)
        spots = [i for i, t in enumerate(ids) if t == visual_id]
        if len(spots) != 1:
            raise ValueError(
                f"the chat template rendered {len(spots)} {self.visual_token!r} tokens, expected 1; "
                "check that it keeps the user message verbatim"
            )
        at = spots[0]
        return (
            ids[:at] + [VISUAL_PLACEHOLDER_ID] * n_visual + ids[at + 1 :],
            labels[:at] + [IGNORE_INDEX] * n_visual + labels[at + 1 :],
        )

    def __call__(
        self,
        questions: Sequence[str],
        visual: Mapping[str, torch.Tensor],
        answers: Sequence[str] | None = None,
        *,
        padding_side: Literal["left", "right"] = "left",
    ) -> dict[str, torch.Tensor]:
        """Encode a batch: one question (and answer) per slide of ``visual``.

        Args:
            questions: B questions.
            visual: batch tensors from :func:`collate_visual` (B slides).
            answers: B answers for training (labels are returned), or None for inference.
            padding_side: ``left`` for generation (every prompt ends at the last position),
                ``right`` is fine for training.

        Returns:
            ``input_ids`` ``(B, T)`` int64 (pad id on padding), ``attention_mask`` ``(B, T)``
            int64 (1 = real), ``labels`` ``(B, T)`` int64 when ``answers`` is given
            (:data:`IGNORE_INDEX` on padding), plus every entry of ``visual``.

        Raises:
            ValueError: the counts of questions, answers and slides differ, or an unknown
                padding side.
            TokenBudgetError: see :meth:`num_visual_tokens`.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side {padding_side!r} is not 'left' or 'right'")
        counts = self.num_visual_tokens(visual)
        if len(questions) != len(counts):
            raise ValueError(f"{len(questions)} question(s) for {len(counts)} slide(s)")
        if answers is not None and len(answers) != len(counts):
            raise ValueError(f"{len(answers)} answer(s) for {len(counts)} slide(s)")
        encoded = [
            self.encode_prompt(q, n, None if answers is None else answers[b])
            for b, (q, n) in enumerate(zip(questions, counts, strict=True))
        ]
        for b, ((ids, _), n) in enumerate(zip(encoded, counts, strict=True)):
            found = sum(1 for t in ids if t == VISUAL_PLACEHOLDER_ID)
            if found != n:  # cannot happen unless encode_prompt is broken
                raise RuntimeError(f"sample {b}: {found} visual placeholders, the model makes {n}")
        pad_id: Any = self.tokenizer.pad_token_id  # typed loosely by transformers
        if not isinstance(pad_id, int):
            raise ValueError("the tokenizer has no pad token id")
        length = max((len(ids) for ids, _ in encoded), default=0)
        batch = len(encoded)
        input_ids = torch.full((batch, length), pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((batch, length), dtype=torch.int64)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.int64)
        for b, (ids, lab) in enumerate(encoded):
            span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
            input_ids[b, span] = torch.tensor(ids, dtype=torch.int64)
            attention_mask[b, span] = 1
            labels[b, span] = torch.tensor(lab, dtype=torch.int64)
        out: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if answers is not None:
            out["labels"] = labels
        out.update(visual)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of generated ids, without special tokens, placeholders or ignored labels."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        text = self.tokenizer.decode([int(i) for i in values if int(i) >= 0], skip_special_tokens=True)
        return str(text).strip()

    # -- persistence -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The settings written to ``processor_config.json``."""
        return {
            "processor_class": type(self).__name__,
            "prompt_layout": self.prompt_layout,
            "fusion_mode": self.fusion_mode,
            "num_queries": self.num_queries,
            "token_budget": self.token_budget,
            "system_prompt": self.system_prompt,
            "visual_start_token": self.visual_start_token,
            "visual_end_token": self.visual_end_token,
            "visual_token": self.visual_token,
            "visual_scales": None if self.visual_scales is None else list(self.visual_scales),
        }

    @classmethod
    def for_config(cls, tokenizer: PreTrainedTokenizerBase, config: HwsiConfig) -> HwsiProcessor:
        """A processor whose layout, fusion mode, query count and budget are the model's.

        Building it from the config is what keeps the placeholder count equal to the number of
        visual tokens the model makes.
        """
        return cls(tokenizer, prompt_layout=config.prompt_layout,  # type: ignore[arg-type]
                   fusion_mode=config.fusion_mode,  # type: ignore[arg-type]
                   num_queries=config.num_queries, token_budget=config.token_budget,
                   visual_scales=config.visual_scales)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write the tokenizer (with its chat template and markers) and ``processor_config.json``."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(path))
        write_json_atomic(path / PROCESSOR_CONFIG, self.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> HwsiProcessor:
        """Load a processor saved by :meth:`save_pretrained`, from local files only.

        Raises:
            ModelFileNotFoundError: the folder, its ``processor_config.json`` or its tokenizer
                files are missing.
            CheckpointMismatchError: ``processor_config.json`` is not a valid processor config.
        """
        from transformers import AutoTokenizer

        path = Path(directory)
        config_path = path / PROCESSOR_CONFIG
        if not path.is_dir():
            raise ModelFileNotFoundError(f"{path}: processor folder not found; pass the folder save_pretrained wrote")
        config = read_json_object(config_path, missing="the folder holds no saved HwsiProcessor",
                                  fix="save the processor again")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ModelFileNotFoundError(f"{path}: tokenizer files missing or unreadable ({err})") from err
        known = {k: v for k, v in config.items() if k in cls._CONFIG_KEYS}
        return cls(tokenizer, **known)
