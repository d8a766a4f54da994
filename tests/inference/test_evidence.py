"""Evidence: cached occlusion equals recomputing from scratch, budgets, geometry, a constructed case."""

from __future__ import annotations

import json

import pytest
import torch
from shapely.geometry import box, shape
from tiny import tiny_model

from omero_hwsi.inference.evidence import EvidenceBudget, explain
from omero_hwsi.inference.scoring import answer_log_likelihood, split_prompt
from omero_hwsi.model.processing_hwsi import collate_visual, visual_inputs

QUESTION, ANSWER = "Is there tumour?", "Yes, the tumour shows necrosis."


def _visual(store):
    return collate_visual([visual_inputs(store, max_cells=16)])


def _fresh_score(model, parts, visual, **masked):
    """Log-likelihood with the model run from the raw inputs, nothing cached."""
    inputs = dict(visual)
    for key, index in masked.items():
        inputs[key] = inputs[key].clone()
        inputs[key][index] = False
    with torch.no_grad():
        out = model.model(**inputs)
        tokens = out.visual_tokens[0][out.visual_mask[0]]
        return float(answer_log_likelihood(model.language_model, [parts], [tokens])[0])


@pytest.mark.parametrize(("fusion", "layout"), [("concat", "hwsi"), ("resampler", "released")])
def test_cached_occlusion_matches_recomputing_every_variant(small_store, fusion, layout):
    model, processor = tiny_model(fusion=fusion, layout=layout)
    visual = _visual(small_store)
    parts = split_prompt(processor, QUESTION, ANSWER)
    with torch.no_grad():
        items, notes = explain(model, parts, visual, small_store, depth="cell",
                               budget=EvidenceBudget(top_regions=2, top_patches=2, batch_size=5))
    assert notes == []
    base = _fresh_score(model, parts, visual)
    by_id = {item.id: item for item in items}
    region_of = {f"r{int(i)}": r for r, i in enumerate(visual["region_index"][0])}
    for item in [i for i in items if i.level == "region"][:3]:
        r = region_of[item.id]
        expected = base - _fresh_score(model, parts, visual, region_mask=(0, r))
        assert item.score == pytest.approx(expected, abs=1e-4)
    patch = next(i for i in items if i.level == "patch")
    r = region_of[patch.parent]
    c = visual["patch_index"][0, r].tolist().index(int(patch.id.split(".p")[1]))
    expected = base - _fresh_score(model, parts, visual, patch_mask=(0, r, c))
    assert patch.score == pytest.approx(expected, abs=1e-4)
    cell = next(i for i in items if i.level == "cell")
    parent = by_id[cell.parent]
    r = region_of[parent.parent]
    c = visual["patch_index"][0, r].tolist().index(int(parent.id.split(".p")[1]))
    n = visual["cell_k"][0, r, c].tolist().index(int(cell.id.split(".c")[1]))
    expected = base - _fresh_score(model, parts, visual, cell_mask=(0, r, c, n))
    assert cell.score == pytest.approx(expected, abs=1e-4)


def test_hierarchical_budgets_and_geometry(small_store):
    model, processor = tiny_model()
    visual = _visual(small_store)
    parts = split_prompt(processor, QUESTION, ANSWER)
    with torch.no_grad():
        items, _ = explain(model, parts, visual, small_store, depth="cell",
                           budget=EvidenceBudget(top_regions=2, top_patches=3))
    regions = [i for i in items if i.level == "region"]
    patches = [i for i in items if i.level == "patch"]
    cells = [i for i in items if i.level == "cell"]
    assert len(regions) == small_store.region_index.shape[0]  # every region
    assert [r.score for r in regions] == sorted((r.score for r in regions), reverse=True)
    top_regions = {r.id for r in regions[:2]}
    assert {p.parent for p in patches} == top_regions
    expected_patches = sum(int((small_store.selected[int(r.id[1:]) == small_store.region_index] >= 0).sum())
                           for r in regions[:2])
    assert len(patches) == expected_patches
    top_patches = {p.id for p in patches[:3]}
    assert {c.parent for c in cells} <= top_patches and cells
    assert {i.method for i in items} == {"occlusion"}
    # Geometry is level-0 and nested: nuclei inside their patch, patches inside their region.
    geoms = {i.id: shape(i.geometry) for i in items}
    for item in patches + cells:
        assert geoms[item.parent].buffer(1).contains(geoms[item.id])
    for item in regions:
        x, y, w, h = small_store.region_boxes[list(small_store.region_index).index(int(item.id[1:]))]
        assert geoms[item.id].equals(box(x, y, x + w, y + h))
    json.dumps([i.geometry for i in items])  # plain JSON


