"""HwsiForConditionalGeneration with tiny Llama and Qwen2 LLMs, fed by HwsiProcessor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import tiny_text_config, tiny_tokenizer

from omero_hwsi.errors import ModelFileNotFoundError
from omero_hwsi.features.extract import ExtractionConfig, extract_slide
from omero_hwsi.features.store import load_features
from omero_hwsi.model import HwsiConfig, HwsiForConditionalGeneration
from omero_hwsi.model.budget import TokenBudgetError
from omero_hwsi.model.modeling_hwsi import SCALE_CODES
from omero_hwsi.model.processing_hwsi import (
    VISUAL_PLACEHOLDER_ID,
    HwsiProcessor,
    collate_visual,
    visual_inputs,
)


@pytest.fixture(scope="module")
def cmu_visual(fixture_slide, tmp_path_factory):
    result = extract_slide(fixture_slide("CMU-1-Small-Region.svs"), tmp_path_factory.mktemp("fs"),
                           config=ExtractionConfig(workers=0))
    features = load_features(result.path)
    return features, visual_inputs(features, max_cells=16)


def make(family: str = "llama", *, fusion: str = "concat", layout: str = "hwsi", tied: bool = False,
         **overrides):
    """A tiny model + processor over the built-in feature dims (patch 32, region 64, cell 11)."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    processor = HwsiProcessor(tokenizer, prompt_layout=layout, fusion_mode=fusion, num_queries=8,
                              token_budget=overrides.pop("token_budget", 96))
    config = HwsiConfig(
        text_config=tiny_text_config(family, vocab_size=len(tokenizer), tied=tied),
        wsi_dim=64, region_dim=64, patch_dim=32, cell_dim=11, ccaf_dim=16, projector_hidden=32,
        fusion_mode=fusion, num_queries=8, resampler_heads=4, token_budget=processor.token_budget,
        prompt_layout=layout, align_dim=16, **overrides,
    )
    return HwsiForConditionalGeneration(config).eval(), processor


def test_processor_built_from_the_config_matches_the_model(cmu_visual):
    _, visual = cmu_visual
    model, _ = make(fusion="resampler", layout="released")
    processor = HwsiProcessor.for_config(tiny_tokenizer(), model.config)
    assert (processor.prompt_layout, processor.fusion_mode, processor.num_queries) == (
        "released", "resampler", 8)
    assert torch.isfinite(model(**processor(["Is there tumour?"], collate_visual([visual]),
                                            ["Yes."])).loss)


def batch(processor, visual, questions, answers=None, **kwargs):
    return processor(questions, collate_visual([visual] * len(questions)), answers, **kwargs)


@pytest.mark.parametrize(
    ("family", "fusion", "layout", "tied"),
    [("llama", "concat", "hwsi", False), ("qwen2", "resampler", "released", True),
     ("qwen2", "concat", "hwsi", True), ("llama", "resampler", "hwsi", False)],
)
def test_forward_loss_generate_and_round_trip(cmu_visual, tmp_path, family, fusion, layout, tied):
    _, visual = cmu_visual
    model, processor = make(family, fusion=fusion, layout=layout, tied=tied)
    train = batch(processor, visual, ["Is there tumour?", "Describe the tissue."],
                  ["Yes.", "Pink stroma."], padding_side="right")
    out = model(**train)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert out.logits.shape[:2] == train["input_ids"].shape
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("model.projectors")]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    ask = batch(processor, visual, ["Is there tumour?"])
    generated = model.generate(**ask, max_new_tokens=5)
    assert generated.shape == (1, 5)

    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json"} <= files
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "mllm_hwsi"
    loaded = HwsiForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    again = HwsiProcessor.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.generate(**batch(again, visual, ["Is there tumour?"]),
                                       max_new_tokens=5), generated)
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name


def test_greedy_generation_is_deterministic_and_sampling_follows_the_seed(cmu_visual):
    _, visual = cmu_visual
    model, processor = make()
    ask = batch(processor, visual, ["Describe the tissue."])
    assert torch.equal(model.generate(**ask, max_new_tokens=6), model.generate(**ask, max_new_tokens=6))
    torch.manual_seed(3)
    a = model.generate(**ask, max_new_tokens=6, do_sample=True, temperature=1.5)
    torch.manual_seed(3)
    b = model.generate(**ask, max_new_tokens=6, do_sample=True, temperature=1.5)
    assert torch.equal(a, b)


