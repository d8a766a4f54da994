"""``hwsi tiles`` output: the hierarchy of one slide as QuPath GeoJSON and an overview picture.

Why: before trusting any answer, a pathologist checks what the model looks at: where tissue
was found, which regions and patches exist, which patches were selected, which nuclei were
segmented. All files are written to a staging folder first and moved in at the end, so a
failure leaves no partial output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from shapely.geometry import Polygon, box

from omero_hwsi._types import RGBArray
from omero_hwsi.features.store import SlideFeatures
from omero_hwsi.results.geojson import feature_id, qupath_feature, write_feature_collection
from omero_hwsi.slide.hierarchy import cell_hid, patch_hid, region_hid

__all__ = ["TILE_FILES", "write_tiles"]

TILE_FILES = ("tissue.geojson", "regions.geojson", "patches.geojson", "nuclei.geojson", "thumbnail.png")

COLORS = {
    "Tissue": (0, 160, 60),
    "Region": (40, 90, 220),
    "Patch": (150, 150, 150),
    "Candidate patch": (230, 160, 0),
    "Selected patch": (220, 40, 40),
    "Nucleus": (120, 40, 160),
}


def write_tiles(
    features: SlideFeatures, out_dir: str | os.PathLike[str], thumbnail: RGBArray,
    thumbnail_level0_per_px: float,
) -> list[Path]:
    """Write the five tile files into ``out_dir`` (created if needed); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slide = features.provenance["slide"]
    size = (float(slide["width"]), float(slide["height"]))
    sha = slide["sha256"]
    staging = Path(tempfile.mkdtemp(prefix=".hwsi-tiles-", dir=out))
    try:
        write_feature_collection(staging / "tissue.geojson", [qupath_feature(
            features.tissue, object_type="annotation", name="Tissue", fid=feature_id(sha, "tissue"),
            classification="Tissue", color=COLORS["Tissue"], clip_to=size,
            measurements={"Area um^2": features.tissue.area * float(slide["mpp"]) ** 2},
        )])
        write_feature_collection(staging / "regions.geojson", _regions(features, size, sha))
        write_feature_collection(staging / "patches.geojson", _patches(features, size, sha))
        write_feature_collection(staging / "nuclei.geojson", _nuclei(features, size, sha))
        _draw(features, thumbnail, thumbnail_level0_per_px).save(staging / "thumbnail.png")
        written = []
        for name in TILE_FILES:
            os.replace(staging / name, out / name)
            written.append(out / name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _box_props(b: np.ndarray) -> dict[str, list[float]]:
    return {"box": [round(float(v), 3) for v in b]}


def _regions(features: SlideFeatures, size: tuple[float, float], sha: str) -> list[dict[str, Any] | None]:
    out = []
    for r, i in enumerate(features.region_index):
        x, y, w, h = features.region_boxes[r]
        hid = region_hid(int(i))
        out.append(qupath_feature(
            box(x, y, x + w, y + h), object_type="annotation", name=hid, fid=feature_id(sha, hid),
            classification="Region", color=COLORS["Region"], clip_to=size,
            measurements={"Tissue fraction": float(features.region_tissue[r]),
                          "Valid patches": float(features.patch_valid[r].sum())},
            properties={"hid": hid, **_box_props(features.region_boxes[r])},
        ))
    return out


def _patches(features: SlideFeatures, size: tuple[float, float], sha: str) -> list[dict[str, Any] | None]:
    out = []
    for r, i in enumerate(features.region_index):
        rank = {int(j): n for n, j in enumerate(features.selected[r]) if j >= 0}
        cand = {int(j): n for n, j in enumerate(features.candidates[r]) if j >= 0}
        for j in (int(v) for v in np.flatnonzero(features.patch_valid[r])):
            x, y, w, h = features.patch_boxes[r, j]
            hid = patch_hid(int(i), j)
            cls = "Selected patch" if j in rank else "Candidate patch" if j in cand else "Patch"
            measurements = {"Tissue fraction": float(features.patch_tissue[r, j])}
            if j in cand:
                measurements["Relevance"] = float(features.relevance[r, cand[j]])
                measurements["Diversity order"] = float(cand[j])
            if j in rank:
                measurements["Selection rank"] = float(rank[j])
            out.append(qupath_feature(
                box(x, y, x + w, y + h), object_type="tile", name=hid, fid=feature_id(sha, hid),
                classification=cls, color=COLORS[cls], clip_to=size, measurements=measurements,
                properties={"hid": hid, **_box_props(features.patch_boxes[r, j])},
            ))
    return out


def _nuclei(features: SlideFeatures, size: tuple[float, float], sha: str) -> list[dict[str, Any] | None]:
    table = features.nuclei
    names = features.provenance["encoders"]["nucleus"]["descriptor_names"]
    selected = {(int(r), int(j)) for r in range(len(features.region_index))
                for j in features.selected[r] if j >= 0}
    out = []
    for n in range(len(table)):
        r, j = int(table.region[n]), int(table.patch[n])
        if (r, j) not in selected:
            continue
        hid = cell_hid(int(features.region_index[r]), j, int(table.k[n]))
        out.append(qupath_feature(
            Polygon(table.polygon(n)), object_type="detection", name=hid, fid=feature_id(sha, hid),
            classification="Nucleus", color=COLORS["Nucleus"], clip_to=size,
            measurements=dict(zip(names, (float(v) for v in table.descriptor[n]), strict=True)),
            properties={"hid": hid},
        ))
    return out


def _draw(features: SlideFeatures, thumbnail: RGBArray, level0_per_px: float) -> Image.Image:
    """The thumbnail with tissue outline, regions, patches and the selection drawn on it."""
    image = Image.fromarray(thumbnail).convert("RGB")
    draw = ImageDraw.Draw(image, "RGBA")
    s = 1.0 / level0_per_px

    def rect(b: np.ndarray, color: tuple[int, int, int], width: int, alpha: int = 255) -> None:
        x, y, w, h = (float(v) * s for v in b)
        draw.rectangle([x, y, x + w, y + h], outline=(*color, alpha), width=width)

    for polygon in getattr(features.tissue, "geoms", [features.tissue]):
        if isinstance(polygon, Polygon) and not polygon.is_empty:
            for ring in [polygon.exterior, *polygon.interiors]:
                draw.line([(x * s, y * s) for x, y in ring.coords], fill=(*COLORS["Tissue"], 255), width=2)
    for r in range(len(features.region_index)):
        for j in np.flatnonzero(features.patch_valid[r]):
            rect(features.patch_boxes[r, j], COLORS["Patch"], 1, 90)
        for j in features.selected[r]:
            if j >= 0:
                rect(features.patch_boxes[r, j], COLORS["Selected patch"], 2)
        rect(features.region_boxes[r], COLORS["Region"], 3)
    return image
