"""omero-hwsi: hierarchical multimodal LLM (MLLM-HWSI) analysis of whole-slide images.

Research use only. The package root is cheap to import: subpackages load on demand.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
