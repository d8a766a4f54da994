"""The loss terms of one micro-batch, per stage.

* stage 0: the LLM's next-token loss on corpus chunks;
* stage 1: hierarchical contrastive + cross-scale consistency (no LLM forward at all);
* stages 2-3: L_LM on the answers + contrastive + consistency.

Where each term looks (``HwsiModel`` in ``modeling_hwsi.py``):

* contrastive, per scale, in the alignment space: ``align_heads[s]`` applied to the scale's
  *input* features: the CCAF-fused cell vector of each patch (``fuse_cells``), the patch and
  region features, and the aggregated slide vector (``aggregate_wsi``); text side: the text
  tower over the texts of :mod:`omero_hwsi.training.texts`;
* consistency, on the projected tokens in the LLM space: region tokens (before the position
  encoding), patch tokens, and cell tokens where the patch has nuclei (``has_cells``).

The terms come back unweighted; the loop weights and sums them over micro-batches.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from omero_hwsi._types import Scale
from omero_hwsi.model.losses import (
    SCALES,
    LearnableTemperature,
    ScaleTexts,
    TextEncoder,
    consistency_loss,
    hierarchical_contrastive,
)
from omero_hwsi.model.processing_hwsi import IGNORE_INDEX
from omero_hwsi.training.texts import BatchTexts, assign_sentences

__all__ = ["MODEL_INPUTS", "MicroBatch", "Objective", "Terms", "to_device"]

logger = logging.getLogger(__name__)

MODEL_INPUTS = ("region", "region_mask", "patch", "patch_mask", "cell", "cell_mask", "cell_pos",
                "region_pos", "wsi")
"""The collated visual inputs ``HwsiModel`` reads (the hierarchy ids are for evidence only)."""


@dataclass(slots=True)
class MicroBatch:
    """Tensors of one micro-batch, on the training device.

    Attributes:
        slides: slides in the batch (0 for stage 0).
        text: ``input_ids``, ``attention_mask`` and ``labels`` (stages 0, 2, 3), else empty.
        visual: collated visual inputs (stages 1-3), else empty.
        texts: the per-scale contrastive texts (stages 1-3 with a contrastive term).
    """

    slides: int
    text: dict[str, Tensor] = field(default_factory=dict)
    visual: dict[str, Tensor] = field(default_factory=dict)
    texts: BatchTexts | None = None

    @property
    def lm_items(self) -> int:
        """Supervised next-token targets (labels after the shift that are not ignored)."""
        labels = self.text.get("labels")
        return 0 if labels is None else int((labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def tokens(self) -> int:
        """Real input tokens the LLM reads (visual placeholders included)."""
        mask = self.text.get("attention_mask")
        return 0 if mask is None else int(mask.sum())


@dataclass(slots=True)
class Terms:
    """Unweighted loss terms of one micro-batch; a term a stage does not compute is None."""

    lm: Tensor | None = None
    contrastive: Tensor | None = None
    consistency: Tensor | None = None
    per_scale: dict[str, Tensor] = field(default_factory=dict)


class Objective:
    """Computes the loss terms of a stage on micro-batches.

    Args:
        model: the :class:`~omero_hwsi.model.modeling_hwsi.HwsiForConditionalGeneration`.
        stage: 0-3.
        weights: ``(lm, contrastive, consistency)``; a 0 weight skips its term entirely.
        tokenizer: tokenises the contrastive texts (the LLM's tokenizer).
        text_encoder: the text tower (needed when the contrastive weight is > 0).
        temperature: a float or a :class:`LearnableTemperature`.
        consistency_form: ``l2`` or ``cosine``.
        text_max_length: tokens kept per text.
    """

    def __init__(
        self,
        model: Any,
        *,
        stage: int,
        weights: tuple[float, float, float],
        tokenizer: Any,
        text_encoder: TextEncoder | None,
        temperature: float | LearnableTemperature,
        consistency_form: str,
        text_max_length: int,
    ) -> None:
        self.model = model
        self.stage = stage
        self.weights = weights
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.temperature = temperature
        self.consistency_form = consistency_form
        self.text_max_length = text_max_length

    @property
    def visual_model(self) -> Any:
        """The headless ``HwsiModel``."""
        return self.model.model

    def __call__(self, batch: MicroBatch) -> Terms:
        """The terms of ``batch`` (with autograd when grad mode is on)."""
        terms = Terms()
        w_lm, w_ctr, w_cons = self.weights
        if self.stage == 0:
            out = self.model.language_model(**batch.text)
            terms.lm = out.loss
            return terms
        # One pass over the visual side serves every term: CCAF is the costly part.
        inputs = {k: batch.visual[k] for k in MODEL_INPUTS if k in batch.visual}
        scales = self.visual_model.encode_scales(**inputs)
        visual = self.visual_model.assemble(scales)
        if self.stage in (2, 3) and w_lm > 0:
            embeds = self.model.embed_inputs(batch.text["input_ids"], visual)
            rest = {k: v for k, v in batch.text.items() if k != "input_ids"}
            terms.lm = self.model(inputs_embeds=embeds, **rest).loss
        region_mask = scales.region_mask
        patch_mask = scales.patch_mask
        if w_cons > 0:
            terms.consistency = consistency_loss(
                visual.region_tokens, visual.patch_tokens, patch_mask, visual.cell_tokens,
                visual.has_cells, region_mask, form=self.consistency_form,  # type: ignore[arg-type]
                wsi=visual.wsi_token,
            )
        if w_ctr > 0 and batch.texts is not None:
            self._contrastive(batch, scales, visual.has_cells, terms)
        return terms

    # -- contrastive ---------------------------------------------------------------------------

    def _align(self, batch: MicroBatch, scales: Any) -> dict[str, Tensor]:
        """Per-scale alignment embeddings of the batch's input features."""
        heads = self.visual_model.align_heads
        region = scales.region_features  # padding already zeroed
        wsi = self.visual_model.aggregate_wsi(region, scales.region_mask)
        return {"cell": heads["cell"](scales.cell_features), "patch": heads["patch"](batch.visual["patch"]),
                "region": heads["region"](region), "wsi": heads["wsi"](wsi)}

    def _tokenize(self, texts: Sequence[str], device: torch.device) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(list(texts), add_special_tokens=False, truncation=True,
                             max_length=self.text_max_length, padding="longest", return_tensors="pt")
        return enc["input_ids"].to(device=device, dtype=torch.int64), enc["attention_mask"].to(device)

    def _assign(self, texts: BatchTexts, region_emb: Tensor, region_mask: Tensor,
                pairs: dict[Scale, list[tuple[int, str]]]) -> None:
        """Spread reports over regions by similarity (no gradient), adding region pairs."""
        assert self.text_encoder is not None
        sentences = [s for _, group in texts.unassigned for s in group]
        r_total = region_mask.shape[1]
        with torch.no_grad():
            ids, mask = self._tokenize(sentences, region_emb.device)
            emb = self.text_encoder(ids, mask).float()
            start = 0
            for b, group in texts.unassigned:
                real = torch.nonzero(region_mask[b])[:, 0]
                sent = emb[start : start + len(group)]
                start += len(group)
                if real.numel() == 0:
                    continue
                sim = sent @ region_emb[b, real].detach().float().T
                for s, col in enumerate(assign_sentences(sim.float().cpu().numpy())):
                    if col >= 0:
                        pairs["region"].append((b * r_total + int(real[col]), group[s]))

    def _contrastive(self, batch: MicroBatch, scales: Any, has_cells: Tensor, terms: Terms) -> None:
        if self.text_encoder is None:
            raise ValueError("the contrastive loss needs a text encoder")
        assert batch.texts is not None
        region_mask, patch_mask = scales.region_mask, scales.patch_mask
        emb = self._align(batch, scales)
        pairs: dict[Scale, list[tuple[int, str]]] = {s: list(p) for s, p in batch.texts.pairs.items()}
        if batch.texts.unassigned:
            self._assign(batch.texts, emb["region"], region_mask, pairs)
        masks = {"cell": has_cells, "patch": patch_mask, "region": region_mask,
                 "wsi": torch.ones(region_mask.shape[0], dtype=torch.bool, device=region_mask.device)}
        order = [s for s in SCALES if pairs.get(s)]
        if not order:
            return
        visual: dict[str, Tensor] = {}
        text: dict[str, Tensor] = {}
        keep: dict[str, Tensor] = {}
        for scale in order:
            texts = [t for _, t in pairs[scale]]
            # Template texts repeat a lot (a word per patch, a phrase per patch): embed each
            # distinct text once, padded with its own scale (short words are not padded to the
            # length of a report).
            distinct = list(dict.fromkeys(texts))
            ids, mask = self._tokenize(distinct, region_mask.device)
            row = {t: i for i, t in enumerate(distinct)}
            index = torch.tensor([row[t] for t in texts], dtype=torch.int64, device=ids.device)
            owner = torch.tensor([o for o, _ in pairs[scale]], dtype=torch.int64, device=ids.device)
            scale_texts = ScaleTexts(ids[index], mask[index], owner)
            rows, usable = scale_texts.pair(emb[scale], masks[scale])
            usable = _first_of_each(texts, usable)
            visual[scale], keep[scale] = rows, usable
            text[scale] = self.text_encoder(ids, mask)[index]
        if not any(int(k.sum()) >= 2 for k in keep.values()):
            logger.debug("micro-batch without 2 distinct pairs at any scale: no contrastive term")
            return
        tau = self.temperature() if isinstance(self.temperature, nn.Module) else self.temperature
        terms.contrastive, terms.per_scale = hierarchical_contrastive(
            visual, text, temperature=tau, masks=keep)


def _first_of_each(texts: Sequence[str], usable: Tensor) -> Tensor:
    """``usable``, keeping only the first usable pair of each distinct text.

    Two elements described by the same words ("Yes.") would be each other's false negatives;
    only the first keeps its pair.
    """
    flags = usable.cpu().numpy().astype(bool)
    seen: set[str] = set()
    out = np.zeros(len(texts), dtype=bool)
    for i, t in enumerate(texts):
        if flags[i] and t not in seen:
            seen.add(t)
            out[i] = True
    return torch.from_numpy(out).to(usable.device)


def to_device(tensors: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Every tensor of a mapping on ``device``."""
    return {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
