"""MLLM-HWSI modules: the hierarchical visual model and the model with its language model.

``HwsiModel`` turns per-scale features into visual tokens (no language model).
``HwsiForConditionalGeneration`` adds any Hugging Face causal LM: the processor marks
visual-token positions with :data:`~omero_hwsi.model.processing_hwsi.VISUAL_PLACEHOLDER_ID`
in ``input_ids``; the model embeds the text, checks the placeholder count against the visual
tokens it made (a mismatch is an error, never a guess), and writes the visual tokens there.

Attribute names are the state-dict contract: ``model.projectors.{cell,patch,region,wsi}``,
``model.ccaf``, ``model.fusion``, ``model.resampler``, ``model.region_position``,
``model.wsi_pool``, ``model.align_heads``, ``language_model``. Renaming one needs an entry
in the conversion table of the importer and a test.

Shapes: B slides, R regions, C patches per region (selection rank order), N nuclei per
patch, D LLM width, T tokens, Q resampler queries. Masks are bool, True = real item.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils.generic import ModelOutput

from omero_hwsi.errors import ModelFileNotFoundError
from omero_hwsi.model.budget import select_concat_tokens
from omero_hwsi.model.configuration_hwsi import HwsiConfig
from omero_hwsi.model.layers import (
    AlignmentHead,
    AttentionPool,
    CellAttentionFusion,
    FourierPositionEncoding,
    QueryResampler,
    RegionFusion,
    ScaleProjector,
    masked_mean,
)
from omero_hwsi.model.processing_hwsi import VISUAL_PLACEHOLDER_ID

__all__ = [
    "SCALE_CODES",
    "HwsiForConditionalGeneration",
    "HwsiModel",
    "HwsiOutput",
    "HwsiPreTrainedModel",
    "HwsiVisualOutput",
    "ScaleTokens",
    "VISUAL_PLACEHOLDER_ID",
]

SCALE_CODES = {"cell": 0, "patch": 1, "region": 2, "wsi": 3, "query": 4}
"""Codes in ``token_refs[..., 0]``: which scale a visual token stands for."""


@dataclass
class HwsiVisualOutput(ModelOutput):
    """Visual tokens of a batch and what each one stands for.

    Attributes:
        visual_tokens: ``(B, T, D)``, padded to the longest slide.
        visual_mask: ``(B, T)`` bool, real tokens.
        token_refs: ``(B, T, 3)`` int64: (scale code, region position r, patch slot c);
            -1 where not applicable. Resampler tokens are ``(4, -1, q)``: a query mixes
            every region, so its evidence comes from occlusion, not from the token itself.
        wsi_token, region_tokens, patch_tokens, cell_tokens: the projected per-scale tokens
            ``(B, D)``, ``(B, R, D)`` (before the region position encoding), ``(B, R, C, D)``,
            ``(B, R, C, D)``; padded slots are 0. Training losses (consistency) use them.
        cell_token_mask: ``(B, R, C)`` patches with a cell token (an empty patch has the
            learned "no cells" token); has_cells: ``(B, R, C)`` patches with >= 1 nucleus.
        cell_attention: ``(B, R, C, N)`` CCAF CLS->cell attention (when requested).
        region_attention: ``(B, Q, R)`` resampler query->region attention (when requested).
    """

    visual_tokens: Tensor | None = None
    visual_mask: Tensor | None = None
    token_refs: Tensor | None = None
    wsi_token: Tensor | None = None
    region_tokens: Tensor | None = None
    patch_tokens: Tensor | None = None
    cell_tokens: Tensor | None = None
    cell_token_mask: Tensor | None = None
    has_cells: Tensor | None = None
    cell_attention: Tensor | None = None
    region_attention: Tensor | None = None


@dataclass
class ScaleTokens:
    """Per-scale tokens of a batch, projected but not yet fused or sequenced.

    What :meth:`HwsiModel.encode_scales` computes once and :meth:`HwsiModel.assemble` turns
    into visual tokens, possibly many times with elements masked (occlusion evidence).

    Attributes:
        region_features: ``(B, R, D_region)`` input region vectors, padding zeroed (the slide
            vector is aggregated from them when ``wsi_features`` is None).
        wsi_features: ``(B, D_wsi)`` an explicit slide vector, or None.
        region_pos: ``(B, R, 2)`` region centres, or None without position encoding.
        region_mask, patch_mask, cell_token_mask, has_cells: bool masks, True = real.
        region_tokens, patch_tokens, cell_tokens: projected tokens ``(B, R, D)``,
            ``(B, R, C, D)``, ``(B, R, C, D)``; region tokens without position.
        cell_attention: ``(B, R, C, N)`` CCAF CLS->cell attention when requested.
        cell_features: ``(B, R, C, D_cell_token)`` the fused cell vector of each patch before
            projection (CCAF's output, or the precomputed vector); the cell alignment head
            reads it.
    """

    region_features: Tensor
    wsi_features: Tensor | None
    region_pos: Tensor | None
    region_mask: Tensor
    patch_mask: Tensor
    cell_token_mask: Tensor
    has_cells: Tensor
    region_tokens: Tensor
    patch_tokens: Tensor
    cell_tokens: Tensor
    cell_attention: Tensor | None = None
    cell_features: Tensor | None = None


@dataclass
class HwsiOutput(ModelOutput):
    """Output of :meth:`HwsiForConditionalGeneration.forward`."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: Any = None
    visual_tokens: Tensor | None = None
    visual_mask: Tensor | None = None
    token_refs: Tensor | None = None


class HwsiPreTrainedModel(PreTrainedModel):
    """Weight initialisation and Hugging Face plumbing shared by the MLLM-HWSI classes."""

    config: HwsiConfig
    config_class = HwsiConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["CcafBlock", "QueryResampler"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = 0.02
        if isinstance(module, QueryResampler):
            nn.init.trunc_normal_(module.queries, std=std)
        elif isinstance(module, CellAttentionFusion):
            nn.init.trunc_normal_(module.cls, std=std)
            nn.init.trunc_normal_(module.no_cells, std=std)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, pretrained_model_name_or_path: str | os.PathLike[str], *args: Any, **kwargs: Any
    ) -> Any:
        """Load from a local folder only; a missing folder is a one-line error, never a download."""
        path = os.fspath(pretrained_model_name_or_path)
        from omero_hwsi.model.convert_official import is_official_folder, load_official

        if is_official_folder(path):  # the authors' released layout: converted on load
            return load_official(path, model_class=cls)
        if not os.path.isdir(path):
            raise ModelFileNotFoundError(
                f"{path}: model folder not found (models load from local paths only; "
                "check --model or HWSI_MODEL_DIR)"
            )
        kwargs["local_files_only"] = True
        return super().from_pretrained(path, *args, **kwargs)


class HwsiModel(HwsiPreTrainedModel):
    """Features of one or more slides -> visual tokens in the LLM's embedding space."""

    def __init__(self, config: HwsiConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        inputs = {"cell": config.cell_token_dim, "patch": config.patch_dim,
                  "region": config.region_dim, "wsi": config.wsi_dim}
        self.projectors = nn.ModuleDict({
            scale: ScaleProjector(d_in, d, hidden=config.projector_hidden,
                                  dropout=config.projector_dropout,
                                  layernorm=config.projector_layernorm)
            for scale, d_in in inputs.items()
        })
        self.cell_input: nn.Module | None = None
        self.ccaf: CellAttentionFusion | None = None
        if config.cell_fusion == "ccaf":
            if config.ccaf_width != config.cell_dim:
                self.cell_input = nn.Linear(config.cell_dim, config.ccaf_width)
            self.ccaf = CellAttentionFusion(
                config.ccaf_width, layers=config.ccaf_layers, heads=config.ccaf_heads,
                position_encoding=config.ccaf_position_encoding,
            )
        self.fusion: RegionFusion | None = None
        self.resampler: QueryResampler | None = None
        if config.fusion_mode == "resampler":
            self.fusion = RegionFusion(d, dropout=config.fusion_dropout)
            self.resampler = QueryResampler(
                d, num_queries=config.num_queries, heads=config.resampler_heads,
                dropout=config.fusion_dropout,
            )
        self.region_position = (
            FourierPositionEncoding(d) if config.region_position_encoding == "fourier" else None
        )
        self.wsi_pool = AttentionPool(config.region_dim) if config.wsi_aggregator == "attention" else None
        self.align_heads: nn.ModuleDict | None = None
        if config.align_dim:
            self.align_heads = nn.ModuleDict({
                "cell": AlignmentHead(config.cell_token_dim, config.align_dim),
                "patch": AlignmentHead(config.patch_dim, config.align_dim),
                "region": AlignmentHead(config.region_dim, config.align_dim),
                "wsi": AlignmentHead(config.wsi_dim, config.align_dim),
            })
        self.post_init()

    # -- scale features ------------------------------------------------------------------------
    def fuse_cells(
        self, cell: Tensor, cell_mask: Tensor, patch_mask: Tensor, cell_pos: Tensor | None = None,
        *, need_weights: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One cell vector per patch: CCAF over nuclei, or the precomputed vectors as given.

        Args:
            cell: ``(B, R, C, N, D_cell)`` nuclei (ccaf) or ``(B, R, C, D_cell)`` (precomputed).
            cell_mask: ``(B, R, C, N)`` or ``(B, R, C)``.
            patch_mask: ``(B, R, C)``.
            cell_pos: ``(B, R, C, N, 2)`` centroids in patch coordinates [0, 1] (ccaf).

        Returns:
            cell vectors ``(B, R, C, D_cell_token)``, which patches have a cell token
            ``(B, R, C)`` and, if asked, CLS->cell attention ``(B, R, C, N)``.
        """
        if self.ccaf is None:
            if cell.dim() != 4:
                raise ValueError(f"precomputed cell fusion expects cell (B, R, C, D), got {tuple(cell.shape)}")
            present = cell_mask & patch_mask
            return _zero_padding(cell, present), present, None
        if cell.dim() != 5:
            raise ValueError(f"ccaf cell fusion expects cell (B, R, C, N, D), got {tuple(cell.shape)}")
        b, r, c, n, _ = cell.shape
        cell = _zero_padding(cell, cell_mask & patch_mask[..., None])
        x = self.cell_input(cell) if self.cell_input is not None else cell
        real = patch_mask.reshape(-1)
        out = x.new_zeros(b * r * c, x.shape[-1])
        attention = x.new_zeros(b * r * c, n) if need_weights else None
        if real.any():
            flat = x.reshape(b * r * c, n, -1)[real]
            mask = cell_mask.reshape(b * r * c, n)[real]
            pos = cell_pos.reshape(b * r * c, n, 2)[real] if cell_pos is not None else None
            tokens, weights = self.ccaf(flat, mask, pos, need_weights=need_weights)
            out = out.index_put((real.nonzero(as_tuple=True)[0],), tokens)
            if attention is not None and weights is not None:
                attention[real] = weights
        tokens_out = out.reshape(b, r, c, -1)
        weights_out = attention.reshape(b, r, c, n) if attention is not None else None
        return tokens_out, patch_mask, weights_out

    def aggregate_wsi(self, region: Tensor, region_mask: Tensor) -> Tensor:
        """The slide vector ``(B, D_region)`` from region vectors (mean or attention pooling)."""
        if self.wsi_pool is None:
            mean: Tensor = masked_mean(region, region_mask, dim=1)
            return mean
        pooled: Tensor = self.wsi_pool(region, region_mask)[0]
        return pooled

    def encode_scales(
        self,
        region: Tensor,
        region_mask: Tensor,
        patch: Tensor,
        patch_mask: Tensor,
        cell: Tensor,
        cell_mask: Tensor,
        cell_pos: Tensor | None = None,
        region_pos: Tensor | None = None,
        wsi: Tensor | None = None,
        *,
        output_attentions: bool = False,
    ) -> ScaleTokens:
        """Project every scale to the LLM width; the expensive half of :meth:`forward`.

        Evidence by occlusion calls this once and then :meth:`assemble` per masked variant,
        so only what a masked element changes is recomputed.
        """
        region_mask = region_mask.bool()
        patch_mask = patch_mask.bool() & region_mask[..., None]
        # Padding may hold anything: zero it before any arithmetic, so neither values nor
        # gradients can leak from padded slots into real ones.
        region = _zero_padding(region, region_mask)
        patch = _zero_padding(patch, patch_mask)
        cells, cell_token_mask, cell_attention = self.fuse_cells(
            cell, cell_mask.bool(), patch_mask, cell_pos, need_weights=output_attentions
        )
        cells = _zero_padding(cells, cell_token_mask)
        has_cells = patch_mask & (cell_mask.bool().any(-1) if cell.dim() == 5 else cell_token_mask)
        if self.region_position is not None and region_pos is None:
            raise ValueError("region_position_encoding is 'fourier' but no region_pos was given")
        return ScaleTokens(
            region_features=region,
            wsi_features=wsi,
            region_pos=region_pos,
            region_mask=region_mask,
            patch_mask=patch_mask,
            cell_token_mask=cell_token_mask,
            has_cells=has_cells,
            region_tokens=_zero_padding(self.projectors["region"](region), region_mask),
            patch_tokens=_zero_padding(self.projectors["patch"](patch), patch_mask),
            cell_tokens=_zero_padding(self.projectors["cell"](cells), cell_token_mask),
            cell_attention=cell_attention,
            cell_features=cells,
        )

    def assemble(
        self,
        scales: ScaleTokens,
        *,
        region_mask: Tensor | None = None,
        patch_mask: Tensor | None = None,
        cell_tokens: Tensor | None = None,
        output_attentions: bool = False,
    ) -> HwsiVisualOutput:
        """Visual tokens from projected scales, optionally with elements masked out.

        Args:
            scales: from :meth:`encode_scales`; its batch axis may be broadcast (size 1)
                against the masks given here, which is how occlusion variants are batched.
            region_mask: ``(B, R)`` regions to keep (default: the scales' own). Dropping a
                region drops its patches and cells and, unless an explicit slide vector was
                given, changes the slide vector aggregated from the regions.
            patch_mask: ``(B, R, C)`` patches to keep; dropping a patch drops its cell token.
            cell_tokens: ``(B, R, C, D)`` replacement cell tokens (a patch re-fused without
                one nucleus).
        """
        region_mask = scales.region_mask if region_mask is None else region_mask & scales.region_mask
        patch_mask = scales.patch_mask if patch_mask is None else patch_mask & scales.patch_mask
        patch_mask = patch_mask & region_mask[..., None]
        cell_token_mask = scales.cell_token_mask & patch_mask
        b = region_mask.shape[0]
        region_features = scales.region_features.expand(b, -1, -1)
        if scales.wsi_features is not None:
            wsi_vec = scales.wsi_features.expand(b, -1)
        else:
            wsi_vec = self.aggregate_wsi(region_features, region_mask)
        wsi_tok = self.projectors["wsi"](wsi_vec)
        region_tok = _zero_padding(scales.region_tokens.expand(b, -1, -1), region_mask)
        patch_tok = _zero_padding(scales.patch_tokens.expand(b, -1, -1, -1), patch_mask)
        cells = scales.cell_tokens if cell_tokens is None else cell_tokens
        cell_tok = _zero_padding(cells.expand(b, -1, -1, -1), cell_token_mask)
        placed = region_tok
        if self.region_position is not None:
            assert scales.region_pos is not None  # checked in encode_scales
            pos = self.region_position(scales.region_pos.expand(b, -1, -1))
            placed = region_tok + _zero_padding(pos, region_mask)
        fields = {"wsi_token": wsi_tok, "region_tokens": region_tok, "patch_tokens": patch_tok,
                  "cell_tokens": cell_tok, "cell_token_mask": cell_token_mask,
                  "has_cells": scales.has_cells.expand(b, -1, -1) & patch_mask,
                  "cell_attention": scales.cell_attention}
        if self.resampler is not None and self.fusion is not None:
            fused = self.fusion(wsi_tok, placed, patch_tok, patch_mask, cell_tok, cell_token_mask)
            tokens, region_attention = self.resampler(fused, region_mask, need_weights=output_attentions)
            q = tokens.shape[1]
            refs = torch.full((b, q, 3), -1, dtype=torch.long, device=tokens.device)
            refs[..., 0] = SCALE_CODES["query"]
            refs[..., 2] = torch.arange(q, device=tokens.device)
            mask = torch.ones(b, q, dtype=torch.bool, device=tokens.device)
            return HwsiVisualOutput(visual_tokens=tokens, visual_mask=mask, token_refs=refs,
                                    region_attention=region_attention, **fields)
        tokens, mask, refs = self._concat(wsi_tok, placed, region_mask, patch_tok, patch_mask,
                                          cell_tok, cell_token_mask)
        return HwsiVisualOutput(visual_tokens=tokens, visual_mask=mask, token_refs=refs, **fields)

    def forward(
        self,
        region: Tensor,
        region_mask: Tensor,
        patch: Tensor,
        patch_mask: Tensor,
        cell: Tensor,
        cell_mask: Tensor,
        cell_pos: Tensor | None = None,
        region_pos: Tensor | None = None,
        wsi: Tensor | None = None,
        *,
        output_attentions: bool = False,
        **_: Any,
    ) -> HwsiVisualOutput:
        """Visual tokens for a batch of slides (see :class:`HwsiVisualOutput`).

        ``wsi`` (``(B, D_wsi)``) is optional: by default the slide vector is aggregated from
        the real regions, so masking a region (occlusion evidence) also changes it.
        """
        scales = self.encode_scales(region, region_mask, patch, patch_mask, cell, cell_mask,
                                    cell_pos, region_pos, wsi, output_attentions=output_attentions)
        return self.assemble(scales, output_attentions=output_attentions)

    def _concat(
        self, wsi_tok: Tensor, region_tok: Tensor, region_mask: Tensor, patch_tok: Tensor,
        patch_mask: Tensor, cell_tok: Tensor, cell_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``[cells | patches | regions | WSI]`` per slide within the token budget, padded."""
        scales = self.config.scales
        keep_patch, keep_cell = select_concat_tokens(
            region_mask, patch_mask, cell_mask, self.config.token_budget, scales
        )
        keep_region = region_mask & ("region" in scales)
        b, r, c, d = patch_tok.shape
        device = patch_tok.device
        rr, cc = torch.meshgrid(torch.arange(r, device=device), torch.arange(c, device=device),
                                indexing="ij")
        sequences: list[Tensor] = []
        references: list[Tensor] = []
        for i in range(b):
            parts = [cell_tok[i][keep_cell[i]], patch_tok[i][keep_patch[i]],
                     region_tok[i][keep_region[i]], wsi_tok[i][None]]
            ref = [
                _refs(SCALE_CODES["cell"], rr[keep_cell[i]], cc[keep_cell[i]]),
                _refs(SCALE_CODES["patch"], rr[keep_patch[i]], cc[keep_patch[i]]),
                _refs(SCALE_CODES["region"], torch.nonzero(keep_region[i])[:, 0], None),
                _refs(SCALE_CODES["wsi"], torch.full((1,), -1, device=device), None),
            ]
            sequences.append(torch.cat(parts))
            references.append(torch.cat(ref))
        t = max(s.shape[0] for s in sequences)
        tokens = patch_tok.new_zeros(b, t, d)
        refs = torch.full((b, t, 3), -1, dtype=torch.long, device=device)
        mask = torch.zeros(b, t, dtype=torch.bool, device=device)
        for i, (sequence, reference) in enumerate(zip(sequences, references, strict=True)):
            tokens[i, : sequence.shape[0]] = sequence
            refs[i, : reference.shape[0]] = reference
            mask[i, : sequence.shape[0]] = True
        return tokens, mask, refs


def _zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with the slots where ``mask`` is False set to 0 (``mask`` lacks the last axis)."""
    return torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def _refs(code: int, regions: Tensor, slots: Tensor | None) -> Tensor:
    n = regions.shape[0]
    out = torch.full((n, 3), -1, dtype=torch.long, device=regions.device)
    out[:, 0] = code
    out[:, 1] = regions
    if slots is not None:
        out[:, 2] = slots
    return out


_VISUAL_KEYS = ("region", "region_mask", "patch", "patch_mask", "cell", "cell_mask", "cell_pos",
                "region_pos", "wsi")
_ID_KEYS = ("region_index", "patch_index", "cell_k")
"""Hierarchy ids the processor passes along for evidence; the network does not use them."""


class HwsiForConditionalGeneration(HwsiPreTrainedModel, GenerationMixin):
    """MLLM-HWSI: visual tokens from :class:`HwsiModel` in front of a causal LM's text tokens."""

    def __init__(self, config: HwsiConfig) -> None:
        super().__init__(config)
        self.model = HwsiModel(config)
        self.language_model = AutoModelForCausalLM.from_config(config.get_text_config(decoder=True))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        embeddings: nn.Module = self.language_model.get_input_embeddings()
        return embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        embeddings: nn.Module | None = self.language_model.get_output_embeddings()
        return embeddings

    def get_visual_tokens(
        self, wsi: Tensor | None, region: Tensor, patch: Tensor, cell: Tensor,
        region_mask: Tensor, patch_mask: Tensor, cell_mask: Tensor, **extra: Tensor | None,
    ) -> Tensor:
        """``(B, Q, D)`` visual tokens (for parity checks against other implementations)."""
        out = self.model(region=region, region_mask=region_mask, patch=patch, patch_mask=patch_mask,
                         cell=cell, cell_mask=cell_mask, wsi=wsi, **extra)
        tokens: Tensor = out.visual_tokens
        return tokens

    def embed_inputs(
        self, input_ids: Tensor, visual: HwsiVisualOutput
    ) -> Tensor:
        """Text embeddings with the visual tokens written at the placeholder positions.

        Raises:
            ValueError: a slide's placeholder count differs from its visual-token count.
        """
        placeholder = input_ids == VISUAL_PLACEHOLDER_ID
        embeds = self.get_input_embeddings()(input_ids.masked_fill(placeholder, 0))
        assert visual.visual_tokens is not None and visual.visual_mask is not None
        counts = placeholder.sum(dim=1)
        expected = visual.visual_mask.sum(dim=1)
        if not torch.equal(counts, expected):
            raise ValueError(
                f"visual placeholders per sample {counts.tolist()} do not match the visual tokens "
                f"{expected.tolist()}; build inputs with HwsiProcessor for this model's config"
            )
        tokens = visual.visual_tokens[visual.visual_mask].to(embeds.dtype)
        merged: Tensor = embeds.masked_scatter(placeholder[..., None].expand_as(embeds), tokens)
        return merged

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        cache: Any = None,
        position_ids: Tensor | None = None,
        use_cache: bool | None = None,
        region: Tensor | None = None,
        region_mask: Tensor | None = None,
        patch: Tensor | None = None,
        patch_mask: Tensor | None = None,
        cell: Tensor | None = None,
        cell_mask: Tensor | None = None,
        cell_pos: Tensor | None = None,
        region_pos: Tensor | None = None,
        wsi: Tensor | None = None,
        region_index: Tensor | None = None,
        patch_index: Tensor | None = None,
        cell_k: Tensor | None = None,
        logits_to_keep: int | Tensor = 0,
        **kwargs: Any,
    ) -> HwsiOutput:
        """Language-model forward pass with visual tokens merged in.

        Visual features are needed only when ``input_ids`` hold placeholders (the first
        step of generation, or training); later decoding steps pass plain token ids.
        ``region_index``, ``patch_index`` and ``cell_k`` are the hierarchy ids the processor
        passes along for evidence; they are accepted and not used here.
        """
        visual: HwsiVisualOutput | None = None
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            if bool((input_ids == VISUAL_PLACEHOLDER_ID).any()):
                if region is None or region_mask is None or patch is None or patch_mask is None \
                        or cell is None or cell_mask is None:
                    raise ValueError("input_ids hold visual placeholders but no slide features were given")
                visual = self.model(region=region, region_mask=region_mask, patch=patch,
                                    patch_mask=patch_mask, cell=cell, cell_mask=cell_mask,
                                    cell_pos=cell_pos, region_pos=region_pos, wsi=wsi)
                inputs_embeds = self.embed_inputs(input_ids, visual)
            else:
                inputs_embeds = self.get_input_embeddings()(input_ids)
        out = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=use_cache, labels=labels, logits_to_keep=logits_to_keep, **kwargs,
        )
        return HwsiOutput(
            loss=out.loss, logits=out.logits, cache=out.cache,
            visual_tokens=None if visual is None else visual.visual_tokens,
            visual_mask=None if visual is None else visual.visual_mask,
            token_refs=None if visual is None else visual.token_refs,
        )

    @torch.no_grad()
    def generate(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> Any:
        """Generate an answer; returns only the new token ids ``(B, T_new)``.

        The prompt (text with visual tokens merged) is given to the LLM as embeddings on the
        first step. Greedy by default (``do_sample=False``) so reruns give the same text;
        sampling is opt-in through the usual generation arguments and a seeded generator.
        """
        visual_args = {k: kwargs.pop(k) for k in _VISUAL_KEYS if k in kwargs}
        for key in _ID_KEYS:
            kwargs.pop(key, None)
        kwargs.setdefault("do_sample", False)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        visual = self.model(**visual_args)
        embeds = self.embed_inputs(input_ids, visual)
        return self.language_model.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, **kwargs
        )
