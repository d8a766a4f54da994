"""Streaming feature extraction: regions go to worker processes, results to the store.

Why per region: selection, nuclei and the region vector all need one region's patches
together, and a region is also the store's commit unit. Each worker opens the slide once,
reads each patch row of a region in one call (OpenSlide decodes each JPEG tile once instead
of once per overlapping patch), encodes its patches in one batch, selects candidates,
segments nuclei in them and returns only small arrays. The main process writes to the store
and marks the region done, so a crash loses at most the regions in flight and at most
``2 * workers`` regions' pixels are in memory at once.

Built-in encoders are numpy-only: CPU extraction workers never import torch. A learned
encoder is created inside each worker by the same registry call (``workers=0`` runs it in
the calling process, e.g. on a GPU worker).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from filelock import FileLock
from shapely.geometry.base import BaseGeometry

from omero_hwsi import __version__
from omero_hwsi._types import ProgressFn, RGBArray
from omero_hwsi.features.registry import create_encoder
from omero_hwsi.features.selection import select_patches
from omero_hwsi.features.store import SCHEMA_VERSION, FeatureStore, RegionRecord, store_key
from omero_hwsi.slide.grid import GridSpec
from omero_hwsi.slide.hierarchy import Hierarchy, build_hierarchy, restrict_to
from omero_hwsi.slide.local import LocalSlide, open_slide, slide_checksum
from omero_hwsi.slide.nuclei import ClassicalNucleusSegmenter, NucleusSegmenter
from omero_hwsi.slide.reader import resample_area
from omero_hwsi.slide.tissue import TissueParams

__all__ = ["ExtractionConfig", "ExtractionResult", "extract_slide", "prepare_slide"]

logger = logging.getLogger(__name__)

REGION_PICTURE_PX = 4
"""Each patch becomes 4 x 4 px of the region picture handed to the region encoder."""


@dataclass(frozen=True, slots=True)
class ExtractionConfig:
    """Which encoders run and how selection and parallelism are set."""

    patch_encoder: str = "hed_texture"
    region_encoder: str = "layout"
    segmenter: str | None = "classical"
    n_candidates: int = 32
    k: int = 16
    workers: int = 2


@dataclass(frozen=True, slots=True)
class ExtractionResult:
    """What one call did: where the store is, and how much was (re)computed."""

    path: Path
    key: str
    slide: str
    already_complete: bool
    regions: int
    regions_resumed: int
    patches: int
    nuclei: int
    seconds: float


@dataclass(frozen=True, slots=True)
class _SlideJob:
    """Everything a worker needs to serve regions of one slide (picklable, JSON-like)."""

    path: str
    mpp: float | None
    mpp_tolerance: float
    target_mpp: float
    patch_px: int
    patches_per_side: int
    patch_encoder: str
    region_encoder: str
    segmenter: str | None
    n_candidates: int
    k: int


@dataclass(frozen=True, slots=True)
class _RegionTask:
    position: int
    region_index: int
    patch_boxes: npt.NDArray[np.float64]
    patch_valid: npt.NDArray[np.bool_]
    patch_tissue: npt.NDArray[np.float32]


def make_segmenter(name: str | None) -> NucleusSegmenter | None:
    """The nucleus segmenter called ``name`` (``None`` disables nuclei)."""
    if name is None:
        return None
    if name == "classical":
        return ClassicalNucleusSegmenter()
    raise ValueError(f"unknown nucleus segmenter {name!r}; known: classical")


@dataclass
class _Worker:
    """Per-process state: the open slide and encoders, created once."""

    job: _SlideJob
    slide: LocalSlide = field(init=False)
    patch_encoder: Any = field(init=False)
    region_encoder: Any = field(init=False)
    segmenter: NucleusSegmenter | None = field(init=False)
    queries: npt.NDArray[np.float32] = field(init=False)

    def __post_init__(self) -> None:
        self.slide = open_slide(self.job.path, mpp=self.job.mpp, mpp_tolerance=self.job.mpp_tolerance)
        self.patch_encoder = create_encoder(self.job.patch_encoder)
        self.region_encoder = create_encoder(self.job.region_encoder)
        self.segmenter = make_segmenter(self.job.segmenter)
        self.queries = self.patch_encoder.query_bank()[1]

    def read_patches(self, task: _RegionTask) -> dict[int, RGBArray]:
        """Pixels of the valid patches, one read per run of consecutive valid patches in a row."""
        pps, px, mpp = self.job.patches_per_side, self.job.patch_px, self.job.target_mpp
        valid = task.patch_valid.reshape(pps, pps)
        out: dict[int, RGBArray] = {}
        for row in range(pps):
            cols = np.flatnonzero(valid[row])
            for run in np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1):
                if run.size == 0:
                    continue
                first = row * pps + int(run[0])
                x, y = task.patch_boxes[first, :2]
                strip = self.slide.read_region((x, y), (px * run.size, px), mpp)
                for n, col in enumerate(run):
                    out[row * pps + int(col)] = strip[:, n * px : (n + 1) * px]
        return out

    def process(self, task: _RegionTask) -> RegionRecord:
        pps = self.job.patches_per_side
        patches = self.read_patches(task)
        order = np.array(sorted(patches), dtype=np.int64)
        features = np.zeros((pps * pps, self.patch_encoder.dim), dtype=np.float32)
        if order.size:
            batch = np.stack([patches[j] for j in order])
            features[order] = self.patch_encoder.encode(batch)
        selection = select_patches(
            features[order], self.queries, n_candidates=self.job.n_candidates, k=self.job.k
        )
        candidates = order[selection.candidates]
        selected = order[selection.selected]

        picture = np.full((pps * REGION_PICTURE_PX, pps * REGION_PICTURE_PX, 3), 255, np.uint8)
        size = (REGION_PICTURE_PX, REGION_PICTURE_PX)
        for j, pixels in patches.items():
            r, c = divmod(j, pps)
            picture[r * REGION_PICTURE_PX : (r + 1) * REGION_PICTURE_PX,
                    c * REGION_PICTURE_PX : (c + 1) * REGION_PICTURE_PX] = resample_area(pixels, size)
        tissue = task.patch_tissue.reshape(1, pps, pps).astype(np.float32)
        region_vector = self.region_encoder.encode(picture[None], tissue)[0]

        nucleus_rows = self.segment(task, patches, np.sort(candidates))
        return RegionRecord(
            position=task.position,
            patch_features=features,
            candidates=candidates,
            relevance=selection.relevance.astype(np.float32),
            selected=selected,
            region_features=np.asarray(region_vector, dtype=np.float32),
            **nucleus_rows,
        )

    def segment(
        self, task: _RegionTask, patches: dict[int, RGBArray], candidates: npt.NDArray[np.int64]
    ) -> dict[str, Any]:
        """Nuclei of every candidate patch, mapped to level-0 px, rows in (patch, k) order."""
        dim = len(self.segmenter.descriptor_names) if self.segmenter else 0
        patch_ids: list[npt.NDArray[np.int16]] = []
        centroids: list[npt.NDArray[np.float64]] = []
        descriptors: list[npt.NDArray[np.float32]] = []
        polygons: list[npt.NDArray[np.float64]] = []
        if self.segmenter is not None:
            for j in candidates:
                x, y, w, _ = task.patch_boxes[j]
                scale = w / self.job.patch_px
                found = self.segmenter.segment(patches[int(j)], mpp=scale * self.slide.mpp)
                if len(found) == 0:
                    continue
                patch_ids.append(np.full(len(found), j, dtype=np.int16))
                centroids.append(found.centroids * scale + (x, y))
                descriptors.append(found.descriptors)
                polygons.extend(poly * scale + (x, y) for poly in found.polygons)
        lengths = np.array([len(p) for p in polygons], dtype=np.int64)
        return {
            "nucleus_patch": np.concatenate(patch_ids) if patch_ids else np.zeros(0, np.int16),
            "nucleus_centroid": np.concatenate(centroids) if centroids else np.zeros((0, 2)),
            "nucleus_descriptor": (
                np.concatenate(descriptors).astype(np.float32) if descriptors
                else np.zeros((0, dim), np.float32)
            ),
            "polygon_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "polygon_xy": np.concatenate(polygons) if polygons else np.zeros((0, 2)),
        }


_WORKER: _Worker | None = None


def _init_worker(job: _SlideJob) -> None:
    global _WORKER
    # One thread per worker process: the pool is the parallelism, OpenCV's threads on top of
    # it would only oversubscribe the cores.
    cv2.setNumThreads(1)
    _WORKER = _Worker(job)


def _run_task(task: _RegionTask) -> RegionRecord:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.process(task)


def prepare_slide(
    path: str | os.PathLike[str],
    grid: GridSpec,
    *,
    mpp: float | None = None,
    mpp_tolerance: float = 0.05,
    restrict: BaseGeometry | None = None,
    tissue_params: TissueParams | None = None,
) -> Hierarchy:
    """Open a slide and build its hierarchy (restricted when ``restrict`` is given).

    Raises:
        InputError subclasses for every unusable slide (see :func:`open_slide`,
        :func:`build_hierarchy`, :func:`restrict_to`).
    """
    with open_slide(path, mpp=mpp, mpp_tolerance=mpp_tolerance) as slide:
        hierarchy = build_hierarchy(slide, grid, tissue_params=tissue_params)
    return restrict_to(hierarchy, restrict) if restrict is not None else hierarchy


def _identity(
    checksum: str, hierarchy: Hierarchy, config: ExtractionConfig, encoders: dict[str, Any],
    tissue_params: TissueParams, mpp_tolerance: float,
) -> dict[str, Any]:
    restriction = hierarchy.restricted_to
    return {
        "slide_sha256": checksum,
        "mpp": hierarchy.slide.mpp,
        "mpp_tolerance": mpp_tolerance,
        "grid": hierarchy.grid.to_dict(),
        "tissue": asdict(tissue_params),
        "encoders": {k: {"id": v["id"], "version": v["version"]} for k, v in encoders.items()},
        "selection": {"n_candidates": config.n_candidates, "k": config.k},
        "restricted_to": None if restriction is None else restriction.wkt,
    }


def _query_names(name: str) -> tuple[str, ...]:
    encoder: Any = create_encoder(name)
    return tuple(encoder.query_bank()[0])


def _describe(name: str) -> dict[str, Any]:
    enc = create_encoder(name)
    return {"id": enc.encoder_id, "version": enc.version, "dim": enc.dim, "name": name}


def extract_slide(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    grid: GridSpec | None = None,
    config: ExtractionConfig | None = None,
    mpp: float | None = None,
    mpp_tolerance: float = 0.05,
    restrict: BaseGeometry | None = None,
    tissue_params: TissueParams | None = None,
    progress: ProgressFn | None = None,
) -> ExtractionResult:
    """Extract one slide's features into ``out_dir/<key>``, resuming an interrupted run.

    Everything that can fail on bad input (opening, MPP, tissue, regions) is checked before
    the store folder is created, so bad input leaves nothing on disk.

    Raises:
        InputError subclasses for unusable slides; SlideReadError if pixels fail mid-way (the
        regions committed so far are kept for a resume).
    """
    started = time.perf_counter()
    grid = grid or GridSpec()
    config = config or ExtractionConfig()
    tissue_params = tissue_params or TissueParams()
    slide_path = Path(path)
    hierarchy = prepare_slide(slide_path, grid, mpp=mpp, mpp_tolerance=mpp_tolerance,
                              restrict=restrict, tissue_params=tissue_params)
    checksum = slide_checksum(slide_path)
    encoders = {"patch": _describe(config.patch_encoder), "region": _describe(config.region_encoder)}
    segmenter = make_segmenter(config.segmenter)
    encoders["nucleus"] = {
        "id": segmenter.segmenter_id if segmenter else "none",
        "version": segmenter.version if segmenter else "0",
        "dim": len(segmenter.descriptor_names) if segmenter else 0,
        "descriptor_names": list(segmenter.descriptor_names) if segmenter else [],
    }
    encoders["wsi"] = {"id": "mean_of_regions", "version": "1", "dim": encoders["region"]["dim"]}
    identity = _identity(checksum, hierarchy, config, encoders, tissue_params, mpp_tolerance)
    key = store_key(identity)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    store = FeatureStore(root / key[:24], key)
    with FileLock(str(root / f".{key[:24]}.lock")):
        if store.complete:
            logger.info("%s: feature store %s is complete; nothing to do", slide_path.name, store.path)
            manifest = json.loads((store.path / "manifest.json").read_text(encoding="utf-8"))
            return ExtractionResult(store.path, key, slide_path.name, True, hierarchy.n_regions,
                                    hierarchy.n_regions, hierarchy.n_valid_patches,
                                    int(manifest["counts"]["nuclei"]), time.perf_counter() - started)
        done = store.open_or_create(
            hierarchy,
            dims={"patch": encoders["patch"]["dim"], "region": encoders["region"]["dim"]},
            n_candidates=config.n_candidates, k=config.k,
        )
        resumed = int(done.sum())
        job = _SlideJob(
            path=str(slide_path), mpp=mpp, mpp_tolerance=mpp_tolerance, target_mpp=grid.target_mpp,
            patch_px=grid.patch_px, patches_per_side=grid.patches_per_side,
            patch_encoder=config.patch_encoder, region_encoder=config.region_encoder,
            segmenter=config.segmenter, n_candidates=config.n_candidates, k=config.k,
        )
        tasks = [
            _RegionTask(r, int(hierarchy.region_index[r]), hierarchy.patch_boxes[r],
                        hierarchy.patch_valid[r], hierarchy.patch_tissue[r])
            for r in range(hierarchy.n_regions) if not done[r]
        ]
        total = hierarchy.n_regions
        finished = resumed
        if progress:
            progress("regions", finished, total)
        nuclei = 0
        try:
            for record in _run_tasks(job, tasks, config.workers):
                store.commit_region(record, int(hierarchy.region_index[record.position]))
                nuclei += int(record.nucleus_patch.size)
                finished += 1
                if progress:
                    progress("regions", finished, total)
        except BaseException:
            if finished == 0:
                store.discard()
            raise
        if resumed:
            nuclei = store.nucleus_count()
        region_vectors = store.region_features()
        wsi = region_vectors.mean(axis=0).astype(np.float32)
        seconds = time.perf_counter() - started
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "key": key,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "software": {"omero_hwsi": __version__},
            "slide": {"path": str(slide_path.resolve()), "sha256": checksum, **hierarchy.slide.to_dict()},
            "grid": {**grid.to_dict(), "level0_per_px": hierarchy.level0_per_px,
                     "rows": hierarchy.grid_rows, "cols": hierarchy.grid_cols},
            "tissue": identity["tissue"],
            "restricted_to": identity["restricted_to"],
            "encoders": encoders,
            "selection": {"n_candidates": config.n_candidates, "k": config.k,
                          "rule": "diversity (farthest point, cosine) then relevance to the encoder's query bank",
                          "queries": list(_query_names(config.patch_encoder))},
            "counts": {"regions": hierarchy.n_regions, "patches": hierarchy.n_valid_patches,
                       "nuclei": nuclei},
            "timings": {"seconds": round(seconds, 3), "regions_resumed": resumed},
        }
        store.finish(manifest, wsi)
    logger.info("%s: features in %s (%.1f s)", slide_path.name, store.path, seconds)
    return ExtractionResult(store.path, key, slide_path.name, False, hierarchy.n_regions, resumed,
                            hierarchy.n_valid_patches, nuclei, seconds)


def _run_tasks(job: _SlideJob, tasks: list[_RegionTask], workers: int) -> Iterator[RegionRecord]:
    """Run region tasks in-process (``workers == 0``) or on a bounded spawn pool."""
    if not tasks:
        return
    if workers <= 0:
        worker = _Worker(job)
        try:
            for task in tasks:
                yield worker.process(task)
        finally:
            worker.slide.close()
        return
    # spawn, not fork: a parent that loaded torch or holds OpenSlide handles must not be forked.
    context = multiprocessing.get_context("spawn")
    n = min(workers, len(tasks))
    with ProcessPoolExecutor(n, mp_context=context, initializer=_init_worker, initargs=(job,)) as pool:
        pending: set[Future[RegionRecord]] = set()
        queue = iter(tasks)
        try:
            for task in queue:
                pending.add(pool.submit(_run_task, task))
                if len(pending) >= 2 * n:
                    break
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()
                    nxt = next(queue, None)
                    if nxt is not None:
                        pending.add(pool.submit(_run_task, nxt))
        finally:
            for future in pending:
                future.cancel()
