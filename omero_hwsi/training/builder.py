"""Build what a stage trains: the model (from the previous stage or from scratch), its
tokenizer and processor, LoRA adapters, the text tower and the temperature.

Every stage that starts from a folder loads it with
:func:`~omero_hwsi.training.stages.load_stage_weights` after building the model from the
folder's config, so a missing or unexpected key stops the run instead of leaving a randomly
initialised module (the reference code's stage-3 bug). The ``hwsi`` prompt layout adds three
special tokens to the tokenizer; the LLM's embeddings grow to ``len(tokenizer)`` when they
are smaller. The build is deterministic given the seed, which is what lets a resumed run
rebuild the frozen weights instead of reading them from every checkpoint.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from omero_hwsi._deps import require
from omero_hwsi.errors import CheckpointMismatchError, ConfigError, ModelFileNotFoundError
from omero_hwsi.model.configuration_hwsi import HwsiConfig
from omero_hwsi.model.losses import LearnableTemperature, TextEncoder
from omero_hwsi.model.modeling_hwsi import HwsiForConditionalGeneration
from omero_hwsi.model.processing_hwsi import HwsiProcessor
from omero_hwsi.model.text_tower import load_text_encoder
from omero_hwsi.training.config import TrainConfig
from omero_hwsi.training.stages import load_stage_weights, set_trainable

__all__ = ["Run", "build_run", "seed_everything"]

logger = logging.getLogger(__name__)

TRAINS_TEXT = (1, 2)
"""Stages that train the text tower and a learned temperature (stage 3 keeps them fixed)."""


@dataclass(slots=True)
class Run:
    """The trained objects of one run.

    Attributes:
        model: the full model (LoRA-wrapped language model in stage 3 with ``lora``).
        processor: prompt layout and tokenizer, built from the model's config.
        text_encoder: the contrastive text tower (None when no contrastive term needs one
            and the start folder has none).
        temperature: a learned temperature, or None (then ``config.temperature`` is used).
        trainable: trainable parameter counts per module group.
    """

    model: HwsiForConditionalGeneration
    processor: HwsiProcessor
    text_encoder: TextEncoder | None
    temperature: LearnableTemperature | None
    trainable: dict[str, int]

    @property
    def lora(self) -> bool:
        """True when the language model carries peft adapters."""
        return hasattr(self.model.language_model, "peft_config")

    def parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every trainable parameter, named (model, text tower, temperature)."""
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.text_encoder is not None:
            params += [(f"text_encoder.{n}", p) for n, p in self.text_encoder.named_parameters()
                       if p.requires_grad]
        if self.temperature is not None:
            params += [("temperature.log_scale", self.temperature.log_scale)]
        return params


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and ``random``: initialisation and dropout repeat."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _load_config(config: TrainConfig) -> tuple[HwsiConfig, Path | None]:
    if config.model is not None:
        folder = config.model
        if not (folder / "config.json").is_file():
            raise ModelFileNotFoundError(f"{folder}: no config.json; model must be a folder saved "
                                         "by a previous stage (its final/)")
        return HwsiConfig.from_pretrained(str(folder), local_files_only=True), folder
    assert config.model_config is not None
    path = config.model_config
    if not path.is_file():
        raise ConfigError(f"model_config: {path} not found")
    try:
        hconfig = HwsiConfig.from_json_file(str(path))
    except (OSError, ValueError, TypeError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"model_config: {path} is not a valid HwsiConfig ({message})") from err
    return hconfig, None


def _tokenizer(config: TrainConfig, folder: Path | None) -> Any:
    from transformers import AutoTokenizer

    source = config.tokenizer or folder
    assert source is not None
    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelFileNotFoundError(f"{source}: tokenizer files missing or unreadable ({err})") from err


def _text_encoder(config: TrainConfig, folder: Path | None, vocab: int, align_dim: int | None,
                  pad_id: int) -> TextEncoder | None:
    existing = load_text_encoder(folder) if folder is not None else None
    if existing is not None:
        if existing.vocab_size < vocab:
            raise CheckpointMismatchError(
                f"{folder}: the text tower knows {existing.vocab_size} tokens but the tokenizer "
                f"has {vocab}; use the tokenizer saved with the model"
            )
        return existing
    if not config.uses_contrastive:
        return None
    if align_dim is None:
        raise ConfigError("contrastive_weight: the model has no alignment heads (align_dim is unset); "
                          "set contrastive_weight = 0")
    if config.stage == 3:
        logger.warning("stage 3 without a trained text tower in %s: the contrastive term uses an "
                       "untrained one", folder)
    return TextEncoder(vocab, dim=config.text_dim, layers=config.text_layers, heads=config.text_heads,
                       max_length=config.text_max_length, align_dim=align_dim, pad_token_id=pad_id)


def _apply_lora(model: HwsiForConditionalGeneration, config: TrainConfig) -> None:
    require("peft", extra="worker", purpose="LoRA training (stage 3)")
    require("accelerate", extra="worker", purpose="LoRA training (stage 3)")
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = list(config.lora_targets)
    if targets == ["all-linear"]:
        targets = "all-linear"
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, bias="none")
    try:
        with warnings.catch_warnings():
            # peft probes a transformers attribute deprecated in v5; nothing for us to change
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                    category=FutureWarning)
            model.language_model = get_peft_model(model.language_model, lora)
    except ValueError as err:
        raise ConfigError(f"lora_targets: {err}".splitlines()[0]) from err


def build_run(config: TrainConfig) -> Run:
    """Build the model, processor, text tower and temperature of ``config``'s stage, on the CPU.

    The global random state is used for initialisation: call :func:`seed_everything` first.

    Raises:
        ModelFileNotFoundError: the start folder or tokenizer is missing.
        CheckpointMismatchError: the start folder's weights do not fit its config.
        ConfigError: an unusable model config (e.g. precomputed cells for a visual stage).
    """
    hconfig, folder = _load_config(config)
    if config.stage in (1, 2, 3) and hconfig.cell_fusion != "ccaf":
        raise ConfigError(f"model: cell_fusion {hconfig.cell_fusion!r} cannot be trained here (the "
                          "feature stores hold nuclei, not fused cell vectors); use 'ccaf'")
    model = HwsiForConditionalGeneration(hconfig)
    if folder is not None:
        load_stage_weights(model, folder)
    tokenizer = _tokenizer(config, folder)
    processor = HwsiProcessor.for_config(tokenizer, hconfig)
    rows = int(cast(torch.Tensor, model.get_input_embeddings().weight).shape[0])
    if len(tokenizer) > rows:
        logger.info("LLM embeddings %d -> %d rows for the prompt's marker tokens", rows, len(tokenizer))
        model.language_model.resize_token_embeddings(len(tokenizer))
    pad_id = tokenizer.pad_token_id
    text_encoder = _text_encoder(config, folder, len(tokenizer), hconfig.align_dim,
                                 int(pad_id) if isinstance(pad_id, int) else 0)
    if config.uses_lora:
        _apply_lora(model, config)
    trainable = set_trainable(model, config.stage, lora=config.uses_lora)
    trains_text = config.stage in TRAINS_TEXT and config.uses_contrastive
    if text_encoder is not None:
        text_encoder.requires_grad_(trains_text)
        if trains_text:
            trainable["text_encoder"] = sum(p.numel() for p in text_encoder.parameters())
    temperature = None
    if config.learn_temperature and trains_text:
        temperature = LearnableTemperature(config.temperature)
        trainable["temperature"] = 1
    return Run(model=model, processor=processor, text_encoder=text_encoder, temperature=temperature,
               trainable=trainable)
