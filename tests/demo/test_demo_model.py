"""The embedded demo model: present, small, loadable, on the demo grid; and its recipe runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from omero_hwsi.analysis import DEFAULT_MODEL, default_model
from omero_hwsi.inference import HwsiPipeline
from omero_hwsi.synthetic.pathology import DEMO_GRID

ROOT = Path(__file__).resolve().parents[2]


def test_the_default_model_ships_small_and_records_its_grid():
    folder = default_model()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 10 * 2**20
    pipeline = HwsiPipeline.from_pretrained(folder, device="cpu")
    grid = pipeline.model.config.expected_features["grid"]
    assert (grid["region_px"], grid["patch_px"]) == (DEMO_GRID.region_px, DEMO_GRID.patch_px)
    recipe = json.loads((DEFAULT_MODEL / "demo_recipe.json").read_text())
    assert recipe["recipe"]["seed"] == 0 and recipe["slides"] >= 64
    assert (folder / "text_encoder.safetensors").is_file()


def _run_recipe(work: Path) -> Path:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_demo_model.py"), "--work", str(work),
         "--slides", "4", "--steps-scale", "0.01"],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return work / "stage3" / "final"


@pytest.mark.slow
def test_the_recipe_runs_end_to_end_and_repeats_byte_for_byte(tmp_path):
    final = _run_recipe(tmp_path / "first")
    assert (final / "model.safetensors").is_file() and (final / "demo_recipe.json").is_file()
    pipeline = HwsiPipeline.from_pretrained(final, device="cpu")
    assert pipeline.model.config.cell_fusion == "ccaf"
    assert not any("lora" in k for k in pipeline.model.state_dict())
    # Same machine, same versions: the same weights, which is what lets the shipped model be
    # checked against its recipe.
    again = _run_recipe(tmp_path / "second")
    assert (again / "model.safetensors").read_bytes() == (final / "model.safetensors").read_bytes()
