from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import zarr

from omero_hwsi.errors import FeatureStoreError, NoTissueError, SlideReadError
from omero_hwsi.features.extract import ExtractionConfig, extract_slide
from omero_hwsi.features.store import load_features
from omero_hwsi.slide.grid import GridSpec

SMALL_GRID = GridSpec(region_px=1024, patch_px=256)  # 4x4 patches: many small regions, fast


class Interrupt(Exception):
    pass


def test_cmu_store_holds_every_scale(fixture_slide, tmp_path):
    result = extract_slide(fixture_slide("CMU-1-Small-Region.svs"), tmp_path,
                           config=ExtractionConfig(workers=0))
    features = load_features(result.path)
    assert features.region_ids == ["r0"]
    valid = features.patch_valid[0]
    assert valid.sum() == result.patches
    assert np.abs(features.patch_features[0][valid]).sum(axis=1).min() > 0
    assert not features.patch_features[0][~valid].any()
    selected = features.selected[0][features.selected[0] >= 0]
    assert selected.size == min(16, valid.sum())
    assert set(selected) <= set(features.candidates[0][features.candidates[0] >= 0])
    assert valid[selected].all()
    assert len(features.nuclei) == result.nuclei > 0
    # Nuclei lie inside their own patch and have ids r0.p<j>.c<k> ordered by centroid.
    for n in range(len(features.nuclei)):
        x, y, w, h = features.patch_boxes[0, features.nuclei.patch[n]]
        cx, cy = features.nuclei.centroid[n]
        assert x <= cx <= x + w and y <= cy <= y + h
    assert features.nucleus_ids()[0].startswith("r0.p")
    assert features.wsi_features.shape == features.region_features.shape[1:]
    provenance = features.provenance
    assert provenance["slide"]["sha256"] and provenance["slide"]["mpp"] == pytest.approx(0.499)
    assert provenance["encoders"]["patch"]["id"] == "hed_texture"
    assert provenance["grid"]["level0_per_px"] == 1.0


def test_rerun_with_the_same_inputs_does_nothing(fixture_slide, tmp_path):
    path = fixture_slide("CMU-1-Small-Region.svs")
    first = extract_slide(path, tmp_path, config=ExtractionConfig(workers=0))
    stamp = (first.path / "manifest.json").stat().st_mtime_ns
    again = extract_slide(path, tmp_path, config=ExtractionConfig(workers=0))
    assert again.already_complete and again.path == first.path
    assert (first.path / "manifest.json").stat().st_mtime_ns == stamp


def test_different_parameters_make_a_separate_store(fixture_slide, tmp_path):
    path = fixture_slide("CMU-1-Small-Region.svs")
    a = extract_slide(path, tmp_path, config=ExtractionConfig(workers=0))
    b = extract_slide(path, tmp_path, config=ExtractionConfig(workers=0, k=8))
    assert a.path != b.path and a.path.exists() and b.path.exists()


def test_interrupted_extraction_resumes_and_matches_a_clean_run(synthetic_slide, tmp_path):
    slide = synthetic_slide(width=4000, height=3000, seed=5)
    calls = []

    def stop_after_two(stage, done, total):
        calls.append(done)
        if done == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        extract_slide(slide, tmp_path / "a", grid=SMALL_GRID,
                      config=ExtractionConfig(workers=0), progress=stop_after_two)
    (store,) = [p for p in (tmp_path / "a").iterdir() if p.is_dir()]
    assert not (store / "manifest.json").exists()
    with pytest.raises(FeatureStoreError, match="incomplete"):
        load_features(store)
    assert zarr.open_group(store, mode="r")["regions/done"][:].sum() == 2

    resumed = extract_slide(slide, tmp_path / "a", grid=SMALL_GRID, config=ExtractionConfig(workers=0))
    assert resumed.regions_resumed == 2 and resumed.path == store
    clean = extract_slide(slide, tmp_path / "b", grid=SMALL_GRID, config=ExtractionConfig(workers=2))
    a, b = load_features(resumed.path), load_features(clean.path)
    assert resumed.nuclei == clean.nuclei == len(a.nuclei)
    # Float32 sums may round differently in another process (SIMD alignment): allow 1 ulp.
    np.testing.assert_allclose(a.patch_features, b.patch_features, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.selected, b.selected)
    np.testing.assert_allclose(a.region_features, b.region_features, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.nuclei.polygon_xy, b.nuclei.polygon_xy)


@pytest.mark.slow
def test_killed_extraction_keeps_committed_regions(synthetic_slide, tmp_path):
    """A SIGKILL mid-run (a crashed worker node) loses only regions in flight."""
    slide = synthetic_slide(width=6000, height=6000, seed=6)
    out = tmp_path / "features"
    code = (
        "import sys\n"
        "from omero_hwsi.features.extract import ExtractionConfig, extract_slide\n"
        "from omero_hwsi.slide.grid import GridSpec\n"
        "def progress(stage, done, total):\n"
        "    print(done, flush=True)\n"
        f"extract_slide({str(slide)!r}, {str(out)!r}, grid=GridSpec(region_px=1024),\n"
        "              config=ExtractionConfig(workers=0), progress=progress)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if int(line) >= 3:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (store,) = [p for p in out.iterdir() if p.is_dir()]
    done = int(zarr.open_group(store, mode="r")["regions/done"][:].sum())
    assert done >= 3 and not (store / "manifest.json").exists()
    result = extract_slide(slide, out, grid=SMALL_GRID, config=ExtractionConfig(workers=0))
    assert result.regions_resumed == done
    assert load_features(result.path).region_features.shape[0] == result.regions


def test_workers_and_in_process_give_identical_stores(synthetic_slide, tmp_path):
    slide = synthetic_slide(width=3000, height=2500, seed=7)
    a = extract_slide(slide, tmp_path / "a", grid=SMALL_GRID, config=ExtractionConfig(workers=0))
    b = extract_slide(slide, tmp_path / "b", grid=SMALL_GRID, config=ExtractionConfig(workers=2))
    fa, fb = load_features(a.path), load_features(b.path)
    np.testing.assert_allclose(fa.patch_features, fb.patch_features, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(fa.candidates, fb.candidates)
    assert fa.nucleus_ids() == fb.nucleus_ids()


@pytest.mark.parametrize(
    ("name", "mpp", "error"),
    [("small.svs", None, NoTissueError), ("unreadable.svs", None, SlideReadError),
     ("boxes.tiff", 0.5, NoTissueError)],
)
def test_bad_slides_leave_nothing_on_disk(fixture_slide, tmp_path, name, mpp, error):
    with pytest.raises(error):
        extract_slide(fixture_slide(name), tmp_path, mpp=mpp)
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]


def test_manifest_is_strict_json(fixture_slide, tmp_path):
    result = extract_slide(fixture_slide("CMU-1-Small-Region.svs"), tmp_path,
                           config=ExtractionConfig(workers=0))
    manifest = json.loads((result.path / "manifest.json").read_text(), parse_constant=_refuse)
    assert manifest["key"] == result.key
    assert manifest["counts"]["regions"] == 1


def _refuse(value: str) -> None:
    raise AssertionError(f"non-standard JSON constant {value}")


def test_store_without_nuclei_loads(fixture_slide, tmp_path):
    result = extract_slide(fixture_slide("CMU-1-Small-Region.svs"), tmp_path,
                           config=ExtractionConfig(workers=0, segmenter=None))
    features = load_features(result.path)
    assert len(features.nuclei) == 0 and features.nuclei.descriptor.shape == (0, 0)
    assert features.provenance["encoders"]["nucleus"]["id"] == "none"
