"""The versioned, resumable feature store: one zarr v3 directory per slide.

Why zarr: per-region chunks let a crashed extraction keep every region it finished, and
readers can open one region's features without loading the slide's. The store's folder name
is a hash of everything that changes its content (slide checksum, effective MPP, grid and
tissue parameters, encoder and segmenter ids and versions, selection sizes, restriction,
schema version), so stores made differently coexist and a rerun with the same inputs finds
its finished store and does nothing.

Commit protocol: a region's data chunks are written first, then its ``regions/done`` flag
(its own chunk file). ``manifest.json`` is written last, atomically; a store without it is
incomplete and is resumed, never read as results.

Layout (``R`` regions, ``P`` patch slots per region, ``C`` candidates, ``K`` selected)::

    zarr.json                       attrs: schema_version, key, hierarchy parameters
    tissue.geojson                  tissue geometry in level-0 px (holes kept)
    regions/index (R,) int64        grid index i of each region (id r<i>)
    regions/box (R, 4) float64      x, y, w, h in level-0 px (may pass the slide border)
    regions/tissue_fraction (R,)    regions/features (R, D_region)   regions/done (R,) bool
    patches/box (R, P, 4)           patches/tissue_fraction (R, P)   patches/valid (R, P)
    patches/on_slide (R, P)         patches/features (R, P, D_patch) (zeros where not valid)
    selection/candidates (R, C) int16 patch j in diversity order, -1 = empty slot
    selection/relevance (R, C)      selection/selected (R, K) int16 best first, -1 = empty
    nuclei/r<i>/patch (N,) int16    nuclei/r<i>/centroid (N, 2)   nuclei/r<i>/descriptor (N, D)
    nuclei/r<i>/polygon_offsets (N+1,) int64   nuclei/r<i>/polygon_xy (M, 2) float64
    wsi/features (D_wsi,)
    manifest.json                   provenance; present only when the store is complete
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry

from omero_hwsi._io import write_json_atomic
from omero_hwsi.errors import FeatureStoreError
from omero_hwsi.slide.hierarchy import Hierarchy, cell_hid, patch_hid, region_hid

__all__ = [
    "SCHEMA_VERSION",
    "FeatureStore",
    "NucleusTable",
    "RegionRecord",
    "SlideFeatures",
    "load_features",
    "store_key",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TISSUE = "tissue.geojson"


def _array(group: Any, name: str) -> Any:
    """The zarr array ``name`` of ``group`` (zarr types a lookup as "array or group")."""
    import zarr

    node = group[name]
    if not isinstance(node, zarr.Array):
        raise FeatureStoreError(f"{name}: expected an array in the feature store, found a group")
    return node


def _read(group: Any, name: str, dtype: Any = None) -> npt.NDArray[Any]:
    """All of array ``name`` as numpy (optionally cast)."""
    return np.asarray(_array(group, name)[...], dtype=dtype)


def store_key(identity: dict[str, Any]) -> str:
    """SHA-256 (hex) of a JSON identity; the store's folder name is its first 24 digits."""
    payload = json.dumps({"schema_version": SCHEMA_VERSION, **identity}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class NucleusTable:
    """Nuclei as flat arrays; polygon ``n`` is ``polygon_xy[offsets[n]:offsets[n+1]]``.

    ``region`` holds storage positions (0..R-1), ``patch`` the patch slot ``j``, ``k`` the
    index of the nucleus inside its patch (centroid (y, x) order). Coordinates: level-0 px.
    """

    region: npt.NDArray[np.int32]
    patch: npt.NDArray[np.int16]
    k: npt.NDArray[np.int32]
    centroid: npt.NDArray[np.float64]
    descriptor: npt.NDArray[np.float32]
    polygon_offsets: npt.NDArray[np.int64]
    polygon_xy: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return int(self.patch.shape[0])

    def polygon(self, n: int) -> npt.NDArray[np.float64]:
        """Vertices ``(V, 2)`` of nucleus ``n``."""
        return self.polygon_xy[self.polygon_offsets[n] : self.polygon_offsets[n + 1]]


@dataclass(frozen=True, slots=True)
class RegionRecord:
    """Everything extraction produces for one region, ready to commit to the store."""

    position: int
    patch_features: npt.NDArray[np.float32]
    candidates: npt.NDArray[np.int64]
    relevance: npt.NDArray[np.float32]
    selected: npt.NDArray[np.int64]
    region_features: npt.NDArray[np.float32]
    nucleus_patch: npt.NDArray[np.int16]
    nucleus_centroid: npt.NDArray[np.float64]
    nucleus_descriptor: npt.NDArray[np.float32]
    polygon_offsets: npt.NDArray[np.int64]
    polygon_xy: npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True, eq=False)
