"""Training losses of MLLM-HWSI: hierarchical contrastive, cross-scale consistency, their sum.

Total = w_lm * L_LM + w_ctr * L_ctr + w_cons * L_cons (:func:`total_loss`, weights in
:class:`LossWeights`). ``L_LM`` is the causal LM's own next-token loss; this module provides
the other two and the default text tower they need:

* :func:`info_nce` / :func:`hierarchical_contrastive`: per scale, a symmetric InfoNCE between
  the scale's visual embeddings (``HwsiModel.align_heads``) and text embeddings of the matching
  granularity (:class:`TextEncoder`), with **in-batch negatives** (the reference code's batch of
  one had none, which makes the loss a constant; here fewer than two pairs is an error).
* :func:`consistency_loss`: the scales of one slide should agree, on the visual tokens in the
  LLM space; the paper's squared-L2 form (default) and the reference code's cosine form.

Shapes: ``B`` batch (slides), ``R`` regions, ``C`` patches per region, ``M`` (visual, text)
pairs of one scale, ``L`` text tokens, ``D`` token width, ``A`` alignment width. Masks are
bool, ``True`` = real item; padded slots may hold anything (NaN included) and never change a
loss or its gradient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omero_hwsi._types import Scale
from omero_hwsi.model.layers import CcafBlock, masked_mean

__all__ = [
    "SCALES",
    "ConsistencyForm",
    "LearnableTemperature",
    "LossWeights",
    "ScaleTexts",
    "TextEncoder",
    "consistency_loss",
    "hierarchical_contrastive",
    "info_nce",
    "total_loss",
]

SCALES: tuple[Scale, ...] = get_args(Scale)
"""The scales in hierarchy order, finest first: ``cell``, ``patch``, ``region``, ``wsi``."""

ConsistencyForm = Literal["l2", "cosine"]

_NORM_EPS = 1e-6


def _check_bool_mask(mask: Tensor, shape: tuple[int, ...], what: str) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"{what} must be a bool tensor (True = real item), got {mask.dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{what} has shape {tuple(mask.shape)}, expected {shape}")


def _zero_where_padded(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with padded slots set to 0 (``where``, so NaN padding cannot leak, not even as grad)."""
    return torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))


# -- contrastive ---------------------------------------------------------------------------------


