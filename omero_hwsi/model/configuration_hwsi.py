"""``HwsiConfig``: every number and switch of an MLLM-HWSI model, nothing else.

Sizes are read from here (and, for imported weights, from the released files), never assumed
in the modules. The LLM's own configuration is nested as ``text_config`` (any causal LM:
Llama, Qwen2, ...). ``expected_features`` records the encoders and grid the model was trained
on, so inference can refuse a feature store made differently.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from omero_hwsi.model.budget import ALL_SCALES

__all__ = [
    "CellFusion",
    "FusionMode",
    "HwsiConfig",
    "PromptLayout",
    "RegionPositionEncoding",
    "WsiAggregator",
]

FusionMode = Literal["concat", "resampler"]
CellFusion = Literal["ccaf", "precomputed"]
RegionPositionEncoding = Literal["none", "fourier"]
WsiAggregator = Literal["mean", "attention"]
PromptLayout = Literal["hwsi", "released"]


class HwsiConfig(PreTrainedConfig):
    """Configuration of :class:`~omero_hwsi.model.modeling_hwsi.HwsiForConditionalGeneration`.

    Attributes:
        text_config: the causal LM's configuration (``hidden_size`` is the visual token width D).
        wsi_dim, region_dim, patch_dim, cell_dim: input feature widths per scale. The slide
            vector is aggregated from region vectors, so ``wsi_dim`` must equal ``region_dim``.
        projector_hidden, projector_dropout, projector_layernorm: the four scale projectors.
        fusion_mode: ``concat`` (the paper: cell, patch, region and WSI tokens in sequence,
            within ``token_budget``) or ``resampler`` (the released weights: per-region fusion,
            then ``num_queries`` learned queries; always ``num_queries`` tokens).
        resampler_heads, fusion_dropout: resampler attention heads and fusion dropout.
        cell_fusion: ``ccaf`` (a trained set transformer over the nuclei of each patch) or
            ``precomputed`` (one cell vector per patch supplied with the features).
        ccaf_dim, ccaf_layers, ccaf_heads, ccaf_position_encoding, max_cells: CCAF settings;
            ``ccaf_dim`` None means ``cell_dim`` (nucleus features are projected to it first
            when they differ).
        region_position_encoding: ``fourier`` adds each region's centre (slide-normalised) to
            its token so "where" questions are answerable; ``none`` as in the released model.
        wsi_aggregator: ``mean`` of region vectors (released behaviour) or gated ``attention``.
        prompt_layout: ``hwsi`` (visual tokens between start/end tokens in the user turn) or
            ``released`` (visual tokens before the chat prompt, no added tokens).
        align_dim: width of the contrastive alignment space (None: no alignment heads, as in
            imported released weights).
        expected_features: encoder ids/versions/dims and grid parameters the model expects.
        visual_scales: the scales whose tokens the LLM reads in ``concat`` fusion, a subset of
            ``cell, patch, region, wsi`` that holds ``wsi`` (None: all four). Fewer scales are
            for the scale ablation (``bench/ablation.py``), as in the paper's Table 1.
    """

    model_type = "mllm_hwsi"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    text_config: dict[str, Any] | PreTrainedConfig | None = None
    wsi_dim: int = 192
    region_dim: int = 192
    patch_dim: int = 512
    cell_dim: int = 384
    projector_hidden: int = 1024
    projector_dropout: float = 0.1
    projector_layernorm: bool = True
    fusion_mode: str = "concat"
    num_queries: int = 64
    resampler_heads: int = 8
    fusion_dropout: float = 0.1
    token_budget: int = 1024
    cell_fusion: str = "ccaf"
    ccaf_dim: int | None = None
    ccaf_layers: int = 2
    ccaf_heads: int = 2
    ccaf_position_encoding: bool = True
    max_cells: int = 64
    region_position_encoding: str = "fourier"
    wsi_aggregator: str = "mean"
    prompt_layout: str = "hwsi"
    align_dim: int | None = 256
    expected_features: dict[str, Any] | None = None
    visual_scales: list[str] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        for name, kind in (
            ("fusion_mode", FusionMode),
            ("cell_fusion", CellFusion),
            ("region_position_encoding", RegionPositionEncoding),
            ("wsi_aggregator", WsiAggregator),
            ("prompt_layout", PromptLayout),
        ):
            allowed = get_args(kind)
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.visual_scales is not None:
            scales = list(self.visual_scales)
            unknown = [x for x in scales if x not in ALL_SCALES]
            if unknown or "wsi" not in scales or len(set(scales)) != len(scales):
                raise ValueError(
                    f"visual_scales must be distinct names among {', '.join(ALL_SCALES)} and "
                    f"include wsi, got {scales}"
                )
            if self.fusion_mode != "concat" and set(scales) != set(ALL_SCALES):
                raise ValueError("visual_scales other than all four need fusion_mode 'concat'")
            self.visual_scales = [x for x in ALL_SCALES if x in scales]
        positive = ("wsi_dim", "region_dim", "patch_dim", "cell_dim", "projector_hidden",
                    "num_queries", "resampler_heads", "token_budget", "ccaf_layers",
                    "ccaf_heads", "max_cells")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.wsi_dim != self.region_dim:
            raise ValueError(
                f"wsi_dim ({self.wsi_dim}) must equal region_dim ({self.region_dim}): the slide "
                "vector is aggregated from region vectors"
            )
        if self.ccaf_width % self.ccaf_heads:
            raise ValueError(
                f"CCAF width {self.ccaf_width} must be divisible by ccaf_heads ({self.ccaf_heads})"
            )
        hidden = self.hidden_size
        if self.fusion_mode == "resampler" and hidden % self.resampler_heads:
            raise ValueError(
                f"LLM hidden size {hidden} must be divisible by resampler_heads ({self.resampler_heads})"
            )

    @property
    def hidden_size(self) -> int:
        """Width D of the visual tokens: the LLM's hidden size."""
        text = self.get_text_config(decoder=True)
        return int(text.hidden_size)

    @property
    def scales(self) -> tuple[str, ...]:
        """The scales the LLM reads, in sequence order (all four unless ``visual_scales``)."""
        return ALL_SCALES if self.visual_scales is None else tuple(self.visual_scales)

    @property
    def ccaf_width(self) -> int:
        """Width at which CCAF runs (``ccaf_dim`` or ``cell_dim``)."""
        return int(self.ccaf_dim or self.cell_dim)

    @property
    def cell_token_dim(self) -> int:
        """Input width of the cell projector: CCAF's width, or the precomputed cell vector's."""
        return self.ccaf_width if self.cell_fusion == "ccaf" else self.cell_dim
