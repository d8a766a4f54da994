"""Training losses: InfoNCE, hierarchical contrastive, consistency, text tower, total."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from tiny import tiny_tokenizer  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from omero_hwsi.model.losses import (  # noqa: E402
    LearnableTemperature,
    LossWeights,
    ScaleTexts,
    TextEncoder,
    consistency_loss,
    hierarchical_contrastive,
    info_nce,
    total_loss,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=_gen(seed))


def _unit(*shape: int, seed: int = 0) -> Tensor:
    return F.normalize(_randn(*shape, seed=seed), dim=-1)


def _reference_info_nce(visual: Tensor, text: Tensor, tau: float) -> float:
    """The symmetric InfoNCE written out term by term, in float64."""
    v = [x / x.norm() for x in visual.double()]
    t = [x / x.norm() for x in text.double()]
    m = len(v)
    s = [[float(v[i] @ t[j]) / tau for j in range(m)] for i in range(m)]
    v2t = -sum(s[i][i] - math.log(sum(math.exp(s[i][j]) for j in range(m))) for i in range(m)) / m
    t2v = -sum(s[j][j] - math.log(sum(math.exp(s[i][j]) for i in range(m))) for j in range(m)) / m
    return (v2t + t2v) / 2


# -- info_nce ------------------------------------------------------------------------------------


def test_info_nce_matches_the_written_out_formula():
    visual, text = 3 * _randn(6, 8, seed=1), _randn(6, 8, seed=2)  # not unit: normalised inside
    loss = info_nce(visual, text, temperature=0.1)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(_reference_info_nce(visual, text, 0.1), rel=1e-5)


def test_info_nce_is_asymmetric_in_rows_and_columns_but_averages_both():
    # Swapping the roles of visual and text transposes the logits: the symmetric loss is unchanged.
    visual, text = _unit(5, 8, seed=3), _unit(5, 8, seed=4)
    assert info_nce(visual, text).item() == pytest.approx(info_nce(text, visual).item(), rel=1e-6)


def test_aligned_pairs_give_a_lower_loss_than_shuffled_pairs():
    visual = _unit(8, 16, seed=5)
    text = F.normalize(visual + 0.1 * _randn(8, 16, seed=6), dim=-1)
    shuffled = text[torch.randperm(8, generator=_gen(7))]
    assert info_nce(visual, text) < info_nce(visual, shuffled)
    assert info_nce(visual, text).item() < 0.1  # nearly identical pairs: close to the minimum 0


@pytest.mark.parametrize("keep", [[True], [True, False, False]])
def test_fewer_than_two_pairs_raise(keep):
    m = len(keep)
    with pytest.raises(ValueError, match="needs at least 2 pairs"):
        info_nce(_unit(m, 4, seed=1), _unit(m, 4, seed=2), mask=torch.tensor(keep))


def test_masked_rows_are_neither_positives_nor_negatives():
    visual = _unit(6, 8, seed=1).requires_grad_()
    text = _unit(6, 8, seed=2)
    keep = torch.tensor([True, False, True, True, False, True])
    expected = info_nce(visual.detach()[keep], text[keep])
    garbage_text = torch.where(keep[:, None], text, torch.full_like(text, float("nan")))
    loss = info_nce(visual, garbage_text, mask=keep)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(visual.grad).all()
    assert (visual.grad[~keep] == 0).all()


def test_info_nce_rejects_bad_inputs():
    v, t = _unit(4, 8, seed=1), _unit(4, 8, seed=2)
    with pytest.raises(ValueError, match="must both be"):
        info_nce(v, t[:3])
    with pytest.raises(ValueError, match="temperature"):
        info_nce(v, t, temperature=0.0)
    with pytest.raises(TypeError, match="bool"):
        info_nce(v, t, mask=torch.ones(4))


def test_lower_temperature_sharpens_the_loss_of_separated_pairs():
    visual = _unit(8, 16, seed=5)
    text = F.normalize(visual + 0.3 * _randn(8, 16, seed=6), dim=-1)
    assert info_nce(visual, text, temperature=0.02) < info_nce(visual, text, temperature=0.5)


def test_learnable_temperature_is_trained_and_clamped():
    temperature = LearnableTemperature(0.07, min_temperature=0.01)
    assert temperature().item() == pytest.approx(0.07, rel=1e-6)
    visual = _unit(8, 16, seed=5)
    text = F.normalize(visual + 0.1 * _randn(8, 16, seed=6), dim=-1)
    info_nce(visual, text, temperature=temperature()).backward()
    # Well separated pairs: a sharper softmax lowers the loss, so the gradient asks for a lower tau.
    assert temperature.log_scale.grad is not None and temperature.log_scale.grad < 0
    with torch.no_grad():
        temperature.log_scale.fill_(20.0)  # 1/tau = e^20: far beyond the clamp
    assert temperature().item() == pytest.approx(0.01, rel=1e-6)
    with pytest.raises(ValueError, match="min_temperature"):
        LearnableTemperature(0.001)


def test_contrastive_training_aligns_a_text_tower_and_a_visual_head():
    torch.manual_seed(0)
    m, vocab = 8, 40
    ids = torch.randint(1, vocab, (m, 6), generator=_gen(1))
    mask = torch.ones(m, 6, dtype=torch.bool)
    features = _randn(m, 12, seed=2)
    encoder = TextEncoder(vocab, dim=32, layers=1, heads=2, max_length=16, align_dim=16)
    head = nn.Linear(12, 16)
    optimiser = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=1e-2)
    losses = []
    for _ in range(25):
        loss = info_nce(F.normalize(head(features), dim=-1), encoder(ids, mask))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        sims = F.normalize(head(features), dim=-1) @ encoder(ids, mask).T
    assert torch.equal(sims.argmax(dim=1), torch.arange(m))  # every slide finds its own text


# -- hierarchical_contrastive --------------------------------------------------------------------


def _scales(sizes: dict[str, int]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    visual = {s: _unit(n, 8, seed=i) for i, (s, n) in enumerate(sizes.items())}
    text = {s: _unit(n, 8, seed=10 + i) for i, (s, n) in enumerate(sizes.items())}
    return visual, text


def test_scales_with_a_single_pair_are_skipped_and_reported_absent():
    visual, text = _scales({"cell": 6, "patch": 5, "region": 3, "wsi": 1})
    loss, per_scale = hierarchical_contrastive(visual, text)
    assert set(per_scale) == {"cell", "patch", "region"}
    expected = sum(info_nce(visual[s], text[s]) for s in per_scale) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(not v.requires_grad for v in per_scale.values())


def test_scale_weights_give_a_weighted_mean():
    visual, text = _scales({"patch": 5, "region": 4, "wsi": 3})
    weights = {"patch": 1.0, "region": 3.0, "wsi": 0.0}
    loss, per_scale = hierarchical_contrastive(visual, text, weights=weights, temperature=0.2)
    expected = (per_scale["patch"] + 3 * per_scale["region"]) / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert per_scale["patch"].item() == pytest.approx(
        info_nce(visual["patch"], text["patch"], temperature=0.2).item(), rel=1e-6
    )


def test_scale_masks_drop_pairs_and_can_skip_a_scale():
    visual, text = _scales({"patch": 5, "region": 4})
    masks = {"patch": torch.tensor([True, True, False, True, False]),
             "region": torch.tensor([False, True, False, False])}
    loss, per_scale = hierarchical_contrastive(visual, text, masks=masks)
    assert set(per_scale) == {"patch"}
    expected = info_nce(visual["patch"][masks["patch"]], text["patch"][masks["patch"]])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_only_scales_present_in_both_mappings_count():
    visual, text = _scales({"cell": 4, "patch": 4})
    del text["cell"]
    _, per_scale = hierarchical_contrastive(visual, text)
    assert set(per_scale) == {"patch"}


def test_hierarchical_contrastive_without_any_usable_scale_raises():
    visual, text = _scales({"region": 1, "wsi": 1})
    with pytest.raises(ValueError, match="at least 2 pairs"):
        hierarchical_contrastive(visual, text)
    with pytest.raises(ValueError, match="weight 0"):
        hierarchical_contrastive(*_scales({"wsi": 3}), weights={"wsi": 0.0})


def test_hierarchical_contrastive_rejects_unknown_scales_and_negative_weights():
    visual, text = _scales({"patch": 4})
    with pytest.raises(ValueError, match="unknown scales \\['tissue'\\]"):
        hierarchical_contrastive({**visual, "tissue": visual["patch"]}, text)
    with pytest.raises(ValueError, match=">= 0"):
        hierarchical_contrastive(visual, text, weights={"patch": -1.0})


# -- ScaleTexts ----------------------------------------------------------------------------------


def test_scale_texts_pair_each_text_with_its_element():
    visual = _randn(2, 3, 4, 8, seed=1)  # (B, R, C, A) patch embeddings
    visual_mask = torch.ones(2, 3, 4, dtype=torch.bool)
    visual_mask[1, 2, 3] = False
    # b=0 r=1 c=2 -> 6; b=1 r=0 c=0 -> 12; then a padded owner and a second text of element 6.
    owner = torch.tensor([6, 12, 23, 6])
    texts = ScaleTexts(token_ids=torch.ones(4, 5, dtype=torch.long),
                       attention_mask=torch.ones(4, 5, dtype=torch.long), owner=owner)
    rows, keep = texts.pair(visual, visual_mask)
    assert torch.equal(rows[0], visual[0, 1, 2]) and torch.equal(rows[1], visual[1, 0, 0])
    assert keep.tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="owner indices"):
        ScaleTexts(texts.token_ids[:1], texts.attention_mask[:1], torch.tensor([24])).pair(visual)


def test_scale_texts_validate_shapes():
    ids = torch.ones(3, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask"):
        ScaleTexts(ids, torch.ones(3, 4, dtype=torch.long), torch.arange(3))
    with pytest.raises(ValueError, match="owner"):
        ScaleTexts(ids, torch.ones(3, 5, dtype=torch.long), torch.arange(2))
    with pytest.raises(ValueError, match="int64"):
        ScaleTexts(ids.int(), torch.ones(3, 5, dtype=torch.long), torch.arange(3))


# -- consistency_loss ----------------------------------------------------------------------------

B, R, C, D = 2, 3, 4, 8


def _masks(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    region_mask = torch.tensor([[True, True, False], [True, True, True]])
    patch_mask = torch.rand(B, R, C, generator=_gen(seed)) > 0.3
    patch_mask[:, :, 0] = True  # every region has a patch
    cell_mask = patch_mask & (torch.rand(B, R, C, generator=_gen(seed + 1)) > 0.3)
    cell_mask[:, :, 0] = True
    return region_mask, patch_mask, cell_mask


def _identical_scales(per_region: bool) -> dict[str, Tensor]:
    """Every scale holds the same vector: one per region (l2) or one per slide (cosine)."""
    region_mask, patch_mask, cell_mask = _masks()
    base = _randn(B, R, D, seed=3) if per_region else _randn(B, 1, D, seed=3).expand(B, R, D)
    tokens = base.unsqueeze(2).expand(B, R, C, D)
    return {"region": base.clone(), "patch": tokens.clone(), "patch_mask": patch_mask,
            "cell": tokens.clone(), "cell_mask": cell_mask, "region_mask": region_mask}


def _garbage(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Padded slots (and everything under a padded region) set to NaN."""
    out = dict(inputs)
    region_real = inputs["region_mask"]
    nan = torch.tensor(float("nan"))
    out["region"] = torch.where(region_real[..., None], inputs["region"], nan)
    for name in ("patch", "cell"):
        real = inputs[f"{name}_mask"] & region_real[..., None]
        out[name] = torch.where(real[..., None], inputs[name], nan)
    return out


