"""Train the embedded demo model from scratch on synthetic slides whose ground truth is known.

No public weights can be fetched at run time, so the default model of ``hwsi analyze`` is made
here, end to end, on a laptop's CPU:

1. render a seeded synthetic training set (``omero_hwsi.synthetic.generate_dataset``);
2. extract features with the built-in encoders on the demo grid (1024 px regions of 16 patches);
3. train a byte-level BPE tokenizer on the generated text, with a ChatML-style chat template;
4. train the four stages with ``omero_hwsi.training.loop.train``: stage 0 pre-trains a tiny
   Llama on the generated reports and captions, stage 1 aligns CCAF and the heads, stage 2 the
   projectors, stage 3 tunes projectors and the whole tiny LLM on the instructions;
5. copy the final folder (model, tokenizer, processor, text tower, recipe record) to
   ``omero_hwsi/models/demo`` (``--install``).

Run: ``.venv/bin/python scripts/train_demo_model.py --work build/demo-recipe --install``.
The same machine and pinned versions give the same weights (torch runs on a fixed number of
threads and every step is seeded); the recipe is rerun only when it changes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from omero_hwsi._io import write_json_atomic
from omero_hwsi.features.extract import ExtractionConfig, extract_slide
from omero_hwsi.model import HwsiConfig
from omero_hwsi.synthetic.dataset import generate_dataset
from omero_hwsi.synthetic.pathology import DEMO_GRID
from omero_hwsi.training.config import load_train_config
from omero_hwsi.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
INSTALL_DIR = ROOT / "omero_hwsi" / "models" / "demo"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# The recipe. Changing anything here means retraining and reinstalling the demo model.
RECIPE: dict[str, Any] = {
    "train_slides": 96,
    "seed": 0,
    "vocab_size": 1024,
    "threads": 2,
    "llm": {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256,
            "max_position_embeddings": 1024, "tie_word_embeddings": True, "rms_norm_eps": 1e-5},
    "model": {"wsi_dim": 64, "region_dim": 64, "patch_dim": 32, "cell_dim": 11, "ccaf_dim": 32,
              "ccaf_heads": 2, "projector_hidden": 128, "fusion_mode": "concat",
              "token_budget": 256, "max_cells": 16, "align_dim": 64,
              "region_position_encoding": "fourier", "wsi_aggregator": "mean",
              "prompt_layout": "hwsi"},
    "stages": {
        0: {"max_length": 128, "batch_size": 16, "lr": 3e-3, "max_steps": 300, "warmup_steps": 30},
        1: {"batch_size": 8, "lr": 1e-3, "max_steps": 150, "warmup_steps": 15, "text_dim": 64,
            "text_heads": 4, "text_layers": 1, "text_max_length": 64},
        2: {"batch_size": 8, "lr": 1e-3, "max_steps": 300, "warmup_steps": 30},
        3: {"batch_size": 8, "lr": 1e-3, "max_steps": 600, "warmup_steps": 50, "lora": False},
    },
}


def _log(message: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)


def build_tokenizer(texts: list[str], out_dir: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the generated text: encodes any text, decodes it back."""
    model = Tokenizer(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|endoftext|>",
                                        unk_token="<unk>", pad_token="<|endoftext|>",
                                        chat_template=CHAT_TEMPLATE)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _texts(dataset: Path) -> list[str]:
    """Every text the model will read or write: corpus, questions, answers, per-scale texts."""
    texts = [t for t in (dataset / "corpus.txt").read_text(encoding="utf-8").split("\n\n") if t.strip()]
    for record in json.loads((dataset / "train.json").read_text(encoding="utf-8")):
        texts += [turn["value"] for turn in record["conversations"]]
    for line in (dataset / "scale_texts.jsonl").read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        texts.append(entry["wsi"])
        for key in ("regions", "patches", "cells"):
            texts += list(entry.get(key, {}).values())
    return texts


def _extract(job: tuple[Path, Path]) -> None:
    torch.set_num_threads(1)
    extract_slide(job[0], job[1], grid=DEMO_GRID, config=ExtractionConfig(workers=0))


def _stage_config(work: Path, stage: int, **keys: Any) -> Path:
    lines = [f"stage = {stage}"]
    for key, value in {**RECIPE["stages"][stage], **keys}.items():
        lines.append(f"{key} = {json.dumps(str(value) if isinstance(value, Path) else value)}")
    path = work / f"stage{stage}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "demo-recipe")
    parser.add_argument("--slides", type=int, default=RECIPE["train_slides"])
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="scale every stage's steps (tests use a small value)")
    parser.add_argument("--install", action="store_true", help=f"copy the result to {INSTALL_DIR}")
    args = parser.parse_args()
    torch.set_num_threads(RECIPE["threads"])
    started = time.perf_counter()
    work: Path = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    manifest = generate_dataset(work / "data", n_slides=args.slides, seed=RECIPE["seed"],
                                grid=DEMO_GRID, split="train")
    _log(f"rendered {len(manifest.slide_ids)} slides", started)
    features = work / "features"
    # One slide per process (in-process extraction each): small slides would spend more time
    # starting a worker pool than extracting.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=RECIPE["threads"], mp_context=spawn) as pool:
        list(pool.map(_extract, [(manifest.slide_path(s), features) for s in manifest.slide_ids]))
    _log(f"extracted features of {len(manifest.slide_ids)} slides", started)

    tokenizer = build_tokenizer(_texts(work / "data"), work / "tokenizer", RECIPE["vocab_size"])
    llm = {**RECIPE["llm"], "vocab_size": len(tokenizer) + 3,  # + the hwsi layout's 3 markers
           "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = HwsiConfig(text_config=llm, **RECIPE["model"])
    config_path = work / "model_config.json"
    config_path.write_text(config.to_json_string(use_diff=False), encoding="utf-8")
    _log(f"tokenizer of {len(tokenizer)} tokens", started)

    data = {"train": work / "data" / "train.json", "feature_dir": features,
            "scale_texts": work / "data" / "scale_texts.jsonl", "seed": RECIPE["seed"],
            "save_every": 0, "eval_every": 0, "val_fraction": 0.05, "device": "cpu"}
    previous: Path | None = None
    for stage in (0, 1, 2, 3):
        steps = max(2, round(RECIPE["stages"][stage]["max_steps"] * args.steps_scale))
        keys: dict[str, Any] = {"output_dir": work / f"stage{stage}", "max_steps": steps}
        if stage == 0:
            keys.update(model_config=config_path, tokenizer=work / "tokenizer",
                        corpus=work / "data" / "corpus.txt", seed=RECIPE["seed"],
                        save_every=0, eval_every=0, device="cpu")
        else:
            keys.update(model=previous, **data)
        previous = train(load_train_config(_stage_config(work, stage, **keys)))
        _log(f"stage {stage}: {steps} steps -> {previous}", started)

    assert previous is not None
    record = {"recipe": RECIPE, "slides": len(manifest.slide_ids), "steps_scale": args.steps_scale,
              "torch": torch.__version__, "seconds": round(time.perf_counter() - started, 1)}
    write_json_atomic(previous / "demo_recipe.json", record)
    size = sum(p.stat().st_size for p in previous.rglob("*") if p.is_file())
    _log(f"final model {previous}: {size / 1e6:.2f} MB; model.safetensors sha256 "
         f"{_digest(previous / 'model.safetensors')}", started)
    if args.install:
        if INSTALL_DIR.exists():
            shutil.rmtree(INSTALL_DIR)
        shutil.copytree(previous, INSTALL_DIR)
        _log(f"installed into {INSTALL_DIR}", started)


if __name__ == "__main__":
    main()
