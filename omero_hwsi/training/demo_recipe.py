"""The recipe of the embedded demo model, as functions: data, tokenizer, the four stages.

``scripts/train_demo_model.py`` runs it end to end to make ``omero_hwsi/models/demo``;
``bench/ablation.py`` runs the same data and stages 0-1 once, then stages 2-3 once per set of
scales the LLM reads. Keeping the recipe here, not in a script, is what makes the ablation's
arms differ from the shipped model in the scales only.

The steps:

1. render a seeded synthetic training set (:func:`~omero_hwsi.synthetic.generate_dataset`);
2. extract features with the built-in encoders on the demo grid, one slide per process;
3. train a byte-level BPE tokenizer on the generated text, with a ChatML-style template;
4. train the stages with :func:`~omero_hwsi.training.loop.train`: stage 0 pre-trains a tiny
   Llama on the generated reports and captions, stage 1 aligns CCAF and the heads, stage 2
   the projectors, stage 3 the projectors and the whole tiny LLM on the instructions.

Every step is seeded and torch runs on a fixed number of threads, so the same machine and
pinned versions give the same weights.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from omero_hwsi._io import write_json_atomic
from omero_hwsi.features.extract import ExtractionConfig, extract_slide
from omero_hwsi.model import HwsiConfig
from omero_hwsi.synthetic.dataset import Split, generate_dataset
from omero_hwsi.synthetic.pathology import DEMO_GRID
from omero_hwsi.training.config import load_train_config
from omero_hwsi.training.loop import train

__all__ = [
    "RECIPE",
    "build_tokenizer",
    "instruction_keys",
    "model_config",
    "prepare_data",
    "remove_entries",
    "run_stage",
    "set_visual_scales",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# The recipe. Changing anything here means retraining and reinstalling the demo model.
RECIPE: dict[str, Any] = {
    "train_slides": 192,
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
        3: {"batch_size": 8, "lr": 1e-3, "max_steps": 3000, "warmup_steps": 50, "lora": False},
    },
}


def remove_entries(folder: Path, names: Iterable[str]) -> None:
    """Remove ``folder/<name>`` for each name, file or folder, where it exists.

    A recipe step that is not reused starts from nothing: a half-made folder from an earlier,
    interrupted run must never be taken for this run's output.
    """
    for name in names:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _extract(job: tuple[Path, Path]) -> None:
    torch.set_num_threads(1)
    extract_slide(job[0], job[1], grid=DEMO_GRID, config=ExtractionConfig(workers=0))


def prepare_data(
    out: Path, *, slides: int, seed: int, split: Split, reuse: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Render ``slides`` synthetic slides into ``out/data`` and their features into ``out/features``.

    With ``reuse``, a folder made earlier with the same slide count, seed and split is kept
    (``out/data_done.json`` records them once rendering and extraction finished); anything
    else in the way is removed first, so a half-made dataset is never reused.

    Returns:
        ``out``.
    """
    done = out / "data_done.json"
    wanted = {"slides": slides, "seed": seed, "split": split}
    if reuse and done.exists() and json.loads(done.read_text(encoding="utf-8")) == wanted:
        log(f"reusing {slides} rendered slides and their features in {out}")
        return out
    remove_entries(out, ("data", "features", done.name))
    out.mkdir(parents=True, exist_ok=True)
    manifest = generate_dataset(out / "data", n_slides=slides, seed=seed, grid=DEMO_GRID,
                                split=split)
    log(f"rendered {len(manifest.slide_ids)} slides")
    # One slide per process (in-process extraction each): small slides would spend more time
    # starting a worker pool than extracting.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=RECIPE["threads"], mp_context=spawn) as pool:
        list(pool.map(_extract, [(manifest.slide_path(s), out / "features")
                                 for s in manifest.slide_ids]))
    write_json_atomic(done, wanted)
    log(f"extracted features of {len(manifest.slide_ids)} slides")
    return out


def _texts(dataset: Path) -> Iterable[str]:
    """Every text the model will read or write: corpus, questions, answers, per-scale texts."""
    corpus = (dataset / "corpus.txt").read_text(encoding="utf-8").split("\n\n")
    yield from (t for t in corpus if t.strip())
    for record in json.loads((dataset / "train.json").read_text(encoding="utf-8")):
        yield from (turn["value"] for turn in record["conversations"])
    for line in (dataset / "scale_texts.jsonl").read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        yield entry["wsi"]
        for key in ("regions", "patches", "cells"):
            yield from entry.get(key, {}).values()


def build_tokenizer(dataset: Path, out_dir: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the dataset's text: encodes any text, decodes it back."""
    model = Tokenizer(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=RECIPE["vocab_size"], show_progress=False,
                                  special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(list(_texts(dataset)), trainer)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=model, eos_token="<|endoftext|>",
        unk_token="<unk>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def model_config(tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    """Write the recipe's model configuration for ``tokenizer`` to ``path``."""
    llm = {**RECIPE["llm"], "vocab_size": len(tokenizer) + 3,  # + the hwsi layout's 3 markers
           "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = HwsiConfig(text_config=llm, **RECIPE["model"])
    path.write_text(config.to_json_string(use_diff=False), encoding="utf-8")
    return path


def run_stage(work: Path, stage: int, steps_scale: float = 1.0, **keys: Any) -> Path:
    """Train one stage with the recipe's settings (``keys`` add or override); its final folder.

    The stage configuration is written as ``work/stage<N>.toml`` (what ``hwsi train --config``
    would read) and trained into ``work/stage<N>``.
    """
    settings = {**RECIPE["stages"][stage], "output_dir": work / f"stage{stage}", **keys}
    settings["max_steps"] = max(2, round(RECIPE["stages"][stage]["max_steps"] * steps_scale))
    lines = [f"stage = {stage}"]
    for key, value in settings.items():
        lines.append(f"{key} = {json.dumps(str(value) if isinstance(value, Path) else value)}")
    path = work / f"stage{stage}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return train(load_train_config(path))


def instruction_keys(data: Path) -> dict[str, Any]:
    """The TOML keys of stages 1-3 that point at ``data``'s instructions, texts and features."""
    return {"train": data / "data" / "train.json", "feature_dir": data / "features",
            "scale_texts": data / "data" / "scale_texts.jsonl", "seed": RECIPE["seed"],
            "save_every": 0, "eval_every": 0, "val_fraction": 0.05, "device": "cpu"}


def set_visual_scales(source: Path, target: Path, scales: list[str]) -> Path:
    """Copy the model folder ``source`` to ``target`` reading only ``scales`` from now on.

    Which scales the LLM reads changes no weight, only which tokens are placed, so a stage-1
    model can start every arm of the scale ablation.
    """
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    values = HwsiConfig.from_pretrained(str(target), local_files_only=True).to_dict()
    values["visual_scales"] = list(scales)
    HwsiConfig.from_dict(values).save_pretrained(str(target))  # validated on construction
    return target
