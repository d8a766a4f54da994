"""Benchmark evaluation: metrics (pure, torch-free) and ``evaluate`` (needs the ``worker`` extra).

``omero_hwsi.evaluation.metrics`` imports without torch; :func:`evaluate` is loaded on first
use, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omero_hwsi.evaluation.run import evaluate

__all__ = ["evaluate"]


def __getattr__(name: str) -> Any:
    if name == "evaluate":
        from omero_hwsi.evaluation.run import evaluate

        return evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
