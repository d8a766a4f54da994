from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import tiny_text_config

from omero_hwsi.errors import CheckpointMismatchError, ModelFileNotFoundError
from omero_hwsi.model import HwsiConfig, HwsiForConditionalGeneration
from omero_hwsi.training.stages import load_stage_weights, set_trainable


def model(fusion: str = "resampler", *, tied: bool = False, seed: int = 0) -> HwsiForConditionalGeneration:
    torch.manual_seed(seed)
    config = HwsiConfig(
        text_config=tiny_text_config("qwen2" if tied else "llama", vocab_size=64, tied=tied),
        wsi_dim=8, region_dim=8, patch_dim=6, cell_dim=5, ccaf_dim=8, projector_hidden=16,
        fusion_mode=fusion, num_queries=4, resampler_heads=4, align_dim=8,
    )
    return HwsiForConditionalGeneration(config)


def trainable(m: torch.nn.Module) -> set[str]:
    return {n for n, p in m.named_parameters() if p.requires_grad}


def test_each_stage_trains_only_its_modules():
    m = model()
    set_trainable(m, 1)
    names = trainable(m)
    assert names and all(n.startswith(("model.ccaf.", "model.cell_input.", "model.align_heads."))
                         for n in names)
    set_trainable(m, 2)
    names = trainable(m)
    assert any(n.startswith("model.projectors.") for n in names)
    assert any(n.startswith("model.resampler.") for n in names)
    assert not any(n.startswith(("language_model.", "model.ccaf.")) for n in names)
    counts = set_trainable(m, 3)
    assert "language_model.model" in counts and not any(
        n.startswith(("model.ccaf.", "model.align_heads.")) for n in trainable(m))
    set_trainable(m, 0)
    assert all(n.startswith("language_model.") for n in trainable(m))


def test_lora_stage_trains_adapters_not_the_base_llm():
    from peft import LoraConfig, get_peft_model

    m = model()
    m.language_model = get_peft_model(m.language_model, LoraConfig(r=4, lora_alpha=8,
                                                                   target_modules=["q_proj", "v_proj"]))
    set_trainable(m, 3, lora=True)
    llm = {n for n in trainable(m) if n.startswith("language_model.")}
    assert llm and all("lora_" in n for n in llm)
    assert any(n.startswith("model.projectors.") for n in trainable(m))
    with pytest.raises(ValueError, match="stage 3 only"):
        set_trainable(m, 2, lora=True)


@pytest.mark.parametrize("tied", [False, True])
def test_stage_two_weights_load_strictly_into_stage_three(tmp_path, tied):
    stage2 = model(tied=tied, seed=1)
    stage2.save_pretrained(tmp_path / "stage2")
    stage3 = model(tied=tied, seed=2)
    load_stage_weights(stage3, tmp_path / "stage2")
    for name, value in stage2.state_dict().items():
        assert torch.equal(value, stage3.state_dict()[name]), name


def test_missing_unexpected_and_reshaped_keys_are_named(tmp_path):
    model(seed=1).save_pretrained(tmp_path / "s")
    path = tmp_path / "s" / "model.safetensors"
    state = load_file(str(path))
    del state["model.resampler.queries"]
    state["model.extra.weight"] = torch.zeros(2)
    state["model.projectors.cell.net.1.weight"] = torch.zeros(3, 3)
    save_file(state, str(path))
    with pytest.raises(CheckpointMismatchError) as info:
        load_stage_weights(model(), tmp_path / "s")
    message = str(info.value)
    assert "missing: model.resampler.queries" in message
    assert "unexpected: model.extra.weight" in message
    assert "wrong shape: model.projectors.cell.net.1.weight" in message


def test_a_stage_folder_from_another_fusion_mode_is_refused(tmp_path):
    model("concat").save_pretrained(tmp_path / "concat")
    with pytest.raises(CheckpointMismatchError, match="missing: model.fusion"):
        load_stage_weights(model("resampler"), tmp_path / "concat")


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ModelFileNotFoundError, match="not found"):
        load_stage_weights(model(), tmp_path / "nope")
