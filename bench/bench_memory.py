"""Memory and time of a full extraction on a large synthetic slide (written tile by tile).

Runs ``hwsi extract`` (nuclei included, 2 workers) on a >= 40,000 x 40,000 px slide in a child
process and samples the summed PSS of it and its workers. As a same-run reference for the time,
the plain OpenSlide read_region + descriptor loop of bench_extract.py runs over the first
2,000 tissue patches. Target (issue 2): peak PSS < 1.5 GB. Run: make bench.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import OUTPUT, PssSampler, synthetic
from bench_extract import plain_loop

from omero_hwsi.slide.grid import GridSpec
from omero_hwsi.slide.hierarchy import build_hierarchy
from omero_hwsi.slide.local import open_slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=40000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    path = synthetic(f"bench-{args.size}.svs", width=args.size, height=args.size, mpp=0.5, seed=12)
    store = OUTPUT / "memory-store"
    shutil.rmtree(store, ignore_errors=True)
    env = {**os.environ, "HWSI_EXTRACT_WORKERS": str(args.workers), "HWSI_DATA_DIR": str(OUTPUT / "data")}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "omero_hwsi.cli", "extract", str(path), "--out", str(store)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    with PssSampler(proc.pid) as sampler:
        stdout, _ = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"extraction failed with exit code {proc.returncode}")
    manifest = json.loads((Path(stdout.strip()) / "manifest.json").read_text())
    patches = manifest["counts"]["patches"]
    with open_slide(path) as slide:
        hierarchy = build_hierarchy(slide, GridSpec())
    sample = hierarchy.patch_boxes[hierarchy.patch_valid][:2000]
    _, t_plain = plain_loop(str(path), sample)
    plain_per_1000 = t_plain / len(sample) * 1000
    ours_per_1000 = seconds / patches * 1000
    print(f"slide {args.size} x {args.size} px: {manifest['counts']['regions']} regions, "
          f"{patches} tissue patches, {manifest['counts']['nuclei']} nuclei")
    print(f"full extraction ({args.workers} workers, nuclei on): {seconds:.1f} s, "
          f"{ours_per_1000:.2f} s per 1,000 patches")
    print(f"plain openslide loop (descriptor only, no nuclei): {plain_per_1000:.2f} s per 1,000 patches"
          f" -> ratio plain/ours {plain_per_1000 / ours_per_1000:.2f}x")
    print(f"peak PSS over all processes: {sampler.peak / 2**20:.0f} MiB (target < 1,536 MiB)")
    shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
