"""The demo recipe as functions: reusable data, and the scale ablation's starting folders."""

from __future__ import annotations

import json

import pytest
from tiny import save_tiny, tiny_model

from omero_hwsi.analysis import DEFAULT_MODEL
from omero_hwsi.model import HwsiConfig
from omero_hwsi.training.demo_recipe import RECIPE, prepare_data, set_visual_scales


def test_the_shipped_demo_model_was_made_by_the_current_recipe():
    """Changing the recipe means retraining and reinstalling the demo model."""
    shipped = json.loads((DEFAULT_MODEL / "demo_recipe.json").read_text(encoding="utf-8"))
    assert shipped["recipe"] == json.loads(json.dumps(RECIPE))
    assert shipped["steps_scale"] == 1.0 and shipped["slides"] == RECIPE["train_slides"]


def test_set_visual_scales_changes_only_what_the_llm_reads(tmp_path):
    model, processor = tiny_model()
    source = save_tiny(tmp_path / "source", model, processor)
    target = set_visual_scales(source, tmp_path / "arm", ["region", "wsi"])
    config = HwsiConfig.from_pretrained(str(target), local_files_only=True)
    assert config.scales == ("region", "wsi")
    assert HwsiConfig.from_pretrained(str(source), local_files_only=True).visual_scales is None
    assert (target / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="include wsi"):
        set_visual_scales(source, tmp_path / "bad", ["cell"])


def test_prepare_data_reuses_only_a_finished_identical_dataset(tmp_path):
    logged: list[str] = []
    out = prepare_data(tmp_path / "d", slides=1, seed=3, split="train", log=logged.append)
    slide = next((out / "data" / "slides").glob("*.svs"))
    store = next(p for p in (out / "features").iterdir() if p.is_dir())
    assert json.loads((out / "data_done.json").read_text()) == {"slides": 1, "seed": 3,
                                                                "split": "train"}
    prepare_data(out, slides=1, seed=3, split="train", reuse=True, log=logged.append)
    assert logged[-1].startswith("reusing") and slide.exists() and store.exists()
    (out / "data_done.json").unlink()  # an unfinished earlier run is never reused
    prepare_data(out, slides=1, seed=3, split="train", reuse=True, log=logged.append)
    assert not logged[-1].startswith("reusing")
