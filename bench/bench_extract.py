"""Patch throughput: the streaming extractor vs a plain OpenSlide read_region loop.

Both sides compute the same descriptor (``hed_texture``) for the same patches of a synthetic
0.5 um/px slide, and the script checks the features agree before printing ratios:

    plain loop   : for each valid patch, openslide read_region (256 px) + encode one patch
    ours, 1 proc : extract_slide(workers=0)  (open, tissue, grid, read rows, encode, select,
                   region vector, store commit; nuclei off so both sides compute the same thing)
    ours, 2 procs: extract_slide(workers=2)

Targets (issue 2): >= 0.9x with one process, >= 1.6x with two workers. Run: make bench.
"""

from __future__ import annotations

import argparse
import shutil
import time

import numpy as np
import openslide
from _common import OUTPUT, synthetic

from omero_hwsi.features.extract import ExtractionConfig, extract_slide
from omero_hwsi.features.registry import create_encoder
from omero_hwsi.features.store import load_features
from omero_hwsi.slide.grid import GridSpec
from omero_hwsi.slide.hierarchy import build_hierarchy
from omero_hwsi.slide.local import open_slide


def plain_loop(path: str, boxes: np.ndarray) -> tuple[np.ndarray, float]:
    encoder = create_encoder("hed_texture")
    started = time.perf_counter()
    slide = openslide.OpenSlide(path)
    out = np.empty((len(boxes), encoder.dim), dtype=np.float32)
    for n, (x, y, _, _) in enumerate(boxes):
        rgba = np.asarray(slide.read_region((int(x), int(y)), 0, (256, 256)))
        out[n] = encoder.encode(np.ascontiguousarray(rgba[None, ..., :3]))[0]
    return out, time.perf_counter() - started


def ours(path: str, workers: int) -> tuple[np.ndarray, float, int]:
    target = OUTPUT / f"store-w{workers}"
    shutil.rmtree(target, ignore_errors=True)
    started = time.perf_counter()
    result = extract_slide(path, target, config=ExtractionConfig(workers=workers, segmenter=None))
    seconds = time.perf_counter() - started
    features = load_features(result.path)
    shutil.rmtree(target, ignore_errors=True)
    return features.patch_features[features.patch_valid], seconds, result.patches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16000, help="slide side in px at 0.5 um/px")
    args = parser.parse_args()
    path = str(synthetic(f"bench-{args.size}.svs", width=args.size, height=args.size, mpp=0.5, seed=11))
    with open_slide(path) as slide:
        hierarchy = build_hierarchy(slide, GridSpec())
    boxes = hierarchy.patch_boxes[hierarchy.patch_valid]
    print(f"slide {args.size} x {args.size} px at 0.5 um/px: {len(boxes)} tissue patches")

    reference, t_plain = plain_loop(path, boxes)
    rows = [("plain openslide loop", t_plain, 1.0)]
    for workers in (0, 2):
        features, seconds, n = ours(path, workers)
        assert n == len(boxes)
        np.testing.assert_allclose(features, reference, rtol=1e-4, atol=1e-4)
        rows.append((f"ours, {'1 process' if workers == 0 else f'{workers} workers'}",
                     seconds, t_plain / seconds))
    print(f"{'method':<24} {'seconds':>8} {'patches/s':>10} {'ratio':>6}")
    for name, seconds, ratio in rows:
        print(f"{name:<24} {seconds:8.2f} {len(boxes) / seconds:10.1f} {ratio:6.2f}x")
    print("features identical on both sides (allclose 1e-4)")


if __name__ == "__main__":
    main()
