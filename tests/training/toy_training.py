"""Tiny, hand-built training inputs: feature stores, a WSI-Bench file, a model folder.

Stores are written through the real ``FeatureStore`` writer (regions of 2 x 2 patches of
256 px at 0.5 um/px), so ``index_stores``, ``load_features`` and ``visual_inputs`` read them
exactly as they read extracted ones; only the numbers are random (seeded per slide).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from shapely.geometry import box
from tiny import tiny_text_config, tiny_tokenizer

from omero_hwsi.features.store import FeatureStore, RegionRecord
from omero_hwsi.model import HwsiConfig, HwsiForConditionalGeneration, HwsiProcessor
from omero_hwsi.model.losses import TextEncoder
from omero_hwsi.model.text_tower import save_text_encoder
from omero_hwsi.slide.grid import GridSpec
from omero_hwsi.slide.hierarchy import Hierarchy
from omero_hwsi.slide.reader import SlideInfo
from omero_hwsi.training.config import TrainConfig, load_train_config

DIMS = {"region": 8, "patch": 6, "cell": 5}
ANSWERS = [
    "Tumour cells are dense. Necrosis is present.",
    "The stroma is pink. No tumour is seen.",
    "Many mitoses are seen. The grade is high.",
    "Fat and vessels only. The tissue is benign.",
    "Glands are crowded. Invasion is present.",
    "Lymphocytes are many. The margin is clear.",
]


def write_store(root: Path, slide_id: str, *, regions: int = 2, k: int = 3, nuclei: int = 2,
                seed: int = 0) -> Path:
    """A complete feature store of a made-up slide with ``regions`` regions of 4 patches."""
    rng = np.random.default_rng(seed)
    width = 512 * regions
    info = SlideInfo(name=f"{slide_id}.svs", dimensions=(width, 512), level_count=1,
                     level_dimensions=((width, 512),), level_downsamples=(1.0,), mpp=0.5,
                     mpp_source="metadata", metadata_mpp=0.5, vendor=None, objective_power=None,
                     backend="test", pixel_backend="test")
    region_boxes = np.array([(512.0 * r, 0.0, 512.0, 512.0) for r in range(regions)])
    patch_boxes = np.array([[(512.0 * r + 256 * (j % 2), 256.0 * (j // 2), 256.0, 256.0)
                             for j in range(4)] for r in range(regions)])
    hierarchy = Hierarchy(
        slide=info, grid=GridSpec(region_px=512, patch_px=256), level0_per_px=1.0, grid_rows=1,
        grid_cols=regions, tissue=box(0, 0, width, 512),
        region_index=np.arange(regions, dtype=np.int64), region_boxes=region_boxes,
        region_tissue=np.ones(regions, np.float32), patch_boxes=patch_boxes,
        patch_tissue=np.ones((regions, 4), np.float32), patch_on_slide=np.ones((regions, 4), bool),
        patch_valid=np.ones((regions, 4), bool),
    )
    store = FeatureStore(root / slide_id, f"key-{slide_id}")
    store.open_or_create(hierarchy, dims={"patch": DIMS["patch"], "region": DIMS["region"]},
                         n_candidates=4, k=k)
    region_vectors = []
    for r in range(regions):
        patch_of = np.repeat(np.arange(k, dtype=np.int16), nuclei)
        n = patch_of.size
        corner = patch_boxes[r, patch_of, :2]
        centroid = corner + rng.uniform(20, 236, size=(n, 2))
        square = np.array([[-5, -5], [5, -5], [5, 5], [-5, 5]], dtype=np.float64)
        region_vector = rng.normal(size=DIMS["region"]).astype(np.float32)
        region_vectors.append(region_vector)
        store.commit_region(RegionRecord(
            position=r,
            patch_features=rng.normal(size=(4, DIMS["patch"])).astype(np.float32),
            candidates=np.arange(4, dtype=np.int64), relevance=np.zeros(4, np.float32),
            selected=np.arange(k, dtype=np.int64), region_features=region_vector,
            nucleus_patch=patch_of, nucleus_centroid=centroid,
            nucleus_descriptor=rng.normal(size=(n, DIMS["cell"])).astype(np.float32),
            polygon_offsets=np.arange(0, 4 * n + 1, 4, dtype=np.int64),
            polygon_xy=(centroid[:, None, :] + square[None]).reshape(-1, 2),
        ), r)
    encoders = {scale: {"id": "toy", "version": "1", "dim": DIMS[key]}
                for scale, key in (("patch", "patch"), ("region", "region"), ("nucleus", "cell"))}
    manifest = {"schema_version": 1, "key": f"key-{slide_id}",
                "slide": {"name": f"{slide_id}.svs", "sha256": "0" * 64, "path": f"/x/{slide_id}.svs",
                          "width": width, "height": 512},
                "grid": {"target_mpp": 0.5, "region_px": 512, "patch_px": 256},
                "encoders": encoders}
    store.finish(manifest, np.mean(region_vectors, axis=0).astype(np.float32))
    return store.path


def write_dataset(path: Path, slide_ids: list[str], *, turns: int = 1) -> Path:
    """A WSI-Bench train file: ``turns`` question/answer pairs per slide."""
    records = []
    for n, slide_id in enumerate(slide_ids):
        conversation = []
        for t in range(turns):
            question = "<image>\nDescribe the slide." if t == 0 else f"Question {t}?"
            answer = ANSWERS[n % len(ANSWERS)] if t == 0 else f"Answer {t} for {slide_id}."
            conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        records.append({"id": f"rec-{n}", "image": f"{slide_id}.svs", "conversations": conversation})
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def toy_data(root: Path, n_slides: int = 4, *, turns: int = 1) -> tuple[Path, Path]:
    """``(dataset file, feature folder)`` for ``n_slides`` slides S0, S1, ..."""
    ids = [f"S{i}" for i in range(n_slides)]
    features = root / "features"
    for i, slide_id in enumerate(ids):
        write_store(features, slide_id, seed=i)
    return write_dataset(root / "train.json", ids, turns=turns), features


def model_config(**overrides: Any) -> HwsiConfig:
    """A tiny concat model over the toy feature widths (LLM: 64 wide, 2 layers)."""
    settings: dict[str, Any] = dict(
        text_config=tiny_text_config("llama", vocab_size=len(tiny_tokenizer())),
        wsi_dim=DIMS["region"], region_dim=DIMS["region"], patch_dim=DIMS["patch"],
        cell_dim=DIMS["cell"], ccaf_dim=8, projector_hidden=16, projector_dropout=0.0,
        fusion_dropout=0.0, align_dim=8, token_budget=64,
    )
    settings.update(overrides)
    return HwsiConfig(**settings)


def write_model_config(root: Path, **overrides: Any) -> tuple[Path, Path]:
    """``(model_config JSON, tokenizer folder)`` for a model built from scratch."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "hwsi_config.json"
    model_config(**overrides).to_json_file(str(path))
    tiny_tokenizer().save_pretrained(str(root / "tokenizer"))
    return path, root / "tokenizer"


