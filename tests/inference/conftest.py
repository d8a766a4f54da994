"""A small multi-region feature store and tiny models for the inference tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import tiny_text_config, tiny_tokenizer

from omero_hwsi.features.extract import ExtractionConfig, extract_slide
from omero_hwsi.features.store import SlideFeatures, load_features
from omero_hwsi.model import HwsiConfig, HwsiForConditionalGeneration, HwsiProcessor
from omero_hwsi.slide.grid import GridSpec

# The CMU fixture is one 4096 px region at the default grid; a 1024/256 px grid gives several
# regions of 16 patches, enough for hierarchical evidence.
GRID = GridSpec(region_px=1024, patch_px=256)


@pytest.fixture(scope="session")
def small_store(fixture_slide, tmp_path_factory) -> SlideFeatures:
    result = extract_slide(fixture_slide("CMU-1-Small-Region.svs"), tmp_path_factory.mktemp("fs"),
                           grid=GRID, config=ExtractionConfig(workers=0, n_candidates=8, k=4))
    return load_features(result.path)


def tiny_model(*, fusion: str = "concat", layout: str = "hwsi", family: str = "llama",
               seed: int = 0, **overrides: object) -> tuple[HwsiForConditionalGeneration, HwsiProcessor]:
    """A tiny model over the built-in feature dims (patch 32, region 64, cell 11), eval mode."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    processor = HwsiProcessor(tokenizer, prompt_layout=layout, fusion_mode=fusion, num_queries=8,
                              token_budget=256)
    config = HwsiConfig(
        text_config=tiny_text_config(family, vocab_size=len(tokenizer)),
        wsi_dim=64, region_dim=64, patch_dim=32, cell_dim=11, ccaf_dim=16, projector_hidden=32,
        fusion_mode=fusion, num_queries=8, resampler_heads=4, token_budget=256,
        prompt_layout=layout, align_dim=16, max_cells=16, **overrides,
    )
    return HwsiForConditionalGeneration(config).eval(), processor


def save_tiny(path: Path, model: HwsiForConditionalGeneration, processor: HwsiProcessor) -> Path:
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
