"""Saving and loading the contrastive text tower next to a model.

The text tower (:class:`~omero_hwsi.model.losses.TextEncoder`) is trained with the alignment
heads in stages 1-2 and is needed again at inference for slide <-> text retrieval, so it lives
in the model folder as ``text_encoder.safetensors`` with its constructor arguments in
``text_encoder_config.json``. It is not a submodule of the model: its vocabulary is the
tokenizer's, its life cycle is the contrastive loss's, and imported released weights have none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

from omero_hwsi._io import write_bytes_atomic, write_json_atomic
from omero_hwsi.errors import CheckpointMismatchError
from omero_hwsi.model.layers import CcafBlock
from omero_hwsi.model.losses import TextEncoder

__all__ = ["TEXT_ENCODER_CONFIG", "TEXT_ENCODER_WEIGHTS", "load_text_encoder", "save_text_encoder"]

TEXT_ENCODER_CONFIG = "text_encoder_config.json"
TEXT_ENCODER_WEIGHTS = "text_encoder.safetensors"
_ARGS = ("vocab_size", "dim", "layers", "heads", "max_length", "align_dim", "pad_token_id")


def _arguments(encoder: TextEncoder) -> dict[str, Any]:
    """The constructor arguments that rebuild ``encoder`` (read from its modules)."""
    heads = cast(CcafBlock, encoder.blocks[0]).attn.num_heads if len(encoder.blocks) else 1
    return {
        "vocab_size": encoder.vocab_size,
        "dim": int(encoder.embed.embedding_dim),
        "layers": len(encoder.blocks),
        "heads": heads,
        "max_length": encoder.max_length,
        "align_dim": int(encoder.proj.out_features),
        "pad_token_id": encoder.pad_token_id,
    }


def save_text_encoder(encoder: TextEncoder, directory: str | os.PathLike[str]) -> None:
    """Write the tower's weights and constructor arguments into ``directory``."""
    from safetensors.torch import save

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    write_bytes_atomic(path / TEXT_ENCODER_WEIGHTS, save(state))
    write_json_atomic(path / TEXT_ENCODER_CONFIG, _arguments(encoder))


def load_text_encoder(directory: str | os.PathLike[str]) -> TextEncoder | None:
    """The tower saved in ``directory``, or None when the model folder has none.

    Raises:
        CheckpointMismatchError: the config or weights are unreadable or do not fit each other.
    """
    from safetensors.torch import load_file

    path = Path(directory)
    config_path, weights_path = path / TEXT_ENCODER_CONFIG, path / TEXT_ENCODER_WEIGHTS
    if not config_path.is_file() and not weights_path.is_file():
        return None
    if not (config_path.is_file() and weights_path.is_file()):
        raise CheckpointMismatchError(
            f"{path}: needs both {TEXT_ENCODER_CONFIG} and {TEXT_ENCODER_WEIGHTS}; save the model again"
        )
    try:
        args = json.loads(config_path.read_text(encoding="utf-8"))
        encoder = TextEncoder(**{k: int(args[k]) for k in _ARGS})
        encoder.load_state_dict(load_file(str(weights_path)), strict=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointMismatchError(f"{path}: text encoder does not load ({message})") from err
    return encoder.eval()
