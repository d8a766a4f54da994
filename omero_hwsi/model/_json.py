"""Reading the JSON files of a model folder, with one-line errors that say what to do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omero_hwsi.errors import CheckpointMismatchError, ModelFileNotFoundError

__all__ = ["read_json_object"]


def read_json_object(path: Path, *, missing: str, fix: str = "") -> dict[str, Any]:
    """The JSON object in ``path``.

    Args:
        path: the file.
        missing: why the file should be there (the end of the not-found message).
        fix: what to do when the file is unreadable (appended to those messages).

    Raises:
        ModelFileNotFoundError: the file does not exist.
        CheckpointMismatchError: it is not JSON, or not a JSON object.
    """
    advice = f"; {fix}" if fix else ""
    if not path.is_file():
        raise ModelFileNotFoundError(f"{path}: not found; {missing}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointMismatchError(f"{path}: not valid JSON ({err}){advice}") from err
    if not isinstance(data, dict):
        raise CheckpointMismatchError(
            f"{path}: expected a JSON object, got {type(data).__name__}{advice}"
        )
    return data
