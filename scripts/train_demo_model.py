"""Train the embedded demo model from scratch on synthetic slides whose ground truth is known.

No public weights can be fetched at run time, so the default model of ``hwsi analyze`` is made
here, end to end, on a laptop's CPU, by the recipe in ``omero_hwsi.training.demo_recipe``:
render a seeded training set, extract features, train a tokenizer, train stages 0-3, and
copy the final folder (model, tokenizer, processor, text tower, recipe record) to
``omero_hwsi/models/demo`` (``--install``).

Run: ``.venv/bin/python scripts/train_demo_model.py --work build/demo-recipe --install``.
The same machine and pinned versions give the same weights (torch runs on a fixed number of
threads and every step is seeded); the recipe is rerun only when it changes.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import time
from pathlib import Path

import torch

from omero_hwsi._io import write_json_atomic
from omero_hwsi.training.demo_recipe import (
    RECIPE,
    build_tokenizer,
    instruction_keys,
    model_config,
    prepare_data,
    remove_entries,
    run_stage,
)

ROOT = Path(__file__).resolve().parents[1]
INSTALL_DIR = ROOT / "omero_hwsi" / "models" / "demo"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "demo-recipe")
    parser.add_argument("--slides", type=int, default=RECIPE["train_slides"])
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="scale every stage's steps (tests use a small value)")
    parser.add_argument("--install", action="store_true", help=f"copy the result to {INSTALL_DIR}")
    parser.add_argument("--keep-data", action="store_true",
                        help="reuse the slides and features of an earlier run in --work when "
                             "they were made with the same slide count (for recipe iteration; "
                             "a release run starts clean)")
    args = parser.parse_args()
    torch.set_num_threads(RECIPE["threads"])
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)

    work: Path = args.work.resolve()
    if work.exists():  # stages never resume from an earlier run's leftovers
        remove_entries(work, [entry.name for entry in work.iterdir()
                              if entry.name != "train" or not args.keep_data])
    data = prepare_data(work / "train", slides=args.slides, seed=RECIPE["seed"], split="train",
                        reuse=args.keep_data, log=log)

    tokenizer = build_tokenizer(data / "data", work / "tokenizer")
    config = model_config(tokenizer, work / "model_config.json")
    log(f"tokenizer of {len(tokenizer)} tokens")
    previous = run_stage(work, 0, args.steps_scale, model_config=config,
                         tokenizer=work / "tokenizer", corpus=data / "data" / "corpus.txt",
                         seed=RECIPE["seed"], save_every=0, eval_every=0, device="cpu")
    log(f"stage 0 -> {previous}")
    for stage in (1, 2, 3):
        previous = run_stage(work, stage, args.steps_scale, model=previous,
                             **instruction_keys(data))
        log(f"stage {stage} -> {previous}")

    record = {"recipe": RECIPE, "slides": args.slides, "steps_scale": args.steps_scale,
              "torch": torch.__version__, "seconds": round(time.perf_counter() - started, 1)}
    write_json_atomic(previous / "demo_recipe.json", record)
    size = sum(p.stat().st_size for p in previous.rglob("*") if p.is_file())
    log(f"final model {previous}: {size / 1e6:.2f} MB; model.safetensors sha256 "
        f"{_digest(previous / 'model.safetensors')}")
    if args.install:
        if INSTALL_DIR.exists():
            shutil.rmtree(INSTALL_DIR)
        shutil.copytree(previous, INSTALL_DIR)
        log(f"installed into {INSTALL_DIR}")


if __name__ == "__main__":
    main()
