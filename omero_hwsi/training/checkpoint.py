"""Training checkpoints: written atomically, resumed bit for bit.

A checkpoint ``checkpoint-<step>/`` holds what changes during training and nothing else:

| file | content |
|---|---|
| ``trainable.safetensors`` | the model's trainable parameters by name (LoRA adapters included) |
| ``text_encoder.safetensors`` + ``text_encoder_config.json`` | the text tower (stages 1-3) |
| ``loss_state.safetensors`` | a learned temperature |
| ``optimizer.pt``, ``scheduler.pt`` | AdamW moments and the schedule position |
| ``rng.pt`` | torch (CPU and CUDA), numpy and ``random`` states |
| ``trainer_state.json`` | step, epoch, position in the epoch's batch plan, elapsed time, a fingerprint of the frozen weights |
| ``train_config.json`` | the :class:`~omero_hwsi.training.config.TrainConfig` |

Frozen weights are not copied (for a 7B LLM under LoRA they are almost all of it): a resumed
run rebuilds the model exactly as the first run did (from the start folder, or seeded
initialisation) and checks the frozen weights' fingerprint before loading the trainable ones.
The folder is written under a temporary name and renamed into place, so a crash while saving
never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from omero_hwsi._io import write_json_atomic
from omero_hwsi.errors import CheckpointMismatchError
from omero_hwsi.model.losses import LearnableTemperature, TextEncoder
from omero_hwsi.model.text_tower import TEXT_ENCODER_WEIGHTS, save_text_encoder

__all__ = [
    "CHECKPOINT_PREFIX",
    "TRAINER_STATE",
    "frozen_fingerprint",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
TRAINABLE = "trainable.safetensors"
LOSS_STATE = "loss_state.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of ``model`` by name, on the CPU."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def frozen_fingerprint(model: nn.Module) -> str:
    """A digest of the frozen weights (names, shapes, dtypes, sums), to check a rebuild.

    Sums are rounded to 9 significant digits so a reduction order difference cannot flag
    an identical model; any real change of a weight moves them far more.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                continue
            values = param.detach().double()
            digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}:"
                          f"{float(values.sum()):.9g}:{float(values.square().sum()):.9g};".encode())
    return digest.hexdigest()


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=True)
    assert isinstance(numpy_state, tuple)
    keys, pos, has_gauss, cached = numpy_state[1:]
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model: nn.Module,
    text_encoder: TextEncoder | None,
    temperature: LearnableTemperature | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    config: dict[str, Any],
    keep: int = 0,
) -> Path:
    """Write ``checkpoint-<step>/`` atomically; then keep only the ``keep`` newest (0 = all).

    Args:
        state: JSON-ready trainer state (step, epoch, cursor, elapsed, fingerprint, ...).
        config: the run's config as a JSON-ready dict.
    """
    from safetensors.torch import save_file

    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / TRAINABLE))
    if text_encoder is not None:
        save_text_encoder(text_encoder, tmp)
    if temperature is not None:
        save_file({"temperature.log_scale": temperature.log_scale.detach().cpu().reshape(1)},
                  str(tmp / LOSS_STATE))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    write_json_atomic(tmp / "train_config.json", config)
    write_json_atomic(tmp / TRAINER_STATE, state)  # last: its presence marks a whole checkpoint
    if final.exists():
        trash = output_dir / f".{final.name}.old"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    logger.info("checkpoint %s written", final)
    if keep:
        for old in _checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first."""
    found: list[tuple[int, Path]] = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            match = _NAME.match(path.name)
            if match and (path / TRAINER_STATE).is_file():
                found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = _checkpoints(output_dir)
    return found[-1] if found else None


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    text_encoder: TextEncoder | None,
    temperature: LearnableTemperature | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    fingerprint: str,
) -> dict[str, Any]:
    """Restore a checkpoint into the freshly built run; returns its trainer state.

    Raises:
        CheckpointMismatchError: the frozen weights differ from the checkpointed run's (the
            start folder changed, or another library version initialises differently), or
            the trainable parameters do not match the model's.
    """
    from safetensors.torch import load_file

    state: dict[str, Any] = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    if state.get("fingerprint") != fingerprint:
        raise CheckpointMismatchError(
            f"{path}: the frozen weights differ from the run that wrote this checkpoint (was the "
            "start folder or the model config changed?); start a new run in another output_dir"
        )
    saved = load_file(str(path / TRAINABLE))
    own = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != own:
        missing, extra = sorted(own - set(saved)), sorted(set(saved) - own)
        raise CheckpointMismatchError(
            f"{path}: trainable parameters do not match (missing: {', '.join(missing[:3]) or '-'}; "
            f"unexpected: {', '.join(extra[:3]) or '-'})"
        )
    model.load_state_dict(saved, strict=False)
    if text_encoder is not None:
        text_encoder.load_state_dict(load_file(str(path / TEXT_ENCODER_WEIGHTS)), strict=True)
    if temperature is not None:
        value = load_file(str(path / LOSS_STATE))["temperature.log_scale"]
        with torch.no_grad():
            temperature.log_scale.copy_(value.reshape(()))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    _set_rng_state(torch.load(path / "rng.pt", map_location="cpu", weights_only=True))
    logger.info("resumed from %s (step %d)", path, state["step"])
    return state