@pytest.mark.parametrize(("form", "per_region"), [("l2", True), ("l2", False), ("cosine", False)])
def test_consistency_is_zero_when_every_scale_agrees(form, per_region):
    loss = consistency_loss(**_identical_scales(per_region), form=form)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("form", ["l2", "cosine"])
def test_consistency_is_positive_when_scales_disagree(form):
    inputs = _identical_scales(per_region=False)
    inputs["cell"] = inputs["cell"] + _randn(B, R, C, D, seed=9)
    assert consistency_loss(**inputs, form=form).item() > 0.01


def test_l2_consistency_matches_a_hand_computed_value():
    region = torch.tensor([[[0.0, 0.0]]])  # (1, 1, 2)
    patch = torch.tensor([[[[1.0, 0.0], [3.0, 0.0], [50.0, 50.0]]]])  # third slot padded
    cell = torch.tensor([[[[0.0, 1.0], [0.0, 1.0], [7.0, 7.0]]]])
    real = torch.tensor([[[True, True, False]]])
    loss = consistency_loss(region, patch, real, cell, real, torch.tensor([[True]]))
    # ||0 - (0, 1)||^2 = 1; ||0 - (2, 0)||^2 = 4; mean(||(-1, 1)||^2, ||(-3, 1)||^2) = (2 + 10) / 2
    assert loss.item() == pytest.approx(1 + 4 + 6)