def test_depth_limits_and_gradient_method(small_store):
    model, processor = tiny_model(fusion="resampler")
    visual = _visual(small_store)
    parts = split_prompt(processor, QUESTION, ANSWER)
    for depth, levels in (("none", set()), ("region", {"region"}), ("patch", {"region", "patch"})):
        items, _ = explain(model, parts, visual, small_store, depth=depth)
        assert {i.level for i in items} == levels
    items, notes = explain(model, parts, visual, small_store, depth="cell", method="grad_x_input")
    assert {i.level for i in items} == {"region", "patch", "cell"} and notes == []
    assert {i.method for i in items} == {"grad_x_input"}
    assert all(torch.isfinite(torch.tensor(i.score)) for i in items)
    assert not any(p.requires_grad and p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="depth"):
        explain(model, parts, visual, small_store, depth="nucleus")  # type: ignore[arg-type]


def test_occlusion_finds_the_region_a_trained_answer_depends_on(small_store):
    """A constructed case: a model taught that one marked region means "Yes" blames that region."""
    model, processor = tiny_model(seed=3, projector_dropout=0.0, fusion_dropout=0.0)
    clean = _visual(small_store)
    marked = {k: v.clone() for k, v in clean.items()}
    target = 2
    # A feature pattern no real region has (not constant: the projector's LayerNorm erases that).
    pattern = torch.randn(marked["region"].shape[-1], generator=torch.Generator().manual_seed(0))
    marked["region"][0, target] = 3 * pattern
    inputs = {k: torch.cat([marked[k], clean[k]]) for k in clean}
    batch = processor([QUESTION, QUESTION], inputs, ["Yes.", "No."], padding_side="right")
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(60):
        optimiser.zero_grad()
        model(**batch).loss.backward()
        optimiser.step()
    model.eval()
    parts = split_prompt(processor, QUESTION, "Yes.")
    with torch.no_grad():
        items, _ = explain(model, parts, marked, small_store, depth="region")
    scores = {i.id: i.score for i in items}
    marked_id = f"r{int(clean['region_index'][0, target])}"
    others = [v for k, v in scores.items() if k != marked_id]
    assert scores[marked_id] > 1.0  # nats: the answer collapses without it
    assert scores[marked_id] > 10 * max(abs(v) for v in others)
    assert items[0].id == marked_id  # ranked first


@pytest.mark.parametrize("fusion", ["concat", "resampler"])
def test_attention_flow_is_labelled_and_sums_like_attention(small_store, fusion):
    model, processor = tiny_model(fusion=fusion)
    visual = _visual(small_store)
    parts = split_prompt(processor, QUESTION, ANSWER)
    items, notes = explain(model, parts, visual, small_store, depth="cell", method="attention")
    regions = [i for i in items if i.level == "region"]
    assert {i.method for i in items} == {"attention"}
    assert all(i.score >= 0 for i in items)
    # The answer's attention to all visual tokens is at most 1, and regions share it.
    assert 0 < sum(r.score for r in regions) <= 1 + 1e-5
    if fusion == "resampler":
        assert {i.level for i in items} == {"region"} and "mean-pools" in notes[0]
    else:
        assert {i.level for i in items} == {"region", "patch", "cell"} and notes == []
        patches = {i.id: i.score for i in items if i.level == "patch"}
        for cell in (i for i in items if i.level == "cell"):
            assert cell.score <= patches[cell.parent] + 1e-6
    assert model.language_model.config._attn_implementation == "sdpa"  # restored
