"""Scale ablation, like the paper's Table 1: which scales the answers need.

Four arms read cumulatively more scales: the WSI token only, + region tokens, + patch tokens,
+ cell tokens (the full hierarchy, as the shipped demo model). Everything else is shared:
the same synthetic training set, tokenizer, stage 0 (language) and stage 1 (alignment)
weights (trained once, at the recipe's own steps), seed, and stage 2-3 step budget
(``--steps-scale`` of the recipe's, so that each arm trains within 6 minutes;
``omero_hwsi.training.demo_recipe``). Each arm is
scored by ``hwsi evaluate`` on the same held-out synthetic set (another seed, rendered and
extracted end to end).

Printed: closed accuracy per question template for each arm, the change each added scale
brings, the WSI-only arm's blind accuracy, the pointing game, and the seconds each arm
trained (stages 2 and 3). Written: ``<work>/ablation.json``.

Run: ``.venv/bin/python bench/ablation.py`` (about 20 min on 2 cores; ``--reuse`` keeps the
rendered data and stages 0-1 of an earlier run in ``--work``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from omero_hwsi._io import write_json_atomic
from omero_hwsi.evaluation.run import evaluate
from omero_hwsi.training.demo_recipe import (
    RECIPE,
    build_tokenizer,
    instruction_keys,
    model_config,
    prepare_data,
    remove_entries,
    run_stage,
    set_visual_scales,
)

ARMS: tuple[tuple[str, list[str]], ...] = (
    ("WSI", ["wsi"]),
    ("+region", ["region", "wsi"]),
    ("+patch", ["patch", "region", "wsi"]),
    ("+cell", ["cell", "patch", "region", "wsi"]),
)
TEMPLATES = ("diagnosis", "nuclear_shape", "presence", "location")

console = Console()


def _shared(work: Path, train_data: Path, reuse: bool) -> Path:
    """Tokenizer, stage 0 and stage 1 at the recipe's steps, trained once for every arm.

    They are not part of an arm's budget: scaling them down with the arms would starve
    CCAF's alignment (stage 1) and handicap the cell scale before any arm starts.

    Returns:
        The stage-1 folder.
    """
    done = work / "shared_done.json"
    wanted = {"recipe": json.loads(json.dumps(RECIPE))}
    final = work / "stage1" / "final"
    if reuse and done.exists() and json.loads(done.read_text(encoding="utf-8")) == wanted:
        console.print(f"reusing stages 0-1 in {work}")
        return final
    remove_entries(work, ("tokenizer", "stage0", "stage1", done.name))
    tokenizer = build_tokenizer(train_data / "data", work / "tokenizer")
    config = model_config(tokenizer, work / "model_config.json")
    stage0 = run_stage(work, 0, model_config=config, tokenizer=work / "tokenizer",
                       corpus=train_data / "data" / "corpus.txt", seed=RECIPE["seed"],
                       save_every=0, eval_every=0, device="cpu")
    run_stage(work, 1, model=stage0, **instruction_keys(train_data))
    write_json_atomic(done, wanted)
    return final


def _arm(work: Path, name: str, scales: list[str], stage1: Path, train_data: Path,
         test_data: Path, steps_scale: float) -> dict[str, Any]:
    arm_dir = work / name.strip("+").lower()
    if arm_dir.exists():  # an earlier run's arm: train it again from the shared stage 1
        shutil.rmtree(arm_dir)
    arm_dir.mkdir(parents=True)
    start = set_visual_scales(stage1, arm_dir / "start", scales)
    began = time.perf_counter()
    stage2 = run_stage(arm_dir, 2, steps_scale, model=start, **instruction_keys(train_data))
    final = run_stage(arm_dir, 3, steps_scale, model=stage2, **instruction_keys(train_data))
    seconds = time.perf_counter() - began
    metrics = evaluate(test_data / "data" / "test.jsonl", test_data / "features", final,
                       ground_truth=test_data / "data" / "truth", out_dir=arm_dir / "evaluation",
                       device="cpu")
    closed = metrics["closed"]
    by_template = closed.get("by_template", {})
    result = {
        "scales": scales,
        "train_seconds": round(seconds, 1),
        "closed_accuracy": closed.get("accuracy"),
        "blind_accuracy": closed.get("blind_accuracy"),
        "chance": closed.get("chance"),
        "by_template": {t: by_template.get(t, {}).get("accuracy") for t in TEMPLATES},
        "by_template_n": {t: by_template.get(t, {}).get("n") for t in TEMPLATES},
        "pointing": metrics["pointing_game"].get("hit_rate"),
        "findings_recall": metrics["open"].get("findings", {}).get("recall"),
    }
    console.print(f"{name}: {json.dumps(result)}")
    return result


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _delta(now: float | None, before: float | None) -> str:
    return "" if now is None or before is None else f" ({now - before:+.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "output" / "ablation")
    parser.add_argument("--steps-scale", type=float, default=0.5,
                        help="scale the steps of each arm's stages 2 and 3; 0.5 of the demo "
                             "recipe keeps each arm within 6 minutes on 2 cores")
    parser.add_argument("--test-slides", type=int, default=16)
    parser.add_argument("--reuse", action="store_true",
                        help="keep the data and stages 0-1 of an earlier run in --work")
    args = parser.parse_args()
    torch.set_num_threads(RECIPE["threads"])
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    train_data = prepare_data(work / "train", slides=RECIPE["train_slides"], seed=RECIPE["seed"],
                              split="train", reuse=args.reuse, log=console.print)
    test_data = prepare_data(work / "test", slides=args.test_slides, seed=RECIPE["seed"] + 1,
                             split="test", reuse=args.reuse, log=console.print)
    stage1 = _shared(work, train_data, args.reuse)
    results = {name: _arm(work, name, scales, stage1, train_data, test_data, args.steps_scale)
               for name, scales in ARMS}
    write_json_atomic(work / "ablation.json", {"steps_scale": args.steps_scale,
                                               "test_slides": args.test_slides, "arms": results})

    table = Table(title="Scale ablation: closed accuracy on the held-out synthetic set "
                        "(change from the arm above)")
    table.add_column("question")
    for name, _ in ARMS:
        table.add_column(name, justify="right")
    first = results[ARMS[0][0]]
    for template in TEMPLATES:
        cells, before = [], None
        for name, _ in ARMS:
            now = results[name]["by_template"][template]
            cells.append(_fmt(now) + _delta(now, before))
            before = now
        table.add_row(f"{template} (n={first['by_template_n'][template]})", *cells)
    for key, label in (("closed_accuracy", "all closed"), ("pointing", "pointing game"),
                       ("findings_recall", "report findings recall")):
        cells, before = [], None
        for name, _ in ARMS:
            now = results[name][key]
            cells.append(_fmt(now) + _delta(now, before))
            before = now
        table.add_row(label, *cells)
    table.add_row("blind (visual inputs zeroed)", *[_fmt(results[n]["blind_accuracy"]) for n, _ in ARMS])
    table.add_row("train seconds (stages 2-3)", *[f"{results[n]['train_seconds']:.0f}" for n, _ in ARMS])
    console.print(table)
    full, wsi = results[ARMS[-1][0]]["closed_accuracy"], first["closed_accuracy"]
    if full is not None and wsi is not None:
        console.print(f"full hierarchy / WSI only, closed accuracy: {full / max(wsi, 1e-9):.2f}x")


if __name__ == "__main__":
    main()
