from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from tiny import UNSTABLE_TEMPLATE, tiny_tokenizer

from omero_hwsi.errors import ModelFileNotFoundError
from omero_hwsi.features.extract import ExtractionConfig, extract_slide
from omero_hwsi.features.store import load_features
from omero_hwsi.model.budget import TokenBudgetError, concat_token_count
from omero_hwsi.model.processing_hwsi import (
    IGNORE_INDEX,
    RELEASED_SYSTEM_PROMPT,
    VISUAL_PLACEHOLDER_ID,
    HwsiProcessor,
    collate_visual,
    visual_inputs,
)
from omero_hwsi.slide.hierarchy import cell_hid

PH = VISUAL_PLACEHOLDER_ID

def fake_slide(regions: int, slots: int, cells: int, *, filled: int | None = None,
               seed: int = 0) -> dict[str, np.ndarray]:
    """Per-nucleus visual inputs of a made-up slide (first ``filled`` slots real)."""
    rng = np.random.default_rng(seed)
    filled = slots if filled is None else filled
    patch_mask = np.zeros((regions, slots), bool)
    patch_mask[:, :filled] = True
    cell_mask = np.zeros((regions, slots, cells), bool)
    cell_mask[:, :filled, : max(1, cells - 1)] = True
    return {
        "region": rng.normal(size=(regions, 6)).astype(np.float32),
        "region_mask": np.ones(regions, bool),
        "region_pos": rng.uniform(size=(regions, 2)).astype(np.float32),
        "patch": rng.normal(size=(regions, slots, 5)).astype(np.float32) * patch_mask[..., None],
        "patch_mask": patch_mask,
        "cell": rng.normal(size=(regions, slots, cells, 4)).astype(np.float32) * cell_mask[..., None],
        "cell_mask": cell_mask,
        "cell_pos": rng.uniform(size=(regions, slots, cells, 2)).astype(np.float32),
        "region_index": np.arange(regions, dtype=np.int64) + 10,
        "patch_index": np.where(patch_mask, np.arange(slots), -1).astype(np.int64),
        "cell_k": np.where(cell_mask, np.arange(cells), -1).astype(np.int64),
    }


@pytest.fixture(scope="module")
def cmu_features(fixture_slide, tmp_path_factory):
    result = extract_slide(fixture_slide("CMU-1-Small-Region.svs"), tmp_path_factory.mktemp("store"),
                           config=ExtractionConfig(workers=0))
    return load_features(result.path)


# -- prompts --------------------------------------------------------------------------------


def test_tokenizer_without_chat_template_is_refused():
    with pytest.raises(ValueError, match="chat template"):
        HwsiProcessor(tiny_tokenizer(chat_template=None))


def test_hwsi_layout_wraps_placeholders_between_marker_tokens():
    tokenizer = tiny_tokenizer()
    before = len(tokenizer)
    processor = HwsiProcessor(tokenizer)
    assert processor.added_tokens == ["<hwsi_start>", "<hwsi_visual>", "<hwsi_end>"]
    assert len(processor.tokenizer) == before + 3
    ids, labels = processor.encode_prompt("Describe the tissue.", 7)
    spots = [i for i, t in enumerate(ids) if t == PH]
    assert spots == list(range(spots[0], spots[0] + 7))
    assert ids[spots[0] - 1] == processor.visual_start_id
    assert ids[spots[-1] + 1] == processor.visual_end_id
    assert processor.tokenizer.convert_tokens_to_ids("<hwsi_visual>") not in ids
    assert set(labels) == {IGNORE_INDEX}
    text = processor.tokenizer.decode([t for t in ids if t >= 0])
    assert "You are a pathology assistant. Answer from the slide shown." in text
    assert text.endswith("<|im_start|>assistant\n")