def test_concat_tokens_point_at_their_hierarchy_elements(cmu_visual):
    features, visual = cmu_visual
    model, processor = make(token_budget=20)  # 1 region + WSI + 9 (patch, cell) pairs of 16
    inputs = collate_visual([visual])
    out = model.model(**inputs)
    refs = out.token_refs[0][out.visual_mask[0]]
    codes = refs[:, 0].tolist()
    # [cells | patches | regions | wsi], cells and patches interleaved by rank within budget
    assert codes == sorted(codes) and codes[-1] == SCALE_CODES["wsi"]
    assert codes.count(SCALE_CODES["region"]) == len(features.region_index)
    assert len(codes) == 20 == processor.num_visual_tokens(inputs)[0]
    patch_refs = refs[refs[:, 0] == SCALE_CODES["patch"]]
    assert patch_refs[:, 2].tolist() == list(range(9))  # the best-ranked patches fill the budget
    cell_refs = refs[refs[:, 0] == SCALE_CODES["cell"]]
    assert cell_refs[:, 2].tolist() == list(range(9))


@pytest.mark.parametrize(
    ("scales", "codes"),
    [(["wsi"], {"wsi"}), (["region", "wsi"], {"region", "wsi"}),
     (["patch", "region", "wsi"], {"patch", "region", "wsi"})],
)
def test_a_model_reading_fewer_scales_places_only_their_tokens(cmu_visual, tmp_path, scales, codes):
    features, visual = cmu_visual
    model, _ = make(token_budget=40, visual_scales=scales)
    processor = HwsiProcessor.for_config(tiny_tokenizer(), model.config)
    inputs = collate_visual([visual])
    out = model.model(**inputs)
    refs = out.token_refs[0][out.visual_mask[0]]
    names = {name for name, code in SCALE_CODES.items() if code in set(refs[:, 0].tolist())}
    assert names == codes
    regions = len(features.region_index)
    expected = 1 + regions * ("region" in codes) + min(16, 40 - 1 - regions) * ("patch" in codes)
    assert refs.shape[0] == expected == processor.num_visual_tokens(inputs)[0]
    assert torch.isfinite(model(**processor(["Is there tumour?"], inputs, ["No."])).loss)
    processor.save_pretrained(tmp_path)  # the processor keeps the model's scales across saves
    assert HwsiProcessor.from_pretrained(tmp_path).visual_scales == tuple(scales)


def test_visual_scales_must_name_known_scales_and_keep_the_slide_token():
    with pytest.raises(ValueError, match="include wsi"):
        HwsiConfig(text_config=tiny_text_config(), visual_scales=["cell", "patch"])
    with pytest.raises(ValueError, match="include wsi"):
        HwsiConfig(text_config=tiny_text_config(), visual_scales=["wsi", "nucleus"])
    with pytest.raises(ValueError, match="concat"):
        HwsiConfig(text_config=tiny_text_config(), fusion_mode="resampler", visual_scales=["wsi"])
    config = HwsiConfig(text_config=tiny_text_config(), visual_scales=["wsi", "cell"])
    assert config.scales == ("cell", "wsi")


def test_budget_smaller_than_the_regions_is_refused(cmu_visual):
    _, visual = cmu_visual
    model, processor = make(token_budget=1)
    with pytest.raises(TokenBudgetError, match="budget"):
        model.model(**collate_visual([visual]))


def test_placeholder_count_mismatch_is_an_error(cmu_visual):
    _, visual = cmu_visual
    model, processor = make(fusion="resampler")
    ask = batch(processor, visual, ["Is there tumour?"])
    first = int((ask["input_ids"][0] == VISUAL_PLACEHOLDER_ID).nonzero()[0, 0])
    ask["input_ids"][0, first] = 5  # one visual token fewer than the model makes
    with pytest.raises(ValueError, match="placeholders"):
        model(**ask)


