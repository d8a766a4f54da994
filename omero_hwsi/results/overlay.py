"""``overlay.png``: the slide thumbnail with the evidence of one analysis drawn on it.

Why: a picture answers "where did the model look?" at a glance, in an e-mail, a report or the
OMERO web preview, without opening a viewer. Regions are tinted with a diverging ramp
normalised over the regions' scores: red = the answer relies on the region (positive score),
blue = the answer is more likely without it (negative), pale = little effect. The best patches
are outlined in yellow, the best nuclei in cyan (as rings when smaller than a few thumbnail
pixels). A strip at the bottom names the method, the answer and the research-use statement.
The picture keeps the thumbnail's size so it lines up with it pixel for pixel.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from omero_hwsi._types import RGBArray
from omero_hwsi.results.evidence import evidence_geometry, truncate

if TYPE_CHECKING:  # the result module's package needs torch at runtime; results/ must not
    from omero_hwsi.results.schema import AnalysisResult

__all__ = ["NEGATIVE", "NUCLEUS_OUTLINE", "PATCH_OUTLINE", "POSITIVE", "render_overlay"]

POSITIVE = (215, 48, 39)
"""Tint of a region the answer relies on (score > 0)."""
NEGATIVE = (49, 104, 190)
"""Tint of a region the answer is more likely without (score < 0)."""
PATCH_OUTLINE = (255, 210, 0)
NUCLEUS_OUTLINE = (0, 225, 235)
_WHITE = (255, 255, 255)
_FONT_FAMILY = ImageFont.FreeTypeFont | ImageFont.ImageFont


def ramp(value: float) -> tuple[int, int, int, int]:
    """RGBA tint of a normalised score in ``[-1, 1]``: white to red (+) or blue (-).

    Opacity grows with the magnitude so regions with no effect leave the tissue visible.
    """
    value = max(-1.0, min(1.0, value)) if math.isfinite(value) else 0.0
    end = POSITIVE if value >= 0 else NEGATIVE
    t = abs(value)
    rgb = tuple(round(w + (e - w) * t) for w, e in zip(_WHITE, end, strict=True))
    return (rgb[0], rgb[1], rgb[2], round(40 + 150 * t))


def _rings(geometry: BaseGeometry, scale: float) -> list[list[tuple[float, float]]]:
    """Exterior rings of the polygons in ``geometry``, in thumbnail pixels."""
    if isinstance(geometry, Polygon):
        parts = [geometry]
    elif isinstance(geometry, MultiPolygon):
        parts = list(geometry.geoms)
    else:
        parts = [g for g in getattr(geometry, "geoms", []) if isinstance(g, Polygon)]
    return [[(x * scale, y * scale) for x, y in p.exterior.coords] for p in parts if not p.is_empty]


def _outline(draw: ImageDraw.ImageDraw, geometry: BaseGeometry, scale: float,
             color: tuple[int, int, int], width: int) -> None:
    """Outline ``geometry``; one too small to see becomes a ring around its centre."""
    minx, miny, maxx, maxy = (v * scale for v in geometry.bounds)
    if max(maxx - minx, maxy - miny) < 4:
        cx, cy = (minx + maxx) / 2, (miny + maxy) / 2
        draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], outline=(*color, 255), width=1)
        return
    for ring in _rings(geometry, scale):
        draw.line(ring, fill=(*color, 255), width=width, joint="curve")


def _font(size: int) -> _FONT_FAMILY:
    """Pillow's bundled font at ``size`` px (the bitmap fallback where FreeType is missing)."""
    try:
        return ImageFont.load_default(size)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: _FONT_FAMILY, width: float) -> str:
    """``text`` shortened (with an ellipsis) until it fits ``width`` pixels."""
    limit = len(text)
    while limit > 1 and draw.textlength(truncate(text, limit), font=font) > width:
        limit = max(1, int(limit * 0.85))
    return truncate(text, limit)


def _legend(image: Image.Image, result: AnalysisResult) -> None:
    """The strip at the bottom: method and answer, colour ramp, research-use statement."""
    width, height = image.size
    strip = max(12, min(48, round(height * 0.12)))
    top = height - strip
    draw = ImageDraw.Draw(image, "RGBA")
    draw.rectangle([0, top, width, height], fill=(255, 255, 255, 215))
    font = _font(max(6, round(strip * 0.36)))
    pad = max(2, strip // 10)
    bar = min(max(20, width // 6), width // 3)
    for x in range(bar):
        r, g, b, _ = ramp(2 * x / max(1, bar - 1) - 1)
        draw.line([(pad + x, top + pad), (pad + x, top + strip // 2 - 1)], fill=(r, g, b, 255))
    methods: list[str] = sorted({e.method for e in result.evidence}) or ["none"]
    text_x = pad * 2 + bar
    line1 = f"{result.task}: {result.answer}"
    line2 = f"Research use only | evidence: {', '.join(methods)} (red supports, blue against)"
    room = max(1, width - text_x - pad)
    draw.text((text_x, top + pad // 2), _fit(draw, line1, font, room), fill=(0, 0, 0, 255), font=font)
    draw.text((pad, top + strip // 2 + 1), _fit(draw, line2, font, width - 2 * pad),
              fill=(0, 0, 0, 255), font=font)


def render_overlay(
    thumbnail: RGBArray, level0_per_px: float, result: AnalysisResult, *,
    top_patches: int = 10, top_nuclei: int = 30,
) -> Image.Image:
    """The thumbnail with region scores tinted and the best patches and nuclei outlined.

    Args:
        thumbnail: the whole slide, RGB uint8 ``(H, W, 3)``.
        level0_per_px: level-0 pixels per thumbnail pixel.
        result: the analysis whose evidence is drawn.
        top_patches, top_nuclei: how many of the best patches and nuclei to outline.

    Returns:
        An RGB picture of the thumbnail's size.

    Raises:
        ValueError: a thumbnail that is not ``(H, W, 3)`` or a non-positive scale.
    """
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3 or 0 in thumbnail.shape:
        raise ValueError(f"thumbnail must be an (H, W, 3) RGB array, got shape {thumbnail.shape}")
    if not (math.isfinite(level0_per_px) and level0_per_px > 0):
        raise ValueError(f"level0_per_px must be positive, got {level0_per_px}")
    scale = 1.0 / level0_per_px
    base = Image.fromarray(thumbnail).convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)

    regions = [e for e in result.evidence if e.level == "region"]
    peak = max((abs(e.score) for e in regions if math.isfinite(e.score)), default=0.0) or 1.0
    for item in regions:
        tint = ramp(item.score / peak)
        for ring in _rings(evidence_geometry(item), scale):
            draw.polygon(ring, fill=tint, outline=(*tint[:3], 220))
    for item in result.top("patch", top_patches):
        _outline(draw, evidence_geometry(item), scale, PATCH_OUTLINE, 2)
    for item in result.top("cell", top_nuclei):
        _outline(draw, evidence_geometry(item), scale, NUCLEUS_OUTLINE, 1)

    image = Image.alpha_composite(base, layer)
    _legend(image, result)
    return image.convert("RGB")