def test_cosine_consistency_matches_a_hand_computed_value():
    region = torch.tensor([[[1.0, 0.0]]])
    patch = torch.tensor([[[[1.0, 1.0]]]])
    cell = torch.tensor([[[[0.0, 1.0]]]])
    real = torch.tensor([[[True]]])
    loss = consistency_loss(region, patch, real, cell, real, torch.tensor([[True]]), form="cosine")
    c = 1 - 1 / math.sqrt(2)  # cell->patch and patch->region at 45 degrees; region->wsi = itself
    assert loss.item() == pytest.approx((c + c + 0) / 3, rel=1e-6)
    wsi = torch.tensor([[0.0, 1.0]])  # orthogonal to the region mean: 1 - cos = 1
    with_wsi = consistency_loss(region, patch, real, cell, real, torch.tensor([[True]]),
                                form="cosine", wsi=wsi)
    assert with_wsi.item() == pytest.approx((c + c + 1) / 3, rel=1e-6)


@pytest.mark.parametrize("form", ["l2", "cosine"])
def test_consistency_ignores_whatever_is_in_padded_slots(form):
    inputs = _identical_scales(per_region=True)
    inputs["cell"] = inputs["cell"] + _randn(B, R, C, D, seed=9)
    clean = consistency_loss(**inputs, form=form)
    dirty = {k: (v.requires_grad_() if v.is_floating_point() else v)
             for k, v in _garbage(inputs).items()}
    loss = consistency_loss(**dirty, form=form)
    assert loss.item() == pytest.approx(clean.item(), rel=1e-6)
    loss.backward()
    for name in ("region", "patch", "cell"):
        assert torch.isfinite(dirty[name].grad).all()


