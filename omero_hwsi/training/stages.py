"""What each training stage trains, and strict hand-over of weights between stages.

| stage | trains | frozen |
|---|---|---|
| 0 | the language model (pre-training a small LLM on text, for models built from scratch) | visual side |
| 1 | CCAF (and its input projection), the WSI attention pool, the alignment heads | LLM, projectors |
| 2 | projectors, region fusion and resampler, region positions, WSI pool, alignment heads | LLM, CCAF |
| 3 | projectors, fusion/resampler, region positions, and the LLM: LoRA adapters only, or all of it with ``lora=False`` | CCAF, alignment heads |

The reference code's stage 3 asked for the stage-2 checkpoint but never loaded it, then froze
a randomly initialised projector. Here a stage starts from the previous stage's folder with
:func:`load_stage_weights`, which refuses any missing, unexpected or reshaped key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from omero_hwsi.errors import CheckpointMismatchError, ModelFileNotFoundError

__all__ = ["STAGE_MODULES", "Stage", "load_stage_weights", "set_trainable"]

Stage = Literal[0, 1, 2, 3]

STAGE_MODULES: dict[int, tuple[str, ...]] = {
    0: ("language_model.",),
    1: ("model.ccaf.", "model.cell_input.", "model.wsi_pool.", "model.align_heads."),
    2: ("model.projectors.", "model.fusion.", "model.resampler.", "model.region_position.",
        "model.wsi_pool.", "model.align_heads."),
    3: ("model.projectors.", "model.fusion.", "model.resampler.", "model.region_position.",
        "language_model."),
}
"""Parameter-name prefixes trained by each stage (everything else is frozen)."""

_LORA_MARKER = "lora_"


def set_trainable(model: nn.Module, stage: int, *, lora: bool = False) -> dict[str, int]:
    """Freeze everything but what ``stage`` trains; returns trainable parameter counts.

    With ``lora=True`` (stage 3 only) the language model's own weights stay frozen and only
    adapter parameters (peft names them ``lora_A`` / ``lora_B``) are trained, so LoRA must be
    applied to the model before this call.

    Raises:
        ValueError: unknown stage, ``lora`` outside stage 3, or a stage with nothing to train
            (e.g. stage 1 on a model without CCAF or alignment heads).
    """
    if stage not in STAGE_MODULES:
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage}")
    if lora and stage != 3:
        raise ValueError("lora applies to stage 3 only")
    prefixes = STAGE_MODULES[stage]
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        train = name.startswith(prefixes)
        if lora and name.startswith("language_model."):
            train = _LORA_MARKER in name
        param.requires_grad_(train)
        if train:
            group = ".".join(name.split(".")[:2])
            counts[group] = counts.get(group, 0) + param.numel()
    if not counts:
        raise ValueError(f"stage {stage} has nothing to train in this model (prefixes {prefixes})")
    return counts


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    raise ModelFileNotFoundError(
        f"{folder}: no model.safetensors or model.safetensors.index.json; pass the folder the "
        "previous stage saved"
    )


def _tied_keys(model: nn.Module) -> set[str]:
    """Names of parameters that share storage with an earlier one (e.g. a tied LM head)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        pointer = tensor.data_ptr()
        if pointer in seen and tensor.numel():
            tied.add(name)
        else:
            seen[pointer] = name
    return tied


def load_stage_weights(model: nn.Module, folder: str | os.PathLike[str]) -> None:
    """Load the previous stage's saved weights into ``model``, strictly.

    Every key of the model must be in the file with the same shape and the file may hold no
    other key; only weights tied to another one (a tied LM head) may be absent from the file.

    Raises:
        ModelFileNotFoundError: the folder or its safetensors files are missing.
        CheckpointMismatchError: missing, unexpected or reshaped keys, named as spelled in the file.
    """
    path = Path(folder)
    if not path.is_dir():
        raise ModelFileNotFoundError(f"{path}: previous-stage folder not found")
    state = _read_state_dict(path)
    own = model.state_dict()
    tied = _tied_keys(model)
    missing = sorted(k for k in own if k not in state and k not in tied)
    unexpected = sorted(k for k in state if k not in own)
    reshaped = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointMismatchError(f"{path}: weights do not fit this model ({'; '.join(problems)})")
    model.load_state_dict({k: v for k, v in state.items()}, strict=False)