def info_nce(
    visual: Tensor,
    text: Tensor,
    *,
    temperature: float | Tensor = 0.07,
    mask: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE between paired visual and text embeddings, with in-batch negatives.

    Row ``i`` of ``visual`` and row ``i`` of ``text`` are a positive pair; every other row of
    the batch is a negative. With ``v``, ``t`` the kept rows (``mask``), L2-normalised, and
    ``tau`` the temperature::

        S_ij = (v_i . t_j) / tau                              (cosine similarity / tau)
        L_v2t = -(1/M) sum_i log( exp(S_ii) / sum_j exp(S_ij) )
        L_t2v = -(1/M) sum_j log( exp(S_jj) / sum_i exp(S_ij) )
        L = (L_v2t + L_t2v) / 2

    i.e. ``(CE(S, arange(M)) + CE(S.T, arange(M))) / 2``. The inputs are normalised again here
    (a no-op for the unit vectors of ``AlignmentHead`` and :class:`TextEncoder`), so the loss
    depends on cosine similarities only; a zero vector stays zero instead of becoming NaN. The
    similarities and the loss are computed in float32 whatever the input dtype.

    A duplicated visual row (two texts of one element) or text row (the same sentence for two
    slides) is a false negative: pair each element with one text (see :meth:`ScaleTexts.pair`).

    Args:
        visual: Visual embeddings, ``(M, A)``.
        text: Text embeddings, ``(M, A)``; row ``i`` describes ``visual[i]``.
        temperature: ``tau > 0``, a float or a 0-dim tensor (e.g. from
            :class:`LearnableTemperature`, whose gradient then flows).
        mask: ``bool`` ``(M,)``, ``True`` = keep the pair; dropped rows are neither positives
            nor negatives and may hold anything.

    Returns:
        The loss, a float32 scalar.

    Raises:
        ValueError: On shape mismatches, a non-positive float temperature, or fewer than 2 kept
            pairs (a single pair has no negative, so its loss is identically 0).
        TypeError: If ``mask`` is not bool.
    """
    if visual.ndim != 2 or visual.shape != text.shape:
        raise ValueError(
            f"visual {tuple(visual.shape)} and text {tuple(text.shape)} must both be (M, A)"
        )
    if isinstance(temperature, Tensor):
        if temperature.ndim != 0:
            raise ValueError(f"temperature must be a scalar, got shape {tuple(temperature.shape)}")
    elif not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if mask is not None:
        _check_bool_mask(mask, (visual.shape[0],), "pair mask")
        visual, text = visual[mask], text[mask]
    m = visual.shape[0]
    if m < 2:
        raise ValueError(
            f"info_nce needs at least 2 pairs (in-batch negatives), got {m}: a single pair has no "
            "negative and its loss is constant; batch at least 2 slides or elements"
        )
    v = F.normalize(visual.float(), dim=-1, eps=_NORM_EPS)
    t = F.normalize(text.float(), dim=-1, eps=_NORM_EPS)
    tau = temperature.float() if isinstance(temperature, Tensor) else temperature
    logits = (v @ t.T) / tau  # (M, M): rows visual, columns text
    target = torch.arange(m, device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def hierarchical_contrastive(
    visual: Mapping[str, Tensor],
    text: Mapping[str, Tensor],
    *,
    temperature: float | Tensor = 0.07,
    masks: Mapping[str, Tensor] | None = None,
    weights: Mapping[str, float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Hierarchical contrastive loss: one :func:`info_nce` per scale, weighted mean over scales.

    For every scale ``s`` in :data:`SCALES` present in both ``visual`` and ``text`` (the paper
    pairs cell <-> word, patch <-> phrase, region <-> sentence, WSI <-> report) and with at least
    2 kept pairs::

        L_s = info_nce(visual[s], text[s], masks[s])
        L_ctr = sum_s w_s * L_s / sum_s w_s        (over the scales actually computed)

    A scale with fewer than 2 kept pairs is skipped, not an error (a batch may hold a single
    slide, so the WSI scale has one pair while the patches have many); it is then absent from
    the returned dict.

    Args:
        visual: Scale name -> visual embeddings ``(M_s, A)``.
        text: Scale name -> text embeddings ``(M_s, A)``, row-aligned with ``visual[s]``.
        temperature: Shared ``tau`` (float or 0-dim tensor), see :func:`info_nce`.
        masks: Scale name -> ``bool`` ``(M_s,)`` pairs to keep; a missing scale keeps all.
        weights: Scale name -> ``w_s >= 0``; a missing scale weighs 1.

    Returns:
        ``(loss, per_scale)``: the weighted mean (float32 scalar) and the detached loss of each
        scale computed, for logging.

    Raises:
        ValueError: On an unknown scale name, a negative or non-finite weight, or when no scale
            has 2 pairs (or every computed scale weighs 0); see also :func:`info_nce`.
        TypeError: If a mask is not bool.
    """
    for what, mapping in (("visual", visual), ("text", text), ("masks", masks or {}),
                          ("weights", weights or {})):
        unknown = sorted(set(mapping) - set(SCALES))
        if unknown:
            raise ValueError(
                f"{what} has unknown scales {unknown}; scales are {', '.join(SCALES)}"
            )
    weights = weights or {}
    for scale, w in weights.items():
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"weight of scale {scale!r} must be finite and >= 0, got {w}")
    masks = masks or {}
    terms: list[tuple[float, Tensor]] = []
    per_scale: dict[str, Tensor] = {}
    for scale in SCALES:
        if scale not in visual or scale not in text:
            continue
        mask = masks.get(scale)
        pairs = visual[scale].shape[0]
        if mask is not None:
            _check_bool_mask(mask, (pairs,), f"{scale} pair mask")
            pairs = int(mask.sum())
        if pairs < 2:
            continue
        loss = info_nce(visual[scale], text[scale], temperature=temperature, mask=mask)
        terms.append((float(weights.get(scale, 1.0)), loss))
        per_scale[scale] = loss.detach()
    if not terms:
        raise ValueError(
            "hierarchical_contrastive needs at least 2 pairs (in-batch negatives) at one scale or "
            "more; got none (scales given: "
            f"{', '.join(s for s in SCALES if s in visual and s in text) or 'none in both'})"
        )
    total_weight = sum(w for w, _ in terms)
    if total_weight <= 0:
        raise ValueError(f"the scales computed ({', '.join(per_scale)}) all have weight 0")
    loss = torch.stack([w * term for w, term in terms]).sum() / total_weight
    return loss, per_scale


