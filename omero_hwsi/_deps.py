"""Optional dependency groups: fail with the extra to install, not with an ImportError."""

from __future__ import annotations

import importlib
from types import ModuleType

from omero_hwsi.errors import MissingExtraError

__all__ = ["require"]


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise a one-line error naming the extra that provides it.

    Raises:
        MissingExtraError: the module is not installed (exit 3).
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{purpose} needs {module}, which is not installed; "
            f"install it with: pip install 'omero-hwsi[{extra}]'"
        ) from err
