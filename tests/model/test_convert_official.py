"""Importing the released MLLM-HWSI checkpoint, from tiny folders written in exactly its layout.

The key names and the forward pass are restated here from the released layout's description
(``shared/specs/official-checkpoint.md``), with plain torch functional ops, so the importer and
our modules are checked against the release, not against themselves.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny import tiny_text_config, tiny_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from omero_hwsi.cli import app
from omero_hwsi.errors import CheckpointMismatchError, InputError, ModelFileNotFoundError
from omero_hwsi.model import HwsiForConditionalGeneration, HwsiModel, HwsiProcessor
from omero_hwsi.model.convert_official import (
    RELEASED_EXPECTED_FEATURES,
    ReleasedLayout,
    check_layout,
    import_official,
    is_official_folder,
    load_official,
    read_released_layout,
)
from omero_hwsi.model.processing_hwsi import RELEASED_SYSTEM_PROMPT

D, HIDDEN, Q, HEADS = 64, 32, 8, 8
DIMS = {"wsi": 12, "region": 12, "patch": 20, "cell": 16}
PROJECTOR_CONFIG = {"llm_dim": D, "hidden_dim": HIDDEN, "dropout": 0.1, "use_layernorm": True,
                    "num_query_tokens": Q, "projector_type": "mlp"}


def spec_layout(d: int, hidden: int, q: int, dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """The vl_projector.pt keys and shapes as the release documents them."""
    table: dict[str, tuple[int, ...]] = {}
    for scale, d_s in dims.items():
        p = f"{scale}_proj.proj.projector"
        table |= {f"{p}.0.weight": (d_s,), f"{p}.0.bias": (d_s,), f"{p}.1.weight": (hidden, d_s),
                  f"{p}.1.bias": (hidden,), f"{p}.4.weight": (d, hidden), f"{p}.4.bias": (d,)}
    table |= {"fusion.fuse.0.weight": (4 * d,), "fusion.fuse.0.bias": (4 * d,),
              "fusion.fuse.1.weight": (2 * d, 4 * d), "fusion.fuse.1.bias": (2 * d,),
              "fusion.fuse.4.weight": (d, 2 * d), "fusion.fuse.4.bias": (d,),
              "fusion.out_norm.weight": (d,), "fusion.out_norm.bias": (d,),
              "compressor.queries": (1, q, d),
              "compressor.attn.in_proj_weight": (3 * d, d), "compressor.attn.in_proj_bias": (3 * d,),
              "compressor.attn.out_proj.weight": (d, d), "compressor.attn.out_proj.bias": (d,),
              "compressor.norm1.weight": (d,), "compressor.norm1.bias": (d,),
              "compressor.norm2.weight": (d,), "compressor.norm2.bias": (d,),
              "compressor.mlp.0.weight": (4 * d, d), "compressor.mlp.0.bias": (4 * d,),
              "compressor.mlp.3.weight": (d, 4 * d), "compressor.mlp.3.bias": (d,)}
    return table


def spec_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random released-layout weights; norm weights near 1 so every tensor matters."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in spec_layout(D, HIDDEN, Q, DIMS).items():
        value = torch.randn(shape, generator=gen) * (1 / math.sqrt(shape[-1]))
        is_norm = key.endswith("weight") and len(shape) == 1
        state[key] = 1 + 0.1 * value if is_norm else value
    return state


class NotATensor:
    """Something only a full unpickler could rebuild."""

    def __init__(self) -> None:
        self.payload = "anything"


def write_release(folder: Path, *, state: dict | None = None, wrap: str | None = "vl_projector_state_dict",
                  name: str = "vl_projector.pt", projector_config: dict | None = None,
                  shard: bool = False, tied: bool = False, extra: dict | None = None) -> Path:
    """A tiny released folder: Qwen2 LLM + tokenizer with chat template + projector files."""
    torch.manual_seed(1)
    tokenizer = tiny_tokenizer()
    text = tiny_text_config("qwen2", vocab_size=len(tokenizer), tied=tied)
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**text))
    llm.save_pretrained(folder, max_shard_size="40KB" if shard else "10GB")
    tokenizer.save_pretrained(folder)
    (folder / "projector_config.json").write_text(json.dumps(projector_config or PROJECTOR_CONFIG))
    weights = spec_state() if state is None else state
    blob = weights if wrap is None else {wrap: weights, "projector_cfg": projector_config or PROJECTOR_CONFIG}
    torch.save({**blob, **(extra or {})}, folder / name)
    return folder


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return write_release(tmp_path_factory.mktemp("released"))


@pytest.fixture(scope="module")
def imported(release) -> HwsiForConditionalGeneration:
    return load_official(release)


def spec_forward(sd, wsi, region, patch, cell, region_mask, patch_mask, cell_mask):
    """The released module's forward pass, restated from its description (functional ops only)."""

    def norm(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)

    def linear(x, p):
        return F.linear(x, sd[f"{p}.weight"], sd[f"{p}.bias"])

    def project(x, scale):
        p = f"{scale}_proj.proj.projector"
        return linear(F.gelu(linear(norm(x, f"{p}.0"), f"{p}.1")), f"{p}.4")

    def masked_mean(x, mask):
        kept = torch.where(mask[..., None], x, torch.zeros(()))
        return kept.sum(2) / mask.sum(2, keepdim=True).clamp(min=1)

    # 1. project each scale; zero the padded patch and cell slots
    w, r = project(wsi, "wsi"), project(region, "region")
    p = torch.where(patch_mask[..., None], project(patch, "patch"), torch.zeros(()))
    c = torch.where(cell_mask[..., None], project(cell, "cell"), torch.zeros(()))
    # 2. per region: [WSI, region, mean patch, mean cell] -> fusion MLP -> + region -> out_norm
    b, n_regions, d = r.shape
    joined = torch.cat([w[:, None].expand(b, n_regions, d), r, masked_mean(p, patch_mask),
                        masked_mean(c, cell_mask)], dim=-1)
    hidden = F.gelu(linear(norm(joined, "fusion.fuse.0"), "fusion.fuse.1"))
    fused = norm(linear(hidden, "fusion.fuse.4") + r, "fusion.out_norm")
    # 3. resampler: z = q + MHA(norm1(q), fused, fused, padded regions ignored); z += mlp(norm2(z))
    q = sd["compressor.queries"].expand(b, -1, -1)
    wq, wk, wv = sd["compressor.attn.in_proj_weight"].chunk(3)
    bq, bk, bv = sd["compressor.attn.in_proj_bias"].chunk(3)

    def heads(x):
        return x.reshape(b, x.shape[1], HEADS, d // HEADS).transpose(1, 2)

    qh = heads(F.linear(norm(q, "compressor.norm1"), wq, bq))
    kh, vh = heads(F.linear(fused, wk, bk)), heads(F.linear(fused, wv, bv))
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d // HEADS)
    scores = scores.masked_fill(~region_mask[:, None, None, :], float("-inf"))
    attended = (scores.softmax(-1) @ vh).transpose(1, 2).reshape(b, -1, d)
    z = q + linear(attended, "compressor.attn.out_proj")
    return z + linear(F.gelu(linear(norm(z, "compressor.norm2"), "compressor.mlp.0")), "compressor.mlp.3")


def slide_batch():
    """Two slides, R = 3, C = 4: slide 1 has a padded region; padded slots hold junk."""
    gen = torch.Generator().manual_seed(7)
    b, r, c = 2, 3, 4
    region_mask = torch.tensor([[True, True, True], [True, True, False]])
    patch_mask = torch.rand(b, r, c, generator=gen) > 0.3
    patch_mask[..., 0] = True
    patch_mask &= region_mask[..., None]
    cell_mask = patch_mask.clone()
    cell_mask[0, 1, 0] = False
    cell_mask[..., 1] = patch_mask[..., 1]
    cell_mask[1, 0, 0] = patch_mask[1, 0, 0]

    def feats(*shape, mask=None):
        x = torch.randn(*shape, generator=gen)
        if mask is not None:
            x = torch.where(mask[..., None], x, 1e3 * torch.randn(*shape, generator=gen))
        return x

    return dict(wsi=feats(b, DIMS["wsi"]), region=feats(b, r, DIMS["region"], mask=region_mask),
                patch=feats(b, r, c, DIMS["patch"], mask=patch_mask),
                cell=feats(b, r, c, DIMS["cell"], mask=cell_mask),
                region_mask=region_mask, patch_mask=patch_mask, cell_mask=cell_mask)


# -- (a) forward semantics, (b) LLM weights ----------------------------------------------------


def test_imported_model_computes_the_released_forward_pass(imported):
    inputs = slide_batch()
    assert inputs["cell_mask"].sum() < inputs["patch_mask"].sum() and not inputs["region_mask"].all()
    with torch.no_grad():
        ours = imported.get_visual_tokens(**inputs)
        expected = spec_forward(spec_state(), **inputs)
    assert ours.shape == (2, Q, D)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_imported_config_is_the_released_setup(imported):
    config = imported.config
    assert (config.fusion_mode, config.cell_fusion, config.region_position_encoding,
            config.wsi_aggregator, config.prompt_layout, config.align_dim) == (
        "resampler", "precomputed", "none", "mean", "released", None)
    assert (config.wsi_dim, config.region_dim, config.patch_dim, config.cell_dim) == (12, 12, 20, 16)
    assert (config.projector_hidden, config.num_queries, config.resampler_heads, config.hidden_size) == (
        HIDDEN, Q, HEADS, D)
    assert config.expected_features["patch"]["id"] == "conch_v1"
    assert config.expected_features["patch"]["dim"] == 20
    assert config.expected_features["grid"] == RELEASED_EXPECTED_FEATURES["grid"]
    assert not imported.training


def test_llm_weights_and_outputs_are_the_folders(release, imported):
    saved = load_file(str(release / "model.safetensors"))
    ours = imported.language_model.state_dict()
    assert set(saved) <= set(ours)
    for key, value in saved.items():
        assert torch.equal(ours[key], value), key
    reference = AutoModelForCausalLM.from_pretrained(release, local_files_only=True).eval()
    ids = torch.tensor([[5, 17, 42, 3, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(imported.language_model(input_ids=ids).logits,
                                   reference(input_ids=ids).logits, atol=0, rtol=0)


# -- (c) wrappers, (g) shards ---------------------------------------------------------------------


@pytest.mark.parametrize(("wrap", "name"), [("state_dict", "vl_projector.pt"),
                                            ("pathology_encoder_state_dict", "vl_projector.pt"),
                                            (None, "vl_projector.pt"),
                                            ("vl_projector_state_dict", "best_vl_projector.pt")])
def test_wrapped_and_bare_state_dicts_load(tmp_path, wrap, name):
    model = load_official(write_release(tmp_path, wrap=wrap, name=name))
    assert torch.equal(model.model.resampler.queries, spec_state()["compressor.queries"])
    assert torch.equal(model.model.projectors["cell"].net[4].weight,
                       spec_state()["cell_proj.proj.projector.4.weight"])


def test_sharded_llm_with_tied_embeddings_loads(tmp_path, release, imported):
    folder = write_release(tmp_path, shard=True, tied=True)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    model = load_official(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    for key, value in reference.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[key], value), key
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()


# -- (d) mismatches, (e) linear, (f) unsafe pickles ------------------------------------------------


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_missing_unexpected_and_reshaped_keys_are_all_named_as_in_the_file(tmp_path):
    state = spec_state()
    del state["fusion.out_norm.weight"]
    state["foo"] = torch.zeros(3)
    state["compressor.queries"] = torch.zeros(1, 4, D)
    folder = write_release(tmp_path / "bad", state=state)
    with pytest.raises(CheckpointMismatchError) as err:
        import_official(folder, tmp_path / "out")
    text = one_line(err)
    assert "missing: fusion.out_norm.weight;" in text
    assert "unexpected: foo;" in text
    assert f"wrong shape: compressor.queries (1, 4, {D}) vs expected (1, {Q}, {D})" in text
    assert "model.fusion" not in text and "model.resampler" not in text  # spelled as in the file
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_llm_key_problems_are_named_as_in_the_llm_files(tmp_path):
    from safetensors.torch import save_file

    folder = write_release(tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.norm.weight"]
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:-1].clone()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as err:
        load_official(folder)
    text = one_line(err)
    assert "missing: model.norm.weight;" in text
    assert "wrong shape: model.embed_tokens.weight" in text and "language_model" not in text


def test_sizes_that_disagree_between_files_are_refused(tmp_path):
    folder = write_release(tmp_path, projector_config={**PROJECTOR_CONFIG, "llm_dim": 128})
    with pytest.raises(CheckpointMismatchError, match="llm_dim 128 does not match the LLM's hidden_size 64"):
        load_official(folder)


def test_a_repeated_projector_config_must_agree(tmp_path):
    state = {"vl_projector_state_dict": spec_state(), "projector_cfg": {**PROJECTOR_CONFIG, "num_query_tokens": 16}}
    folder = write_release(tmp_path, state=state, wrap=None)
    with pytest.raises(CheckpointMismatchError, match="projector_cfg differs .*num_query_tokens 16 vs 8"):
        load_official(folder)


def test_linear_projector_type_is_refused_naming_the_keys_found(tmp_path):
    folder = write_release(tmp_path, projector_config={**PROJECTOR_CONFIG, "projector_type": "linear"})
    with pytest.raises(CheckpointMismatchError) as err:
        load_official(folder)
    text = one_line(err)
    assert "projector_type 'linear'" in text and "undocumented" in text
    assert "cell_proj.proj.projector.0.bias" in text


def test_a_pickle_needing_arbitrary_code_is_refused_in_one_line(tmp_path):
    folder = write_release(tmp_path, extra={"note": NotATensor()})
    with pytest.raises(CheckpointMismatchError) as err:
        load_official(folder)
    text = one_line(err)
    assert "vl_projector.pt" in text and "weights_only=True" in text and "NotATensor" in text


def test_missing_files_are_named(tmp_path, release):
    folder = tmp_path / "copy"
    shutil.copytree(release, folder)
    (folder / "vl_projector.pt").unlink()
    with pytest.raises(ModelFileNotFoundError, match="vl_projector.pt or best_vl_projector.pt"):
        load_official(folder)
    with pytest.raises(ModelFileNotFoundError, match="folder not found"):
        load_official(tmp_path / "nowhere")


# -- (h) our format, from_pretrained -------------------------------------------------------------


def test_import_round_trips_through_our_format(tmp_path, release, imported):
    out = import_official(release, tmp_path / "models" / "mllm-hwsi")
    assert out == tmp_path / "models" / "mllm-hwsi"
    assert [p.name for p in out.parent.iterdir()] == ["mllm-hwsi"]  # no staging folder left
    assert not is_official_folder(out) and is_official_folder(release)
    model = HwsiForConditionalGeneration.from_pretrained(out).eval()
    processor = HwsiProcessor.from_pretrained(out)
    assert (processor.prompt_layout, processor.fusion_mode, processor.num_queries) == ("released", "resampler", Q)
    assert processor.system_prompt == RELEASED_SYSTEM_PROMPT
    inputs = slide_batch()
    with torch.no_grad():
        torch.testing.assert_close(model.get_visual_tokens(**inputs),
                                   imported.get_visual_tokens(**inputs), atol=0, rtol=0)
    for key, value in imported.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    batch = processor(["Describe the tissue."], {"region": inputs["region"][:1],
                                                  "region_mask": inputs["region_mask"][:1]})
    assert (batch["input_ids"] < 0).sum() == Q
    new = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=3,
                         **{k: v[:1] for k, v in inputs.items()})
    assert new.shape == (1, 3)


def test_import_refuses_a_non_empty_output_folder(tmp_path, release):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not an empty folder"):
        import_official(release, tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert (import_official(release, tmp_path / "empty") / "processor_config.json").is_file()


def test_from_pretrained_reads_a_released_folder_directly(release, imported):
    model = HwsiForConditionalGeneration.from_pretrained(release)
    assert model.config.prompt_layout == "released"
    for key, value in imported.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(CheckpointMismatchError, match="only as HwsiForConditionalGeneration"):
        HwsiModel.from_pretrained(release)


def test_the_inference_pipeline_opens_a_released_folder(release, imported):
    from omero_hwsi.inference import HwsiPipeline

    pipeline = HwsiPipeline.from_pretrained(release, device="cpu")
    assert pipeline.processor.prompt_layout == "released"
    info = pipeline.model_info()
    assert (info["fusion_mode"], info["cell_fusion"], info["wsi_aggregator"]) == (
        "resampler", "precomputed", "mean")
    for key, value in imported.state_dict().items():
        assert torch.equal(pipeline.model.state_dict()[key], value), key


# -- (i) full size on the meta device ---------------------------------------------------------------

QWEN25_7B = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584,
             "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
             "intermediate_size": 18944, "vocab_size": 152064, "max_position_embeddings": 32768,
             "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
             "torch_dtype": "bfloat16"}
RELEASED_PROJECTOR = {"llm_dim": 3584, "hidden_dim": 1024, "dropout": 0.1, "use_layernorm": True,
                      "num_query_tokens": 64, "projector_type": "mlp"}
RELEASED_DIMS = {"wsi": 192, "region": 192, "patch": 512, "cell": 384}


def test_full_size_layout_converts_exactly_without_allocating():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**QWEN25_7B))
    llm_table = {k: tuple(v.shape) for k, v in llm.state_dict().items()}
    spec = spec_layout(3584, 1024, 64, RELEASED_DIMS)
    count = check_layout(RELEASED_PROJECTOR, QWEN25_7B, ReleasedLayout(projector=spec, llm=llm_table))
    assert check_layout(RELEASED_PROJECTOR, QWEN25_7B) == count  # the importer's own table agrees
    qwen_7b = 7_615_616_512  # Qwen2.5-7B's published parameter count
    assert count == qwen_7b + sum(math.prod(s) for s in spec.values())
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 512 * 1024
    broken = dict(spec)
    broken["compressor.queries"] = (1, 32, 3584)
    with pytest.raises(CheckpointMismatchError,
                       match=r"wrong shape: compressor.queries \(1, 32, 3584\) vs expected \(1, 64, 3584\)"):
        check_layout(RELEASED_PROJECTOR, QWEN25_7B, ReleasedLayout(projector=broken, llm=llm_table))


def test_a_folders_layout_can_be_read_and_checked_without_loading(release):
    layout = read_released_layout(release)
    assert layout.projector == spec_layout(D, HIDDEN, Q, DIMS)
    text = json.loads((release / "config.json").read_text())
    assert check_layout(PROJECTOR_CONFIG, text, layout) > 0


# -- (j) CLI ------------------------------------------------------------------------------------------


def test_cli_imports_and_prints_the_folder(tmp_path, release, isolated_env):
    out = tmp_path / "imported"
    result = CliRunner().invoke(app, ["model", "import-official", str(release), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert f"qwen2 LLM of width {D}, {Q} visual queries" in result.stderr
    assert "parameters" in result.stderr


def test_cli_mismatch_exits_3_with_one_error_line(tmp_path, isolated_env):
    state = spec_state()
    del state["compressor.norm2.bias"]
    folder = write_release(tmp_path / "bad", state=state)
    result = CliRunner().invoke(app, ["model", "import-official", str(folder), "--out", str(tmp_path / "o")])
    assert result.exit_code == 3
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "missing: compressor.norm2.bias" in lines[0]
    assert result.stdout == "" and not (tmp_path / "o").exists()