def write_start_folder(root: Path, *, seed: int = 0, text_tower: bool = True, **overrides: Any) -> Path:
    """A saved model folder as a previous stage would leave it (model, processor, text tower)."""
    torch.manual_seed(seed)
    model = HwsiForConditionalGeneration(model_config(**overrides))
    processor = HwsiProcessor.for_config(tiny_tokenizer(), model.config)
    model.language_model.resize_token_embeddings(len(processor.tokenizer))
    model.save_pretrained(str(root))
    processor.save_pretrained(root)
    if text_tower:
        save_text_encoder(TextEncoder(len(processor.tokenizer), dim=16, layers=1, heads=2, max_length=32,
                                      align_dim=8, pad_token_id=int(processor.tokenizer.pad_token_id)),
                          root)
    return root


def toy_config(stage: int, out: Path, **overrides: Any) -> TrainConfig:
    """A run over the toy inputs: tiny batches, one step, no checkpoints, no validation."""
    values: dict[str, Any] = dict(
        output_dir=out / "run", batch_size=2, lr=1e-2, warmup_steps=0, schedule="constant",
        max_steps=1, save_every=0, eval_every=0, val_fraction=0.0, weight_decay=0.0,
        text_dim=16, text_layers=1, text_heads=2, text_max_length=32, max_length=16,
        lora_r=4, lora_alpha=8, lora_dropout=0.0, max_cells=8,
    )
    values.update(overrides)
    return load_train_config(None, stage=stage, **values)


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The rows of ``run/metrics.jsonl``."""
    text = (run / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
