"""Encoders that turn patches and regions into vectors.

Importing this package registers the built-in, weight-free encoders (``hed_texture`` and
``layout``); learned torch encoders live elsewhere so this import never pulls in torch.
Callers should normally go through :func:`omero_hwsi.features.registry.create_encoder`.
"""

from __future__ import annotations

from omero_hwsi.features.encoders.builtin import (
    HED_FEATURE_NAMES,
    LAYOUT_FEATURE_NAMES,
    PROTOTYPE_NAMES,
    HedTextureEncoder,
    LayoutEncoder,
    wsi_vector,
)

__all__ = [
    "HED_FEATURE_NAMES",
    "LAYOUT_FEATURE_NAMES",
    "PROTOTYPE_NAMES",
    "HedTextureEncoder",
    "LayoutEncoder",
    "wsi_vector",
]