def test_regions_without_cells_are_not_pulled_towards_zero():
    inputs = _identical_scales(per_region=True)
    with_cells = consistency_loss(**inputs)
    inputs["cell_mask"] = inputs["cell_mask"].clone()
    inputs["cell_mask"][0, 0] = False
    assert consistency_loss(**inputs).item() == pytest.approx(with_cells.item(), abs=1e-6)


@pytest.mark.parametrize("form", ["l2", "cosine"])
def test_consistency_of_an_empty_batch_is_a_zero_with_gradients(form):
    inputs = _garbage({**_identical_scales(per_region=True),
                       "region_mask": torch.zeros(B, R, dtype=torch.bool)})
    region = inputs["region"].requires_grad_()
    loss = consistency_loss(**inputs, form=form)
    assert loss.item() == 0.0
    loss.backward()
    assert region.grad is not None and (region.grad == 0).all()


def test_consistency_rejects_bad_inputs():
    inputs = _identical_scales(per_region=True)
    with pytest.raises(ValueError, match="form must be one of l2, cosine"):
        consistency_loss(**inputs, form="kl")
    with pytest.raises(TypeError, match="bool"):
        consistency_loss(**{**inputs, "patch_mask": inputs["patch_mask"].float()})
    with pytest.raises(ValueError, match="must both be"):
        consistency_loss(**{**inputs, "cell": inputs["cell"][:, :, :2]})