def test_padded_regions_and_patches_change_nothing(cmu_visual):
    _, visual = cmu_visual
    model, _ = make(fusion="resampler")
    small = collate_visual([visual])
    # The same slide padded to more regions and patch slots, with garbage in the padding.
    wide = {k: v.clone() for k, v in small.items()}
    for key in ("region", "region_pos"):
        wide[key] = torch.cat([wide[key], torch.randn_like(wide[key][:, :1]) * 100], dim=1)
    wide["region_mask"] = torch.cat([wide["region_mask"], torch.zeros(1, 1, dtype=torch.bool)], 1)
    for key in ("patch", "patch_mask", "cell", "cell_mask", "cell_pos"):
        pad = torch.randn_like(wide[key][:, :1]) * 100 if wide[key].is_floating_point() \
            else torch.zeros_like(wide[key][:, :1])
        wide[key] = torch.cat([wide[key], pad], dim=1)
    with torch.no_grad():
        a = model.model(**small).visual_tokens
        b = model.model(**wide).visual_tokens
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_masking_a_region_changes_the_slide_token(cmu_visual):
    """Occlusion evidence relies on it: the WSI token is aggregated from the real regions."""
    model, _ = make()
    regions = torch.randn(1, 3, 64)
    with torch.no_grad():
        full = model.model.aggregate_wsi(regions, torch.tensor([[True, True, True]]))
        dropped = model.model.aggregate_wsi(regions, torch.tensor([[True, True, False]]))
    assert not torch.allclose(full, dropped)
    torch.testing.assert_close(dropped, regions[:, :2].mean(dim=1))


def test_precomputed_cells_and_attention_pooling(cmu_visual):
    _, visual = cmu_visual
    model, processor = make(fusion="resampler", cell_fusion="precomputed",
                            wsi_aggregator="attention", region_position_encoding="none")
    pre = dict(visual)
    mask = visual["cell_mask"]
    pre["cell"] = (visual["cell"] * mask[..., None]).sum(2) / np.maximum(mask.sum(2), 1)[..., None]
    pre["cell_mask"] = mask.any(axis=2)
    del pre["cell_pos"]
    out = model(**processor(["Is there tumour?"], collate_visual([pre]), ["No."]))
    assert torch.isfinite(out.loss)
    assert model.model.ccaf is None and model.model.region_position is None


def test_invalid_switches_name_the_allowed_values():
    with pytest.raises(ValueError, match="fusion_mode must be one of concat, resampler"):
        HwsiConfig(text_config=tiny_text_config(), fusion_mode="mlp")
    with pytest.raises(ValueError, match="wsi_dim"):
        HwsiConfig(text_config=tiny_text_config(), wsi_dim=10, region_dim=12)


def test_loading_a_missing_folder_never_downloads(tmp_path):
    with pytest.raises(ModelFileNotFoundError, match="local paths only"):
        HwsiForConditionalGeneration.from_pretrained(tmp_path / "Bastech" / "MLLM-HWSI")


def test_cell_attention_is_exposed_for_evidence(cmu_visual):
    _, visual = cmu_visual
    model, _ = make()
    inputs = collate_visual([visual])
    with torch.no_grad():
        out = model.model(**inputs, output_attentions=True)
    attention = out.cell_attention
    real = inputs["cell_mask"] & inputs["patch_mask"][..., None]
    sums = attention.sum(-1)[real.any(-1)]
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert (attention[~real] == 0).all()


def test_model_without_the_worker_extra_names_it():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # as on an install without the worker extra\n"
        "from omero_hwsi.errors import MissingExtraError\n"
        "try:\n"
        "    import omero_hwsi.model\n"
        "except MissingExtraError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'omero-hwsi[worker]'" in out.stdout


def test_nan_in_padding_reaches_neither_outputs_nor_gradients(cmu_visual):
    _, visual = cmu_visual
    model, _ = make(fusion="resampler")
    model.train()
    inputs = collate_visual([visual])
    for key, mask in (("patch", "patch_mask"), ("cell", "cell_mask")):
        inputs[key][~inputs[mask]] = float("nan")
    out = model.model(**inputs)
    assert torch.isfinite(out.visual_tokens).all()
    out.visual_tokens.square().mean().backward()
    for name, param in model.model.named_parameters():
        if param.grad is not None:
            assert torch.isfinite(param.grad).all(), name


def test_scale_tokens_feed_the_consistency_loss(cmu_visual):
    from omero_hwsi.model.losses import consistency_loss

    _, visual = cmu_visual
    model, _ = make()
    inputs = collate_visual([visual])
    out = model.model(**inputs)
    b, r, c = inputs["patch_mask"].shape
    d = model.config.hidden_size
    assert out.region_tokens.shape == (b, r, d) and out.wsi_token.shape == (b, d)
    assert out.patch_tokens.shape == out.cell_tokens.shape == (b, r, c, d)
    # Region tokens are exposed before the position encoding, so consistency does not erase it.
    plain = model.model.projectors["region"](inputs["region"])
    torch.testing.assert_close(out.region_tokens, plain)
    assert (out.has_cells <= out.cell_token_mask).all()
    loss = consistency_loss(out.region_tokens, out.patch_tokens, inputs["patch_mask"],
                            out.cell_tokens, out.has_cells, inputs["region_mask"])
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