def test_released_layout_puts_placeholders_first_and_adds_no_tokens():
    tokenizer = tiny_tokenizer()
    before = len(tokenizer)
    processor = HwsiProcessor(tokenizer, prompt_layout="released", fusion_mode="resampler")
    assert processor.added_tokens == [] and len(tokenizer) == before
    assert processor.system_prompt == RELEASED_SYSTEM_PROMPT
    ids, _ = processor.encode_prompt("Describe the tissue.", 64)
    assert ids[:64] == [PH] * 64 and PH not in ids[64:]
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": RELEASED_SYSTEM_PROMPT},
         {"role": "user", "content": "Describe the tissue."}],
        tokenize=False, add_generation_prompt=True,
    )
    assert ids[64:] == tokenizer(expected, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("layout", ["hwsi", "released"])
def test_labels_cover_exactly_the_answer_and_end_of_turn(layout):
    processor = HwsiProcessor(tiny_tokenizer(), prompt_layout=layout)
    answer = "Yes, the tumour shows necrosis."
    ids, labels = processor.encode_prompt("Is there invasive carcinoma?", 5, answer)
    assert len(ids) == len(labels) and ids.count(PH) == 5
    supervised = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
    assert supervised == list(range(supervised[0], len(ids)))  # one span, at the end
    assert [ids[i] for i in supervised] == [labels[i] for i in supervised]
    assert processor.tokenizer.decode([labels[i] for i in supervised]) == answer + "<|im_end|>\n"


@pytest.mark.parametrize("layout", ["hwsi", "released"])
def test_inference_prompt_is_the_prefix_training_saw(layout):
    processor = HwsiProcessor(tiny_tokenizer(), prompt_layout=layout)
    prompt, _ = processor.encode_prompt("Describe the tissue.", 9)
    full, labels = processor.encode_prompt("Describe the tissue.", 9, "Many mitoses.")
    assert full[: len(prompt)] == prompt
    assert set(labels[: len(prompt)]) == {IGNORE_INDEX}
    assert labels[len(prompt)] != IGNORE_INDEX


def test_template_that_is_not_prefix_stable_is_refused():
    processor = HwsiProcessor(tiny_tokenizer(UNSTABLE_TEMPLATE))
    processor.encode_prompt("Describe the tissue.", 3)  # inference alone is fine
    with pytest.raises(ValueError, match="prefix-stable"):
        processor.encode_prompt("Describe the tissue.", 3, "Necrosis.")


def test_marker_text_in_a_question_is_refused():
    processor = HwsiProcessor(tiny_tokenizer())
    with pytest.raises(ValueError, match="<hwsi_visual>"):
        processor.encode_prompt("what is <hwsi_visual>?", 3)


# -- visual token counts ----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hwsi", "released"])
@pytest.mark.parametrize("fusion", ["concat", "resampler"])
def test_placeholders_match_the_models_visual_token_count(layout, fusion):
    processor = HwsiProcessor(tiny_tokenizer(), prompt_layout=layout, fusion_mode=fusion,
                              num_queries=8, token_budget=40)
    visual = collate_visual([fake_slide(2, 4, 3, filled=3), fake_slide(5, 4, 2, seed=1)])
    counts = processor.num_visual_tokens(visual)
    if fusion == "resampler":
        assert counts == [8, 8]
    else:
        # Budget 40 holds all of slide 0 (2 regions + wsi + 6 patches + 6 cells = 15), not slide 1.
        assert counts == [15, 40]
    batch = processor(["Describe the tissue.", "Is there carcinoma?"], visual)
    assert [(row == PH).sum().item() for row in batch["input_ids"]] == counts


def test_concat_count_follows_the_budget_rule():
    processor = HwsiProcessor(tiny_tokenizer(), token_budget=1024)
    visual = collate_visual([fake_slide(3, 4, 2, filled=2)])
    mask = visual["patch_mask"]
    assert processor.num_visual_tokens(visual) == [3 + 1 + 6 + 6]
    assert processor.num_visual_tokens(visual) == concat_token_count(visual["region_mask"], mask, mask, 1024)
    tight = HwsiProcessor(tiny_tokenizer(), token_budget=7)
    assert tight.num_visual_tokens(visual) == [7]  # regions + wsi always, then fill to the budget
    with pytest.raises(TokenBudgetError, match="budget is 3"):
        HwsiProcessor(tiny_tokenizer(), token_budget=3).num_visual_tokens(visual)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding_keeps_placeholders_and_masks_pads(side):
    processor = HwsiProcessor(tiny_tokenizer(), token_budget=64)
    visual = collate_visual([fake_slide(1, 2, 2), fake_slide(4, 3, 2, seed=1)])
    questions = ["Describe the tissue.", "Is there invasive carcinoma in this slide?"]
    answers = ["Necrosis.", "Yes, the tumour shows necrosis and many mitoses."]
    batch = processor(questions, visual, answers, padding_side=side)
    counts = processor.num_visual_tokens(visual)
    pad = processor.tokenizer.pad_token_id
    assert pad == processor.tokenizer.eos_token_id  # pad = eos when the tokenizer had none
    length = batch["input_ids"].shape[1]
    for b in range(2):
        ids, labels = processor.encode_prompt(questions[b], counts[b], answers[b])
        n = len(ids)
        real = slice(length - n, length) if side == "left" else slice(0, n)
        pads = slice(0, length - n) if side == "left" else slice(n, length)
        assert batch["input_ids"][b, real].tolist() == ids
        assert batch["labels"][b, real].tolist() == labels
        assert batch["attention_mask"][b, real].eq(1).all()
        assert batch["input_ids"][b, pads].eq(pad).all()
        assert batch["attention_mask"][b, pads].eq(0).all()
        assert batch["labels"][b, pads].eq(IGNORE_INDEX).all()
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.int64
    assert batch["patch"] is visual["patch"]
    assert "labels" not in processor(questions, visual)


def test_decode_drops_placeholders_and_special_tokens():
    processor = HwsiProcessor(tiny_tokenizer())
    ids, _ = processor.encode_prompt("Describe the tissue.", 4, "Necrosis.")
    assert processor.decode(torch.tensor(ids)).endswith("Describe the tissue.\nassistant\nNecrosis.")


# -- visual inputs from a real feature store ---------------------------------------------------


def test_visual_inputs_follow_the_store(cmu_features):
    f = cmu_features
    v = visual_inputs(f, max_cells=10_000)  # no cap: every nucleus of a selected patch
    regions, slots = f.selected.shape
    d_cell = f.nuclei.descriptor.shape[1]
    per_patch = [int(np.sum((f.nuclei.region == r) & (f.nuclei.patch == j)))
                 for r in range(regions) for j in f.selected[r] if j >= 0]
    n = max(per_patch)
    assert v["region"].shape == (regions, f.region_features.shape[1])
    assert v["region_mask"].all()
    width, height = f.provenance["slide"]["width"], f.provenance["slide"]["height"]
    x, y, w, h = f.region_boxes[0]
    np.testing.assert_allclose(v["region_pos"][0], np.clip([(x + w / 2) / width, (y + h / 2) / height], 0, 1))
    assert v["patch"].shape == (regions, slots, f.patch_features.shape[2])
    assert v["cell"].shape == (regions, slots, n, d_cell)
    assert v["cell_pos"].shape == (regions, slots, n, 2) and v["cell_k"].shape == (regions, slots, n)
    assert "wsi" not in v  # the model aggregates the slide vector from the regions
    np.testing.assert_array_equal(v["region_index"], f.region_index)
    # Rank order is the store's selection.
    np.testing.assert_array_equal(v["patch_index"], np.where(f.selected >= 0, f.selected, -1))
    np.testing.assert_array_equal(v["patch_mask"], f.selected >= 0)
    for r in range(regions):
        for c in range(slots):
            j = int(f.selected[r, c])
            if j >= 0:
                np.testing.assert_array_equal(v["patch"][r, c], f.patch_features[r, j])
    assert ((v["cell_pos"] >= 0) & (v["cell_pos"] <= 1)).all()
    assert v["cell_mask"].sum(axis=-1)[v["patch_mask"]].tolist() == per_patch
    # Every real cell slot is a stored nucleus of its patch, with its own descriptor.
    row_of = {hid: i for i, hid in enumerate(f.nucleus_ids())}
    seen = []
    for r, c, m in zip(*np.nonzero(v["cell_mask"]), strict=True):
        hid = cell_hid(int(v["region_index"][r]), int(v["patch_index"][r, c]), int(v["cell_k"][r, c, m]))
        np.testing.assert_array_equal(v["cell"][r, c, m], f.nuclei.descriptor[row_of[hid]])
        seen.append(hid)
    selected_nuclei = {
        hid for hid, r, j in zip(f.nucleus_ids(), f.nuclei.region, f.nuclei.patch, strict=True)
        if j in set(f.selected[r].tolist())
    }
    assert sorted(seen) == sorted(selected_nuclei)
    assert (v["cell_k"] >= 0).sum() == len(seen)
    assert not v["cell"][~v["cell_mask"]].any()


def test_empty_selection_slots_are_masked_zeros(cmu_features):
    selected = cmu_features.selected.copy()
    selected[:, 5:] = -1  # as in a region with only five on-tissue patches
    v = visual_inputs(replace(cmu_features, selected=selected))
    assert v["patch_mask"][:, :5].all() and not v["patch_mask"][:, 5:].any()
    assert not v["patch"][:, 5:].any() and not v["cell"][:, 5:].any()
    assert not v["cell_mask"][:, 5:].any()
    assert (v["patch_index"][:, 5:] == -1).all() and (v["cell_k"][:, 5:] == -1).all()


def test_cell_cap_keeps_the_first_nuclei_by_k(cmu_features):
    full = visual_inputs(cmu_features, max_cells=10_000)
    assert full["cell"].shape[2] > 3  # the cap below really cuts
    v = visual_inputs(cmu_features, max_cells=3)
    assert v["cell"].shape[2] == 3
    np.testing.assert_array_equal(v["cell_k"], full["cell_k"][:, :, :3])
    np.testing.assert_array_equal(v["cell"], full["cell"][:, :, :3])
    assert set(v["cell_k"][v["cell_mask"]].tolist()) == {0, 1, 2}
    assert visual_inputs(cmu_features)["cell"].shape[2] == min(64, full["cell"].shape[2])
    with pytest.raises(ValueError, match="max_cells"):
        visual_inputs(cmu_features, max_cells=0)


def test_collate_pads_mixed_regions_patches_and_cells(cmu_features):
    real = visual_inputs(cmu_features, max_cells=3)
    made = fake_slide(2, 5, 6, filled=3, seed=2)
    made.update(region=np.ones((2, real["region"].shape[1]), np.float32),
                patch=np.ones((2, 5, real["patch"].shape[2]), np.float32),
                cell=np.ones((2, 5, 6, real["cell"].shape[3]), np.float32))
    batch = collate_visual([real, made])
    r0, c0, n0 = real["cell_mask"].shape
    r, c, n = max(r0, 2), max(c0, 5), max(n0, 6)
    assert batch["cell"].shape == (2, r, c, n, real["cell"].shape[3])
    assert batch["cell_pos"].shape == (2, r, c, n, 2)
    assert batch["patch_mask"].shape == (2, r, c) and batch["region_mask"].shape == (2, r)
    assert batch["region"].dtype == torch.float32 and batch["cell_mask"].dtype == torch.bool
    assert batch["cell_k"].dtype == torch.int64
    # The real store's slide keeps its values; everything beyond it is padding.
    np.testing.assert_array_equal(batch["cell"][0, :r0, :c0, :n0].numpy(), real["cell"])
    assert not batch["cell_mask"][0, :, :, n0:].any() and not batch["patch_mask"][0, :, c0:].any()
    assert not batch["region_mask"][0, r0:].any() and not batch["region_mask"][1, 2:].any()
    assert batch["cell_k"][0, :, :, n0:].eq(-1).all() and batch["region_index"][1, 2:].eq(-1).all()
    assert batch["patch"][1, 2:].eq(0).all() and batch["cell"][0, r0:].eq(0).all()


def test_collate_handles_precomputed_cells():
    items = []
    for regions, slots in ((1, 2), (3, 4)):
        mask = np.ones((regions, slots), bool)
        item = fake_slide(regions, slots, 1)
        del item["cell_pos"], item["cell_k"]
        item.update(cell=np.ones((regions, slots, 7), np.float32), cell_mask=mask)
        items.append(item)
    batch = collate_visual(items)
    assert batch["cell"].shape == (2, 3, 4, 7) and batch["cell_mask"].shape == (2, 3, 4)
    assert batch["cell_mask"].sum().item() == 2 + 12
    mixed = [items[0], fake_slide(1, 2, 2)]
    del mixed[1]["cell_pos"], mixed[1]["cell_k"]
    with pytest.raises(ValueError, match="per-nucleus and precomputed"):
        collate_visual(mixed)


# -- persistence ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hwsi", "released"])
def test_save_and_load_give_identical_encodings(tmp_path, layout):
    processor = HwsiProcessor(tiny_tokenizer(), prompt_layout=layout, fusion_mode="resampler",
                              num_queries=6, token_budget=99, system_prompt="Be brief.")
    processor.save_pretrained(tmp_path / "proc")
    loaded = HwsiProcessor.from_pretrained(tmp_path / "proc")
    assert loaded.to_dict() == processor.to_dict()
    assert len(loaded.tokenizer) == len(processor.tokenizer)
    assert loaded.added_tokens == processor.added_tokens
    for answer in (None, "Yes, the tumour shows necrosis."):
        assert loaded.encode_prompt("Describe the tissue.", 6, answer) == \
            processor.encode_prompt("Describe the tissue.", 6, answer)
    visual = collate_visual([fake_slide(2, 3, 2)])
    a, b = processor(["Describe the tissue."], visual), loaded(["Describe the tissue."], visual)
    assert torch.equal(a["input_ids"], b["input_ids"])


def test_loading_from_a_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "no-such-processor"
    with pytest.raises(ModelFileNotFoundError, match="no-such-processor"):
        HwsiProcessor.from_pretrained(missing)
    missing.mkdir()
    with pytest.raises(ModelFileNotFoundError, match="processor_config.json"):
        HwsiProcessor.from_pretrained(missing)