# -- TextEncoder ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    tok = tiny_tokenizer()
    tok.pad_token = "<|endoftext|>"
    return tok


@pytest.fixture(scope="module")
def encoder(tokenizer):
    torch.manual_seed(0)
    return TextEncoder(len(tokenizer), dim=32, layers=2, heads=4, max_length=32, align_dim=16,
                       pad_token_id=tokenizer.pad_token_id).eval()


TEXTS = ["Is there invasive carcinoma in this slide?", "Describe the tissue.",
         "Yes, the tumour shows necrosis and many mitoses."]


def test_text_embeddings_are_unit_vectors(encoder, tokenizer):
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    out = encoder(batch["input_ids"], batch["attention_mask"])
    assert out.shape == (3, 16)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_text_embedding_does_not_depend_on_padding(encoder, tokenizer, side):
    tokenizer.padding_side = side
    try:
        batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
        longer = tokenizer(TEXTS, padding="max_length", max_length=30, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    alone = torch.cat([encoder(**_ids(tokenizer([t], return_tensors="pt"))) for t in TEXTS])
    with torch.no_grad():
        assert torch.allclose(encoder(**_ids(batch)), alone, atol=1e-5)
        assert torch.allclose(encoder(**_ids(longer)), alone, atol=1e-5)
        # Ids under the padding may be anything.
        garbage = longer["input_ids"].masked_fill(longer["attention_mask"] == 0, 5)
        assert torch.allclose(encoder(garbage, longer["attention_mask"]), alone, atol=1e-5)


def _ids(batch) -> dict[str, Tensor]:
    return {"token_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def test_texts_longer_than_max_length_are_truncated():
    torch.manual_seed(0)
    encoder = TextEncoder(50, dim=16, layers=1, heads=2, max_length=8, align_dim=8).eval()
    ids = torch.randint(1, 50, (2, 20), generator=_gen(3))
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 12:] = False
    with torch.no_grad():
        out = encoder(ids, mask)
        assert torch.allclose(out, encoder(ids[:, :8], mask[:, :8]), atol=1e-6)
        changed_tail = ids.clone()
        changed_tail[:, 8:] = 1
        assert torch.allclose(out, encoder(changed_tail, mask), atol=1e-6)


def test_text_encoder_rejects_empty_texts_and_foreign_ids():
    encoder = TextEncoder(50, dim=16, layers=1, heads=2, align_dim=8)
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"texts \[1\] have no real token"):
        encoder(torch.ones(2, 4, dtype=torch.long), mask)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50\)"):
        encoder(torch.full((1, 4), 50), torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of the head count"):
        TextEncoder(50, dim=10, heads=4)


# -- total_loss ----------------------------------------------------------------------------------


def test_total_loss_weights_the_terms_that_are_present():
    lm, ctr, cons = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(5.0)
    weights = LossWeights(lm=0.5, contrastive=2.0, consistency=0.1)
    assert total_loss(lm, ctr, cons, weights).item() == pytest.approx(1.0 + 6.0 + 0.5)
    assert total_loss(None, ctr, cons, weights).item() == pytest.approx(6.5)
    assert total_loss(lm, None, None, weights).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="all were None"):
        total_loss(None, None, None, weights)
    with pytest.raises(ValueError, match="scalar"):
        total_loss(torch.ones(2), None, None, weights)


def test_total_loss_backpropagates_into_each_term():
    lm = torch.tensor(1.0, requires_grad=True)
    ctr = torch.tensor(1.0, requires_grad=True)
    total_loss(lm, ctr, None, LossWeights.stage3()).backward()
    assert lm.grad.item() == pytest.approx(0.7) and ctr.grad.item() == pytest.approx(0.2)


def test_stage_presets_are_the_reference_weights():
    assert LossWeights() == LossWeights.stage2() == LossWeights(0.7, 2.0, 0.25)
    assert LossWeights.stage3() == LossWeights(0.7, 0.2, 0.07)
    with pytest.raises(ValueError, match="consistency"):
        LossWeights(consistency=-0.1)
