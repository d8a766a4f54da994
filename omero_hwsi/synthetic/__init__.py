"""Synthetic whole-slide images, so tests and demos need no real (large, licensed) scans."""

from __future__ import annotations

from omero_hwsi.synthetic.svs import SyntheticTissue, TileRenderer, write_svs

__all__ = ["SyntheticTissue", "TileRenderer", "write_svs"]