class SlideFeatures:
    """A complete store, loaded: per-scale arrays, masks, hierarchy ids and provenance.

    Shapes: ``region_features (R, D_region)``, ``patch_features (R, P, D_patch)`` with
    ``patch_valid (R, P)``, ``candidates (R, C)`` and ``selected (R, K)`` (patch slots, -1 =
    empty), ``wsi_features (D_wsi,)``. ``region_index`` gives the ids (``r<i>``).
    """

    path: Path
    provenance: dict[str, Any]
    tissue: BaseGeometry
    region_index: npt.NDArray[np.int64]
    region_boxes: npt.NDArray[np.float64]
    region_tissue: npt.NDArray[np.float32]
    region_features: npt.NDArray[np.float32]
    patch_boxes: npt.NDArray[np.float64]
    patch_tissue: npt.NDArray[np.float32]
    patch_valid: npt.NDArray[np.bool_]
    patch_features: npt.NDArray[np.float32]
    candidates: npt.NDArray[np.int16]
    relevance: npt.NDArray[np.float32]
    selected: npt.NDArray[np.int16]
    nuclei: NucleusTable
    wsi_features: npt.NDArray[np.float32]

    @property
    def region_ids(self) -> list[str]:
        """``r<i>`` per stored region."""
        return [region_hid(i) for i in self.region_index]

    def selected_patch_ids(self, position: int) -> list[str]:
        """Ids of the selected patches of the region at storage ``position``, best first."""
        i = int(self.region_index[position])
        return [patch_hid(i, j) for j in self.selected[position] if j >= 0]

    def nucleus_ids(self) -> list[str]:
        """``r<i>.p<j>.c<k>`` for every stored nucleus, in table order."""
        n = self.nuclei
        return [
            cell_hid(int(self.region_index[r]), int(j), int(k))
            for r, j, k in zip(n.region, n.patch, n.k, strict=True)
        ]


