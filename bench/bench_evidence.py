"""Evidence cost: cached, batched occlusion vs one variant per pass, and vs generating the answer.

A tiny model (LLM hidden 64, 2 layers, random weights) on an in-memory slide of 32 regions x 16
selected patches (8 nuclei per patch), in both fusion modes, all timed in this run:

    generate      : the 64-token answer (greedy, KV cache), the reference
    naive         : every region and every patch occluded, one variant per forward pass, each
                    variant run from the raw features (projection, CCAF, fusion, LLM)
    exhaustive    : the same variants with projected tokens cached and 16 variants per pass
    hierarchical  : the default evidence (all regions, patches of the top 4 regions, nuclei of
                    the top 4 patches), cached and batched
    gradient      : the same hierarchy scored by gradient x input (one forward + backward)

Targets (issue 3): naive / exhaustive >= 5; hierarchical / generate <= 3. The script also checks
that naive and exhaustive scores agree. Run: make bench (or python bench/bench_evidence.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import tiny_text_config, tiny_tokenizer  # noqa: E402  (tiny local tokenizer, no download)

from omero_hwsi.inference.evidence import EvidenceBudget, explain  # noqa: E402
from omero_hwsi.inference.scoring import answer_log_likelihood, split_prompt  # noqa: E402
from omero_hwsi.model import HwsiConfig, HwsiForConditionalGeneration, HwsiProcessor  # noqa: E402
from omero_hwsi.model.processing_hwsi import collate_visual, visual_inputs  # noqa: E402
from omero_hwsi.synthetic.features import synthetic_features  # noqa: E402

QUESTION = "Is there invasive carcinoma in this slide?"


def build(fusion: str) -> tuple[HwsiForConditionalGeneration, HwsiProcessor]:
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    processor = HwsiProcessor(tokenizer, fusion_mode=fusion, num_queries=64)
    config = HwsiConfig(
        text_config=tiny_text_config("llama", vocab_size=len(tokenizer)),
        wsi_dim=64, region_dim=64, patch_dim=32, cell_dim=11, ccaf_dim=16, projector_hidden=64,
        fusion_mode=fusion, num_queries=64, resampler_heads=4, align_dim=None, max_cells=8,
    )
    return HwsiForConditionalGeneration(config).eval(), processor


def generate(model: HwsiForConditionalGeneration, processor: HwsiProcessor,
             visual: dict[str, torch.Tensor]) -> tuple[str, float]:
    batch = processor([QUESTION], visual)
    started = time.perf_counter()
    ids = model.generate(**batch, max_new_tokens=64, min_new_tokens=64,
                         pad_token_id=processor.tokenizer.pad_token_id)
    seconds = time.perf_counter() - started
    assert ids.shape[1] == 64, ids.shape
    return processor.decode(ids[0]), seconds


@torch.no_grad()
def naive(model: HwsiForConditionalGeneration, parts, visual: dict[str, torch.Tensor]) -> tuple[list[float], float]:
    """Every region, then every selected patch, each variant computed from scratch."""
    started = time.perf_counter()

    def score(inputs: dict[str, torch.Tensor]) -> float:
        out = model.model(**inputs)
        tokens = out.visual_tokens[0][out.visual_mask[0]]
        return float(answer_log_likelihood(model.language_model, [parts], [tokens])[0])

    base = score(visual)
    drops: list[float] = []
    regions = visual["region_mask"].shape[1]
    for r in range(regions):
        inputs = dict(visual, region_mask=visual["region_mask"].clone())
        inputs["region_mask"][0, r] = False
        drops.append(base - score(inputs))
    for r in range(regions):
        for c in visual["patch_mask"][0, r].nonzero()[:, 0].tolist():
            inputs = dict(visual, patch_mask=visual["patch_mask"].clone())
            inputs["patch_mask"][0, r, c] = False
            drops.append(base - score(inputs))
    return drops, time.perf_counter() - started


def timed_explain(model, parts, visual, features, depth: str, budget: EvidenceBudget,
                  method: str = "occlusion"):
    started = time.perf_counter()
    items, _ = explain(model, parts, visual, features, depth=depth, budget=budget,  # type: ignore[arg-type]
                       method=method)  # type: ignore[arg-type]
    return items, time.perf_counter() - started


def run(fusion: str, features) -> dict[str, float]:
    model, processor = build(fusion)
    visual = collate_visual([visual_inputs(features, max_cells=8)])
    generate(model, processor, visual)  # warm-up
    answer, t_generate = generate(model, processor, visual)
    parts = split_prompt(processor, QUESTION, answer)
    regions = visual["region_mask"].shape[1]
    everything = EvidenceBudget(top_regions=regions, top_patches=0, batch_size=16)
    items, t_exhaustive = timed_explain(model, parts, visual, features, "patch", everything)
    naive_scores, t_naive = naive(model, parts, visual)
    ours = [i.score for i in items if i.level == "region"] + [i.score for i in items if i.level == "patch"]
    gap = abs(sorted(ours)[-1] - sorted(naive_scores)[-1])
    cells, t_hier = timed_explain(model, parts, visual, features, "cell", EvidenceBudget())
    _, t_grad = timed_explain(model, parts, visual, features, "cell", EvidenceBudget(),
                              method="grad_x_input")
    tokens = int(model.model(**{k: v for k, v in visual.items()}).visual_mask.sum())
    return {"visual tokens": tokens, "variants (exhaustive)": len(items),
            "variants (hierarchical)": len(cells), "generate s": t_generate, "naive s": t_naive,
            "exhaustive s": t_exhaustive, "hierarchical s": t_hier,
            "gradient s": t_grad, "max |score gap|": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    features = synthetic_features(regions=args.regions, k=16, nuclei_per_patch=8, seed=1)
    print(f"slide: {args.regions} regions x 16 patches x 8 nuclei; torch threads {args.threads}")
    for fusion in ("concat", "resampler"):
        m = run(fusion, features)
        print(f"\n[{fusion}] {m['visual tokens']} visual tokens; {m['variants (exhaustive)']} exhaustive "
              f"variants, {m['variants (hierarchical)']} scored by the default hierarchy")
        for key in ("generate s", "naive s", "exhaustive s", "hierarchical s", "gradient s"):
            print(f"  {key:<16} {m[key]:8.2f}")
        print(f"  naive / exhaustive        {m['naive s'] / m['exhaustive s']:6.1f}x  (target >= 5)")
        print(f"  hierarchical / generate   {m['hierarchical s'] / m['generate s']:6.2f}x  (target <= 3)")
        print(f"  exhaustive / generate     {m['exhaustive s'] / m['generate s']:6.2f}x")
        print(f"  gradient / generate       {m['gradient s'] / m['generate s']:6.2f}x  (hierarchy by gradient x input)")
        print(f"  naive vs cached top score gap {m['max |score gap|']:.2e} nats")


if __name__ == "__main__":
    main()