@dataclass(frozen=True, slots=True)
class ScaleTexts:
    """The texts of one scale in a batch, each tied to the visual element it describes.

    ``owner[m]`` is the row of the scale's visual embeddings flattened in row-major order over
    their leading axes: for cell and patch embeddings ``(B, R, C, A)`` it is
    ``(b * R + r) * C + c``, for regions ``(B, R, A)`` ``b * R + r``, for the slide ``(B, A)``
    ``b``. So the data loader can emit texts for any subset of elements (a phrase per selected
    patch, a sentence per region, the report per slide) and :meth:`pair` lines them up.

    Attributes:
        token_ids: ``(M, L)`` int64, the LLM tokenizer's ids.
        attention_mask: ``(M, L)`` bool or 0/1 integers, real tokens.
        owner: ``(M,)`` int64, flat index of the described visual element.
    """

    token_ids: Tensor
    attention_mask: Tensor
    owner: Tensor

    def __post_init__(self) -> None:
        if self.token_ids.ndim != 2 or self.token_ids.dtype != torch.int64:
            raise ValueError(
                f"token_ids must be (M, L) int64, got {tuple(self.token_ids.shape)} "
                f"{self.token_ids.dtype}"
            )
        if self.attention_mask.shape != self.token_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(self.attention_mask.shape)} does not match token_ids "
                f"{tuple(self.token_ids.shape)}"
            )
        if self.owner.dtype != torch.int64 or tuple(self.owner.shape) != (self.token_ids.shape[0],):
            raise ValueError(
                f"owner must be ({self.token_ids.shape[0]},) int64, got {tuple(self.owner.shape)} "
                f"{self.owner.dtype}"
            )

    def pair(self, visual: Tensor, visual_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The visual row of each text, and which pairs are usable.

        A pair is unusable when its owner is a padded element (``visual_mask`` False) or when
        an earlier text has the same owner: a second text of one element would be an in-batch
        negative of its own image (only the first is kept).

        Args:
            visual: The scale's visual embeddings, ``(..., A)`` (e.g. ``(B, R, C, A)``).
            visual_mask: ``bool``, ``visual``'s shape less the last axis; ``None`` = all real.

        Returns:
            ``(rows, keep)``: visual rows ``(M, A)`` and a ``bool`` ``(M,)`` mask to pass as
            the pair mask of :func:`info_nce`.

        Raises:
            ValueError: If an owner is out of range or ``visual_mask`` does not match.
        """
        flat = visual.reshape(-1, visual.shape[-1])
        n, m = flat.shape[0], self.owner.shape[0]
        if m and (int(self.owner.min()) < 0 or int(self.owner.max()) >= n):
            raise ValueError(
                f"owner indices must lie in [0, {n}) for visual of shape {tuple(visual.shape)}, "
                f"got [{int(self.owner.min())}, {int(self.owner.max())}]"
            )
        owner = self.owner.to(flat.device)
        keep = torch.ones(m, dtype=torch.bool, device=flat.device)
        if visual_mask is not None:
            _check_bool_mask(visual_mask, tuple(visual.shape[:-1]), "visual mask")
            keep = visual_mask.reshape(-1).to(flat.device)[owner]
        index = torch.arange(m, device=flat.device)
        first = torch.full((n,), m, dtype=torch.int64, device=flat.device)
        first = first.scatter_reduce(0, owner, index, reduce="amin")
        keep = keep & (first[owner] == index)
        return flat[owner], keep


class TextEncoder(nn.Module):
    """The default text tower: a small trainable transformer over the LLM tokenizer's ids.

    No pretrained pathology text tower can be downloaded here, so the contrastive loss trains
    this one (stages 1-2). Pipeline::

        x_l = E[id_l] + P[p_l]         p_l = index of token l among the row's real tokens
        x = blocks(x)                  pre-norm self-attention over real tokens only
        e = normalize(W . mean_{l real} LayerNorm(x)_l)

    * Pooling is the **mean over real tokens** (no CLS): every token contributes, and a
      padded slot never does.
    * Positions ``p_l`` count real tokens (``cumsum(mask) - 1``), so left, right or interior
      padding gives the same embedding as no padding.
    * Truncation: only the first ``max_length`` real tokens of a row are read; later ones are
      ignored (treated as padding), so a long report never fails, it is cut.
    * Ids of padded slots may be anything; real ids must lie in ``[0, vocab_size)``.

    Args:
        vocab_size: Size of the tokenizer's vocabulary (``len(tokenizer)``).
        dim: Width of the transformer.
        layers: Number of transformer blocks.
        heads: Attention heads; must divide ``dim``.
        max_length: Number of learned positions, and the truncation length.
        align_dim: Width ``A`` of the output (the shared alignment space).
        pad_token_id: Id whose embedding row is kept at zero (``nn.Embedding(padding_idx)``).
        dropout: Dropout in the blocks (training only).
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        dim: int = 256,
        layers: int = 2,
        heads: int = 4,
        max_length: int = 256,
        align_dim: int = 256,
        pad_token_id: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("layers", layers),
                            ("max_length", max_length), ("align_dim", align_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_token_id)
        self.positions = nn.Parameter(torch.zeros(max_length, dim))
        self.blocks = nn.ModuleList(CcafBlock(dim, heads, dropout=dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, align_dim)
        nn.init.trunc_normal_(self.embed.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[pad_token_id].zero_()
        nn.init.trunc_normal_(self.positions, std=0.02)

    def forward(self, token_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Embed texts.

        Args:
            token_ids: ``(M, L)`` integer ids.
            attention_mask: ``(M, L)`` bool or 0/1 integers (a tokenizer's mask), real tokens.

        Returns:
            Unit vectors, ``(M, align_dim)``.

        Raises:
            ValueError: On shape mismatches, a row without any real token, or a real id outside
                the vocabulary.
        """
        if token_ids.ndim != 2 or attention_mask.shape != token_ids.shape:
            raise ValueError(
                f"token_ids {tuple(token_ids.shape)} and attention_mask "
                f"{tuple(attention_mask.shape)} must both be (M, L)"
            )
        real = attention_mask.bool()
        empty = ~real.any(dim=1)
        if bool(empty.any()):
            bad = empty.nonzero().flatten().tolist()
            raise ValueError(f"texts {bad} have no real token to embed")
        position = real.long().cumsum(dim=1) - 1
        real = real & (position < self.max_length)  # truncation: later real tokens are ignored
        last = int(real.any(dim=0).nonzero().max()) + 1
        real, position, ids = real[:, :last], position[:, :last], token_ids[:, :last]
        real_ids = ids[real]
        if int(real_ids.min()) < 0 or int(real_ids.max()) >= self.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}), got "
                f"[{int(real_ids.min())}, {int(real_ids.max())}]; is this the right tokenizer?"
            )
        ids = torch.where(real, ids, self.pad_token_id)
        position = position.clamp(min=0, max=self.max_length - 1)
        x = self.embed(ids) + self.positions[position]
        for block in self.blocks:
            x, _ = block(x, real)
        pooled = masked_mean(self.norm(x), real, dim=1)
        return F.normalize(self.proj(pooled), dim=-1, eps=_NORM_EPS)


class LearnableTemperature(nn.Module):
    """A trainable contrastive temperature, as CLIP learns it.

    Holds ``s = log(1 / tau)`` (optimising the log keeps ``tau`` positive and its steps
    relative) and returns ``tau = exp(-clamp(s, log(1 / max_tau), log(1 / min_tau)))``. The
    clamp (CLIP caps ``1 / tau`` at 100, i.e. ``min_tau = 0.01``) stops the logits from
    growing without bound once the pairs are separated; at the bound the gradient is zero.
    Pass the output as ``temperature`` to :func:`info_nce` or
    :func:`hierarchical_contrastive`. A fixed float (default 0.07, the paper's 0.02) is the
    simpler choice; this is optional.

    Args:
        initial: Starting ``tau``.
        min_temperature: Lower bound of ``tau``.
        max_temperature: Upper bound of ``tau``.
    """

    def __init__(
        self, initial: float = 0.07, *, min_temperature: float = 0.01, max_temperature: float = 1.0
    ) -> None:
        super().__init__()
        if not 0 < min_temperature <= initial <= max_temperature:
            raise ValueError(
                f"need 0 < min_temperature <= initial <= max_temperature, got {min_temperature}, "
                f"{initial}, {max_temperature}"
            )
        self.min_temperature = min_temperature
        self.max_temperature = max_temperature
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / initial)))

    def forward(self) -> Tensor:
        """The current ``tau``, a 0-dim tensor."""
        s = self.log_scale.clamp(
            math.log(1.0 / self.max_temperature), math.log(1.0 / self.min_temperature)
        )
        return torch.exp(-s)


# -- consistency ---------------------------------------------------------------------------------


def consistency_loss(
    region: Tensor,
    patch: Tensor,
    patch_mask: Tensor,
    cell: Tensor,
    cell_mask: Tensor,
    region_mask: Tensor,
    *,
    form: ConsistencyForm = "l2",
    wsi: Tensor | None = None,
) -> Tensor:
    """Cross-scale consistency: the tokens of a slide's scales should tell the same story.

    Computed on the visual tokens in the LLM space (projector outputs). ``||x||^2`` is the
    squared L2 norm, summed over ``D``; ``mean_c`` runs over real slots only.

    ``form="l2"`` (the paper, default)::

        L = mean_{r in R_cell}  ||region_r - mean_c cell_rc||^2
          + mean_{r in R_patch} ||region_r - mean_c patch_rc||^2
          + mean_{(r,c) in both} ||cell_rc - patch_rc||^2

    ``R_cell`` / ``R_patch``: real regions with at least one real cell token / patch (a region
    without cells is not pulled towards a zero mean); "both": slots where patch and cell token
    are real. When every region has both, the first two terms are the paper's mean over real
    regions of the sum of both distances. The sum over ``D`` grows with the LLM width; pick the
    weight accordingly.

    ``form="cosine"`` (the reference code): per slide, means over all its real items::

        m_cell, m_patch, m_region = slide means of the cell, patch, region tokens
        m_wsi = wsi token if given, else m_region
        L = mean over defined (slide, pair) of 1 - cos(a, b),
            pairs (m_cell, m_patch), (m_patch, m_region), (m_region, m_wsi)

    With ``wsi=None`` the last pair compares ``m_region`` with itself and contributes 0 (it
    still counts in the mean, as in the reference, whose slide token is the mean of regions
    before projection: pass the projected WSI token to reproduce that). A pair is undefined
    for a slide lacking one of its scales (no real cell, no real region).

    A term with nothing to average is left out; if nothing at all is real the loss is a zero
    that still back-propagates (zero gradients), never NaN.

    Args:
        region: Region tokens, ``(B, R, D)``.
        patch: Patch tokens, ``(B, R, C, D)``.
        patch_mask: ``bool`` ``(B, R, C)``, real patches.
        cell: Cell tokens (one per patch), ``(B, R, C, D)``.
        cell_mask: ``bool`` ``(B, R, C)``, real cell tokens.
        region_mask: ``bool`` ``(B, R)``, real regions; a padded region's patches and cells are
            ignored too.
        form: ``"l2"`` or ``"cosine"``.
        wsi: Slide tokens ``(B, D)``, used by the cosine form only (the paper's form has no
            slide term).

    Returns:
        The loss, a scalar.

    Raises:
        ValueError: On an unknown form or mismatched shapes.
        TypeError: If a mask is not bool.
    """
    if form not in get_args(ConsistencyForm):
        raise ValueError(
            f"form must be one of {', '.join(get_args(ConsistencyForm))}, got {form!r}"
        )
    if region.ndim != 3:
        raise ValueError(f"region must be (B, R, D), got shape {tuple(region.shape)}")
    b, r, d = region.shape
    if patch.ndim != 4 or patch.shape[:2] != (b, r) or patch.shape[3] != d or cell.shape != patch.shape:
        raise ValueError(
            f"patch {tuple(patch.shape)} and cell {tuple(cell.shape)} must both be (B, R, C, D) "
            f"with (B, R, D) = {(b, r, d)}"
        )
    c = patch.shape[2]
    _check_bool_mask(region_mask, (b, r), "region mask")
    _check_bool_mask(patch_mask, (b, r, c), "patch mask")
    _check_bool_mask(cell_mask, (b, r, c), "cell mask")
    patch_real = patch_mask & region_mask.unsqueeze(-1)
    cell_real = cell_mask & region_mask.unsqueeze(-1)
    region = _zero_where_padded(region, region_mask)
    patch = _zero_where_padded(patch, patch_real)
    cell = _zero_where_padded(cell, cell_real)
    # Tied to every input, so an empty batch still has a graph (and zero gradients).
    zero = (region.sum() + patch.sum() + cell.sum()) * 0.0

    if form == "l2":
        terms: list[Tensor] = []
        for items, real in ((cell, cell_real), (patch, patch_real)):
            has = real.any(dim=2)  # (B, R): real region with >= 1 real item
            if bool(has.any()):
                dist = (region - masked_mean(items, real, dim=2)).pow(2).sum(-1)  # (B, R)
                terms.append(dist[has].mean())
        both = cell_real & patch_real
        if bool(both.any()):
            terms.append((cell - patch).pow(2).sum(-1)[both].mean())
        return torch.stack(terms).sum() + zero if terms else zero

    if wsi is not None and tuple(wsi.shape) != (b, d):
        raise ValueError(f"wsi must be (B, D) = {(b, d)}, got shape {tuple(wsi.shape)}")
    flat_cell, flat_patch = cell.reshape(b, r * c, d), patch.reshape(b, r * c, d)
    means = [
        (masked_mean(flat_cell, cell_real.reshape(b, r * c), dim=1), cell_real.flatten(1).any(1)),
        (masked_mean(flat_patch, patch_real.reshape(b, r * c), dim=1), patch_real.flatten(1).any(1)),
        (masked_mean(region, region_mask, dim=1), region_mask.any(1)),
    ]
    has_region = region_mask.any(1)
    if wsi is None:
        means.append(means[2])
    else:
        means.append((_zero_where_padded(wsi, has_region), has_region))
    cosine_terms: list[Tensor] = []
    for (a, has_a), (z, has_z) in zip(means[:-1], means[1:]):
        defined = has_a & has_z
        if bool(defined.any()):
            cosine_terms.append(1.0 - F.cosine_similarity(a[defined], z[defined], dim=-1, eps=_NORM_EPS))
    if not cosine_terms:
        return zero
    return torch.cat(cosine_terms).mean() + zero


# -- total ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LossWeights:
    """Weights of the three terms of the total loss (defaults: the reference's stage 2).

    Attributes:
        lm: Weight of the language-modelling loss ``L_LM``.
        contrastive: Weight of the hierarchical contrastive loss ``L_ctr``.
        consistency: Weight of the cross-scale consistency loss ``L_cons``.
    """

    lm: float = 0.7
    contrastive: float = 2.0
    consistency: float = 0.25

    def __post_init__(self) -> None:
        for name in ("lm", "contrastive", "consistency"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"loss weight {name} must be finite and >= 0, got {value}")

    @classmethod
    def stage2(cls) -> LossWeights:
        """Stage 2 (projection) of the reference: 0.7 / 2.0 / 0.25."""
        return cls(lm=0.7, contrastive=2.0, consistency=0.25)

    @classmethod
    def stage3(cls) -> LossWeights:
        """Stage 3 (instruction tuning) of the reference: 0.7 / 0.2 / 0.07."""
        return cls(lm=0.7, contrastive=0.2, consistency=0.07)


def total_loss(
    lm: Tensor | None,
    contrastive: Tensor | None,
    consistency: Tensor | None,
    weights: LossWeights,
) -> Tensor:
    """Weighted sum of the loss terms that are present.

    ``L = w_lm * L_LM + w_ctr * L_ctr + w_cons * L_cons`` over the terms that are not ``None``
    (stage 1, for instance, has no ``L_LM``); an absent term is left out, not counted as 0.

    Args:
        lm: Language-modelling loss, a scalar, or ``None``.
        contrastive: Hierarchical contrastive loss, a scalar, or ``None``.
        consistency: Consistency loss, a scalar, or ``None``.
        weights: The three weights.

    Returns:
        The total, a scalar.

    Raises:
        ValueError: If every term is ``None`` or a term is not a scalar.
    """
    terms: list[Tensor] = []
    for name, value, weight in (("lm", lm, weights.lm),
                                ("contrastive", contrastive, weights.contrastive),
                                ("consistency", consistency, weights.consistency)):
        if value is None:
            continue
        if value.ndim != 0:
            raise ValueError(f"the {name} loss must be a scalar, got shape {tuple(value.shape)}")
        terms.append(weight * value)
    if not terms:
        raise ValueError("total_loss needs at least one loss term; all were None")
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total