class FeatureStore:
    """Writer for one slide's store; reading complete stores goes through :func:`load_features`."""

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self.key = key

    @property
    def complete(self) -> bool:
        """True when the manifest exists: extraction finished."""
        return (self.path / MANIFEST).is_file()

    def open_or_create(
        self, hierarchy: Hierarchy, *, dims: dict[str, int], n_candidates: int, k: int
    ) -> npt.NDArray[np.bool_]:
        """Create the arrays for ``hierarchy`` or reopen an interrupted store.

        Returns the ``done`` flags, one per region, so the caller resumes where it stopped.

        Raises:
            FeatureStoreError: the folder holds a store with another key or region layout.
        """
        import zarr

        if (self.path / "zarr.json").is_file():
            group = zarr.open_group(self.path, mode="r")
            stored_key = group.attrs.get("key")
            index = _read(group, "regions/index")
            if stored_key != self.key or not np.array_equal(index, hierarchy.region_index):
                raise FeatureStoreError(
                    f"{self.path}: holds a different feature store (key {stored_key}); "
                    "remove the folder to extract again"
                )
            done = _read(group, "regions/done", bool)
            logger.info("%s: resuming, %d of %d region(s) done", self.path, done.sum(), done.size)
            return done

        self.path.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(self.path, mode="w")
        write_json_atomic(self.path / TISSUE, {"type": "Feature", "properties": {},
                                               "geometry": mapping(hierarchy.tissue)})
        r, p = hierarchy.patch_valid.shape

        def put(name: str, data: npt.NDArray[Any], chunks: tuple[int, ...]) -> None:
            arr = group.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype)
            arr[...] = data

        put("regions/index", hierarchy.region_index, (max(r, 1),))
        put("regions/box", hierarchy.region_boxes, (max(r, 1), 4))
        put("regions/tissue_fraction", hierarchy.region_tissue, (max(r, 1),))
        put("patches/box", hierarchy.patch_boxes, (1, p, 4))
        put("patches/tissue_fraction", hierarchy.patch_tissue, (1, p))
        put("patches/valid", hierarchy.patch_valid, (1, p))
        put("patches/on_slide", hierarchy.patch_on_slide, (1, p))
        group.create_array("patches/features", shape=(r, p, dims["patch"]), chunks=(1, p, dims["patch"]),
                           dtype="float32", fill_value=0.0)
        group.create_array("regions/features", shape=(r, dims["region"]), chunks=(1, dims["region"]),
                           dtype="float32", fill_value=0.0)
        group.create_array("selection/candidates", shape=(r, n_candidates), chunks=(1, n_candidates),
                           dtype="int16", fill_value=-1)
        group.create_array("selection/relevance", shape=(r, n_candidates), chunks=(1, n_candidates),
                           dtype="float32", fill_value=0.0)
        group.create_array("selection/selected", shape=(r, k), chunks=(1, k), dtype="int16", fill_value=-1)
        group.create_array("regions/done", shape=(r,), chunks=(1,), dtype="bool", fill_value=False)
        # The key goes in last: a folder without it was never a usable store.
        group.attrs.update({"schema_version": SCHEMA_VERSION, "key": self.key})
        return np.zeros(r, dtype=bool)

    def commit_region(self, record: RegionRecord, region_index: int) -> None:
        """Write one region's data, then mark it done (the commit point)."""
        import zarr

        group = zarr.open_group(self.path, mode="r+")
        r = record.position
        _array(group, "patches/features")[r] = record.patch_features
        _array(group, "regions/features")[r] = record.region_features
        for name, values, fill in (
            ("selection/candidates", record.candidates, -1),
            ("selection/relevance", record.relevance, 0),
            ("selection/selected", record.selected, -1),
        ):
            target = _array(group, name)
            row = np.full(target.shape[1], fill, dtype=target.dtype)
            row[: values.size] = values
            target[r] = row
        nuclei = group.require_group(f"nuclei/{region_hid(region_index)}")
        for name, data in (
            ("patch", record.nucleus_patch),
            ("centroid", record.nucleus_centroid),
            ("descriptor", record.nucleus_descriptor),
            ("polygon_offsets", record.polygon_offsets),
            ("polygon_xy", record.polygon_xy),
        ):
            chunks = tuple(max(1, s) for s in data.shape)
            arr = nuclei.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype,
                                      overwrite=True)
            if data.size:
                arr[...] = data
        _array(group, "regions/done")[r] = True

    def finish(self, manifest: dict[str, Any], wsi_features: npt.NDArray[np.float32]) -> None:
        """Write the slide vector, then the manifest (atomically): the store is complete."""
        import zarr

        group = zarr.open_group(self.path, mode="r+")
        arr = group.create_array("wsi/features", shape=wsi_features.shape,
                                 chunks=wsi_features.shape, dtype="float32", overwrite=True)
        arr[...] = wsi_features
        write_json_atomic(self.path / MANIFEST, manifest)

    def region_features(self) -> npt.NDArray[np.float32]:
        """All region vectors written so far (for the slide vector at the end)."""
        import zarr

        return _read(zarr.open_group(self.path, mode="r"), "regions/features", np.float32)

    def nucleus_count(self) -> int:
        """Nuclei committed so far, over all regions."""
        import zarr

        group = zarr.open_group(self.path, mode="r")
        index = _read(group, "regions/index")
        done = _read(group, "regions/done", bool)
        return sum(
            int(_array(group, f"nuclei/{region_hid(int(i))}/patch").shape[0])
            for i, d in zip(index, done, strict=True) if d
        )

    def discard(self) -> None:
        """Remove a store that never committed a region (nothing worth resuming)."""
        shutil.rmtree(self.path, ignore_errors=True)


def load_features(path: str | Path) -> SlideFeatures:
    """Load a complete feature store.

    Raises:
        FeatureStoreError: the folder is not a store, or the store is incomplete (no manifest).
    """
    import zarr

    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        what = "an incomplete feature store" if (root / "zarr.json").is_file() else "not a feature store"
        raise FeatureStoreError(f"{root}: {what} (no {MANIFEST}); run hwsi extract to finish it")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise FeatureStoreError(
            f"{root}: feature store schema {manifest.get('schema_version')} is not the supported "
            f"{SCHEMA_VERSION}; extract again"
        )
    group = zarr.open_group(root, mode="r")
    index = _read(group, "regions/index", np.int64)
    parts: dict[str, list[npt.NDArray[Any]]] = {
        "region": [], "patch": [], "k": [], "centroid": [], "descriptor": [], "offsets": [], "xy": []
    }
    vertex_base = 0
    for pos, i in enumerate(index):
        sub = f"nuclei/{region_hid(int(i))}"
        patch = _read(group, f"{sub}/patch", np.int16)
        offsets = _read(group, f"{sub}/polygon_offsets", np.int64)
        parts["region"].append(np.full(patch.shape, pos, dtype=np.int32))
        parts["patch"].append(patch)
        parts["k"].append(_rank_within(patch))
        parts["centroid"].append(_read(group, f"{sub}/centroid", np.float64).reshape(-1, 2))
        parts["descriptor"].append(_read(group, f"{sub}/descriptor", np.float32))
        parts["offsets"].append(offsets[:-1] + vertex_base)
        parts["xy"].append(_read(group, f"{sub}/polygon_xy", np.float64).reshape(-1, 2))
        vertex_base += int(offsets[-1])
    dim = int(manifest["encoders"]["nucleus"]["dim"])
    count = sum(len(p) for p in parts["patch"])
    nuclei = NucleusTable(
        region=np.concatenate(parts["region"]),
        patch=np.concatenate(parts["patch"]),
        k=np.concatenate(parts["k"]),
        centroid=np.concatenate(parts["centroid"]).reshape(count, 2),
        descriptor=np.concatenate(parts["descriptor"]).reshape(count, dim),
        polygon_offsets=np.append(np.concatenate(parts["offsets"]), vertex_base).astype(np.int64),
        polygon_xy=np.concatenate(parts["xy"]).reshape(-1, 2),
    )
    tissue_doc = json.loads((root / TISSUE).read_text(encoding="utf-8"))
    return SlideFeatures(
        path=root,
        provenance=manifest,
        tissue=shapely.make_valid(shape(tissue_doc["geometry"])),
        region_index=index,
        region_boxes=_read(group, "regions/box"),
        region_tissue=_read(group, "regions/tissue_fraction"),
        region_features=_read(group, "regions/features"),
        patch_boxes=_read(group, "patches/box"),
        patch_tissue=_read(group, "patches/tissue_fraction"),
        patch_valid=_read(group, "patches/valid", bool),
        patch_features=_read(group, "patches/features"),
        candidates=_read(group, "selection/candidates"),
        relevance=_read(group, "selection/relevance"),
        selected=_read(group, "selection/selected"),
        nuclei=nuclei,
        wsi_features=_read(group, "wsi/features"),
    )


def _rank_within(patch: npt.NDArray[np.int16]) -> npt.NDArray[np.int32]:
    """Index ``k`` of each nucleus inside its patch; rows are stored in (patch, k) order."""
    k = np.zeros(patch.shape, dtype=np.int32)
    if patch.size:
        starts = np.r_[0, np.flatnonzero(np.diff(patch)) + 1]
        lengths = np.diff(np.r_[starts, patch.size])
        k = (np.arange(patch.size) - np.repeat(starts, lengths)).astype(np.int32)
    return k
