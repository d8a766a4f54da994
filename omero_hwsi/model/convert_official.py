"""Import the authors' released MLLM-HWSI checkpoint into this project's model format.

The release (see ``docs/released-weights.md``) is a Hugging Face causal-LM folder with its LoRA
adapters merged, plus ``projector_config.json`` and a pickled vision-language module,
``vl_projector.pt``. Its modules are the ones :mod:`omero_hwsi.model.layers` reproduces (scale
projectors, per-region fusion, learned-query resampler), under other names. This module:

* reads every size from the files (``projector_config.json``, the tensors, ``config.json``),
  never from constants, so a differently sized release either converts exactly or is refused;
* renames keys with one explicit table, :data:`CONVERSION_TABLE`, and nothing else: no tensor
  is reshaped, dropped or left at its random initial value;
* compares the whole converted key/shape table with the model built on the meta device before
  a single weight is loaded, and reports every missing, unexpected and reshaped key in one line,
  spelled as in the released files;
* unpickles only plain tensors and containers (``torch.load(..., weights_only=True)``): a file
  that needs arbitrary code to load is refused, never retried unsafely.

The result is an :class:`~omero_hwsi.model.modeling_hwsi.HwsiForConditionalGeneration` with
``fusion_mode="resampler"``, ``cell_fusion="precomputed"``, ``region_position_encoding="none"``,
``wsi_aggregator="mean"`` and ``prompt_layout="released"``: the released model's behaviour.
Shape letters: D LLM width, Q learned queries, d_s a scale's input width.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from math import prod
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from omero_hwsi.errors import CheckpointMismatchError, InputError, ModelFileNotFoundError
from omero_hwsi.model._json import read_json_object
from omero_hwsi.model.configuration_hwsi import HwsiConfig
from omero_hwsi.model.modeling_hwsi import HwsiForConditionalGeneration

__all__ = [
    "CONVERSION_TABLE",
    "PROJECTOR_CONFIG",
    "PROJECTOR_FILES",
    "RELEASED_EXPECTED_FEATURES",
    "ProjectorConfig",
    "ReleasedLayout",
    "check_layout",
    "describe_imported",
    "import_official",
    "is_official_folder",
    "load_official",
    "read_released_layout",
    "released_layout",
]

logger = logging.getLogger(__name__)

PROJECTOR_CONFIG = "projector_config.json"
"""The file that tells a released folder apart from a Hugging Face folder of ours."""

PROJECTOR_FILES = ("vl_projector.pt", "best_vl_projector.pt")
"""Names of the vision-language module's weights, in order of preference (release, training)."""

_WRAPPERS = ("vl_projector_state_dict", "state_dict", "pathology_encoder_state_dict")
"""Keys under which the state dict may sit in ``vl_projector.pt`` (newest first)."""

_SCALES = ("wsi", "region", "patch", "cell")

_RELEASED_INPUT_DIMS = {"wsi": 192, "region": 192, "patch": 512, "cell": 384}
"""Input widths of the released model; used only to name a size that no tensor gives."""

_DEFAULT_HEADS = 8
"""Resampler heads of the released model: not in its files, so taken from the reference code."""

Source = Literal["projector", "llm"]
"""Which released file a key lives in: ``vl_projector.pt`` or the LLM's safetensors."""

CONVERSION_TABLE: tuple[tuple[Source, str, str], ...] = (
    ("projector", "wsi_proj.proj.projector.", "model.projectors.wsi.net."),
    ("projector", "region_proj.proj.projector.", "model.projectors.region.net."),
    ("projector", "patch_proj.proj.projector.", "model.projectors.patch.net."),
    ("projector", "cell_proj.proj.projector.", "model.projectors.cell.net."),
    ("projector", "fusion.", "model.fusion."),
    ("projector", "compressor.", "model.resampler."),
    ("llm", "", "language_model."),
)
"""``(file, released prefix, our prefix)``: the only renaming the importer does.

Indices and leaf names after the prefix are kept as they are (``projector.{0,1,4}`` is
``net.{0,1,4}``; ``fusion.fuse.*``, ``fusion.out_norm.*`` and ``compressor.{queries, attn.*,
norm1.*, norm2.*, mlp.{0,3}.*}`` keep their names), because our modules were built with the
released layouts. Whether a renamed key exists, with which shape, is decided by comparing with
the model, not by this table.
"""

RELEASED_EXPECTED_FEATURES: dict[str, Any] = {
    "patch": {"id": "conch_v1", "version": "1", "dim": 512},
    "region": {"id": "hipt_vit4k", "version": "1", "dim": 192},
    "nucleus": {"id": "cellvit256", "version": "1", "dim": 384},
    "grid": {"target_mpp": 0.5, "region_px": 4096, "patch_px": 256},
}
"""The encoders and grid the released weights were trained on (``HwsiConfig.expected_features``).

Patch: CONCH v1 image embeddings; region: HIPT ViT-4K CLS; nucleus: CellViT-256 tokens per
nucleus, fused into one vector per patch by a frozen DINOv2 ViT-S/14; 4096 px regions of
256 px patches at 0.5 um/px. Inference refuses a feature store made with anything else.
"""

_SHOWN_PER_KIND = 20
"""Keys listed per kind of problem before the rest is counted (a wrong LLM has hundreds)."""

Shape = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ProjectorConfig:
    """The validated content of ``projector_config.json``.

    Attributes:
        llm_dim: LLM width D the module projects to (must equal ``config.json``'s hidden size).
        hidden_dim: hidden width of each scale projector.
        dropout: dropout probability of the projectors, fusion and resampler (training only).
        use_layernorm: whether each scale projector starts with a LayerNorm.
        num_query_tokens: learned queries Q, the visual tokens per slide.
        projector_type: ``mlp`` (importable) or ``linear`` (undocumented key layout: refused).
        num_heads: resampler attention heads (8 unless the file says otherwise).
    """

    llm_dim: int
    hidden_dim: int
    dropout: float
    use_layernorm: bool
    num_query_tokens: int
    projector_type: Literal["mlp", "linear"]
    num_heads: int = _DEFAULT_HEADS


@dataclass(frozen=True, slots=True)
class ReleasedLayout:
    """Key -> shape of a released folder's two weight files, keys spelled as in the files.

    Attributes:
        projector: the state dict of ``vl_projector.pt``.
        llm: the LLM's safetensors (all shards together).
    """

    projector: dict[str, Shape]
    llm: dict[str, Shape]


# -- reading the folder ---------------------------------------------------------------------


def is_official_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder in the released layout (it holds ``projector_config.json``).

    Our own saved models never hold that file, so the test is unambiguous; whether the rest of
    the released layout is there is checked (with a clear error) when loading.
    """
    folder = Path(path)
    return folder.is_dir() and (folder / PROJECTOR_CONFIG).is_file()


def _parse_projector_config(data: Mapping[str, Any], *, source: str) -> ProjectorConfig:
    """Validate the fields of a projector config; every problem is named in one line."""
    ints = ("llm_dim", "hidden_dim", "num_query_tokens")
    known = {*ints, "dropout", "use_layernorm", "projector_type", "num_heads"}
    problems: list[str] = []
    absent = [k for k in (*ints, "projector_type") if k not in data]
    if absent:
        problems.append(f"missing field(s) {', '.join(absent)}")
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        problems.append(f"unknown field(s) {', '.join(unknown)}")

    def positive_int(name: str, default: int) -> int:
        value = data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r}")
            return default
        return value

    llm_dim = positive_int("llm_dim", 1)
    hidden_dim = positive_int("hidden_dim", 1)
    queries = positive_int("num_query_tokens", 1)
    heads = positive_int("num_heads", _DEFAULT_HEADS)
    dropout = data.get("dropout", 0.1)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        problems.append(f"dropout must be a number in [0, 1), got {dropout!r}")
        dropout = 0.1
    layernorm = data.get("use_layernorm", True)
    if not isinstance(layernorm, bool):
        problems.append(f"use_layernorm must be true or false, got {layernorm!r}")
        layernorm = True
    kind = data.get("projector_type", "mlp")
    if kind not in ("mlp", "linear"):
        problems.append(f"projector_type must be 'mlp' or 'linear', got {kind!r}")
        kind = "mlp"
    if problems:
        raise CheckpointMismatchError(
            f"{source}: not a released projector config ({'; '.join(problems)})"
        )
    return ProjectorConfig(llm_dim=llm_dim, hidden_dim=hidden_dim, dropout=float(dropout),
                           use_layernorm=layernorm, num_query_tokens=queries,
                           projector_type=kind, num_heads=heads)


def _projector_file(folder: Path) -> Path:
    for name in PROJECTOR_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ModelFileNotFoundError(
        f"{folder}: no {' or '.join(PROJECTOR_FILES)}; the released folder ships the "
        "vision-language weights next to projector_config.json"
    )


def _unpickling_reason(err: BaseException) -> str:
    """The informative line of torch's long weights-only message (which global it refused)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "WeightsUnpickler error" in line:
            return line.split("WeightsUnpickler error:")[-1].strip()
    return lines[0] if lines else type(err).__name__


def _load_projector_state(path: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """The vision-language state dict and the ``projector_cfg`` stored beside it, if any.

    Raises:
        CheckpointMismatchError: the file needs more than plain tensors to unpickle, holds no
            state dict, or a value that is not a tensor.
    """
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
        raise ModelFileNotFoundError(f"{path}: cannot be read ({err.strerror})") from err
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError,
            TypeError, zipfile.BadZipFile) as err:
        raise CheckpointMismatchError(
            f"{path}: refused, torch.load(weights_only=True) cannot read it "
            f"({_unpickling_reason(err)}); only plain tensors are loaded, never arbitrary "
            "pickled objects: re-save the state dict alone with torch.save"
        ) from err
    if not isinstance(blob, dict):
        raise CheckpointMismatchError(
            f"{path}: expected a dict of tensors, got {type(blob).__name__}"
        )
    embedded = blob.get("projector_cfg")
    bare = {k: v for k, v in blob.items() if k != "projector_cfg"}
    state: Any = next((blob[k] for k in _WRAPPERS if k in blob), bare)
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"{path}: the state dict is a {type(state).__name__}, not a dict")
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, Tensor))
    if not_tensors or not state:
        wrapper = next((k for k in _WRAPPERS if k in blob), None)
        raise CheckpointMismatchError(
            f"{path}: no state dict of tensors found (looked under "
            f"{wrapper or ', '.join(_WRAPPERS) + ' and at the top level'}; top-level keys: "
            f"{_list(sorted(map(str, blob))) or 'none'}; not tensors: {_list(not_tensors) or 'none'})"
        )
    return {str(k): v for k, v in state.items()}, embedded if isinstance(embedded, dict) else None


def _llm_files(folder: Path) -> dict[str, Path]:
    """LLM key -> safetensors file holding it, from ``model.safetensors`` or an index + shards.

    Raises:
        ModelFileNotFoundError: no safetensors weights, or a shard named by the index is missing.
        CheckpointMismatchError: the index and the shards disagree about which keys exist.
    """
    from safetensors import safe_open

    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        with safe_open(str(single), framework="pt") as handle:
            return {key: single for key in handle.keys()}
    if not index.is_file():
        raise ModelFileNotFoundError(
            f"{folder}: no model.safetensors or model.safetensors.index.json; the released LLM "
            "ships safetensors weights (other formats are not read)"
        )
    weight_map = read_json_object(index, missing="the index names the shards").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointMismatchError(f"{index}: no weight_map")
    files: dict[str, Path] = {}
    for shard in sorted(set(map(str, weight_map.values()))):
        path = folder / shard
        if Path(shard).name != shard or not path.is_file():
            raise ModelFileNotFoundError(f"{path}: shard named by {index.name} not found")
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                files[key] = path
    listed = {str(k) for k in weight_map}
    wrong = sorted(k for k in listed if files.get(k) != folder / str(weight_map[k]))
    extra = sorted(set(files) - listed)
    if wrong or extra:
        parts = ([f"not in the shard it names: {_list(wrong)}"] if wrong else []) + (
            [f"in a shard but not in the index: {_list(extra)}"] if extra else [])
        raise CheckpointMismatchError(f"{index}: index and shards disagree ({'; '.join(parts)})")
    return files


def _llm_shapes(files: Mapping[str, Path]) -> dict[str, Shape]:
    from safetensors import safe_open

    shapes: dict[str, Shape] = {}
    for path in sorted(set(files.values())):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(int(n) for n in handle.get_slice(key).get_shape())
    return shapes


def _load_llm_state(files: Mapping[str, Path]) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for path in sorted(set(files.values())):
        state.update(load_file(str(path)))
    return state


@dataclass(frozen=True, slots=True)
class _Released:
    """A released folder read and validated: projector tensors loaded, LLM tensors not yet."""

    folder: Path
    projector_file: Path
    projector_config: ProjectorConfig
    text_config: dict[str, Any]
    projector_state: dict[str, Tensor]
    llm_files: dict[str, Path]
    layout: ReleasedLayout


def _read_folder(folder: Path) -> _Released:
    """Read and validate everything but the LLM's tensors.

    Raises:
        ModelFileNotFoundError: the folder or one of its files is missing.
        CheckpointMismatchError: a file is malformed, or the ``linear`` projector type.
    """
    if not folder.is_dir():
        raise ModelFileNotFoundError(f"{folder}: folder not found; download the released weights there first")
    config_path = folder / PROJECTOR_CONFIG
    projector_config = _parse_projector_config(
        read_json_object(config_path, missing="a released MLLM-HWSI folder holds projector_config.json"),
        source=str(config_path),
    )
    text_config = read_json_object(folder / "config.json", missing="the released folder holds the LLM's config.json")
    if not isinstance(text_config.get("model_type"), str) or not isinstance(text_config.get("hidden_size"), int):
        raise CheckpointMismatchError(
            f"{folder / 'config.json'}: not a causal-LM config (needs model_type and hidden_size)"
        )
    projector_file = _projector_file(folder)
    state, embedded = _load_projector_state(projector_file)
    if embedded is not None:
        # Only the fields both files state are compared: the repeat may be partial or carry
        # training-only extras, but it must not contradict projector_config.json.
        differ = [f"{f.name} {embedded[f.name]!r} vs {getattr(projector_config, f.name)!r}"
                  for f in fields(ProjectorConfig)
                  if f.name in embedded and embedded[f.name] != getattr(projector_config, f.name)]
        if differ:
            raise CheckpointMismatchError(
                f"{projector_file}: its projector_cfg differs from {config_path.name} "
                f"({', '.join(differ)}); use the files of one release"
            )
    if projector_config.projector_type == "linear":
        # The linear layout is not documented; no key set is known to be it, so refuse.
        raise CheckpointMismatchError(
            f"{config_path}: projector_type 'linear' has an undocumented key layout that this "
            f"importer does not know (found {_list(sorted(state))} in {projector_file.name}); "
            "only projector_type 'mlp' can be imported"
        )
    llm_files = _llm_files(folder)
    layout = ReleasedLayout(projector={k: tuple(v.shape) for k, v in state.items()},
                            llm=_llm_shapes(llm_files))
    return _Released(folder=folder, projector_file=projector_file,
                     projector_config=projector_config, text_config=text_config,
                     projector_state=state, llm_files=llm_files, layout=layout)


def read_released_layout(folder: str | os.PathLike[str]) -> ReleasedLayout:
    """Key -> shape of a released folder's weights, read without loading the LLM's tensors.

    Raises:
        ModelFileNotFoundError: the folder or one of its files is missing.
        CheckpointMismatchError: a file is malformed or refused.
    """
    return _read_folder(Path(folder)).layout


# -- sizes, config and the expected layout -----------------------------------------------------


def _input_dims(projector: Mapping[str, Shape]) -> dict[str, int]:
    """Each scale's input width d_s, read from its first Linear (or its LayerNorm).

    A scale whose keys are both absent gets the released width, only so the comparison can
    still be made and report those keys as missing.
    """
    dims: dict[str, int] = {}
    for scale in _SCALES:
        prefix = f"{scale}_proj.proj.projector."
        linear = projector.get(prefix + "1.weight")
        norm = projector.get(prefix + "0.weight")
        if linear is not None and len(linear) == 2:
            dims[scale] = linear[1]
        elif norm is not None and len(norm) == 1:
            dims[scale] = norm[0]
        else:
            dims[scale] = _RELEASED_INPUT_DIMS[scale]
    return dims


def _config(projector: ProjectorConfig, text_config: Mapping[str, Any], dims: Mapping[str, int],
            *, source: str) -> HwsiConfig:
    """Our config for the released model: sizes from the files, switches as released."""
    width = text_config.get("hidden_size")
    if width != projector.llm_dim:
        raise CheckpointMismatchError(
            f"{source}: projector_config.json llm_dim {projector.llm_dim} does not match the "
            f"LLM's hidden_size {width} in config.json; the two files are from different models"
        )
    other = [f"{scale} {dims[scale]} (released {width_})"
             for scale, width_ in _RELEASED_INPUT_DIMS.items() if dims[scale] != width_]
    if other:
        logger.info("%s: input widths differ from the released model's: %s", source, ", ".join(other))
    expected = json.loads(json.dumps(RELEASED_EXPECTED_FEATURES))
    expected["patch"]["dim"] = dims["patch"]
    expected["region"]["dim"] = dims["region"]
    expected["nucleus"]["dim"] = dims["cell"]
    try:
        return HwsiConfig(
            text_config=dict(text_config),
            wsi_dim=dims["wsi"], region_dim=dims["region"], patch_dim=dims["patch"],
            cell_dim=dims["cell"], projector_hidden=projector.hidden_dim,
            projector_dropout=projector.dropout, projector_layernorm=projector.use_layernorm,
            fusion_mode="resampler", num_queries=projector.num_query_tokens,
            resampler_heads=projector.num_heads, fusion_dropout=projector.dropout,
            cell_fusion="precomputed", region_position_encoding="none", wsi_aggregator="mean",
            prompt_layout="released", align_dim=None, expected_features=expected,
        )
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointMismatchError(f"{source}: these sizes make no valid model ({err})") from err


def _meta_model(config: HwsiConfig, *, source: str) -> HwsiForConditionalGeneration:
    """The model with every tensor on the meta device: shapes without memory."""
    try:
        with torch.device("meta"):
            return HwsiForConditionalGeneration(config)
    except (ValueError, KeyError) as err:
        raise CheckpointMismatchError(
            f"{source}: cannot build the LLM from config.json ({err}); the installed transformers "
            "must know its model_type"
        ) from err


def _to_ours(source: Source, key: str) -> str | None:
    for file, released, ours in CONVERSION_TABLE:
        if file == source and key.startswith(released):
            return ours + key[len(released):]
    return None


def _to_released(key: str) -> str:
    for _, released, ours in CONVERSION_TABLE:
        if key.startswith(ours):
            return released + key[len(ours):]
    return key


def _list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_PER_KIND])
    return shown + (f" and {len(keys) - _SHOWN_PER_KIND} more" if len(keys) > _SHOWN_PER_KIND else "")


def _shape(shape: Shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _match(layout: ReleasedLayout, model: HwsiForConditionalGeneration, *, source: str) -> None:
    """Check the converted released table against the model's, key by key and shape by shape.

    A key the LLM ties to another (a tied LM head) may be absent from the files.

    Raises:
        CheckpointMismatchError: one line listing every missing, unexpected and reshaped key,
            spelled as in the released files, with file shape and expected shape.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = set(model.all_tied_weights_keys)
    found: set[str] = set()
    unexpected: list[str] = []
    reshaped: list[str] = []
    tables: tuple[tuple[Source, dict[str, Shape]], ...] = (
        ("projector", layout.projector), ("llm", layout.llm))
    for file, table in tables:
        for key, shape in sorted(table.items()):
            ours = _to_ours(file, key)
            if ours is None or ours not in expected:
                unexpected.append(key)
                continue
            found.add(ours)
            if tuple(shape) != expected[ours]:
                reshaped.append(f"{key} {_shape(tuple(shape))} vs expected {_shape(expected[ours])}")
    missing = sorted(_to_released(k) for k in expected if k not in found and k not in tied)
    problems = [f"{label}: {_list(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped)) if keys]
    if problems:
        raise CheckpointMismatchError(
            f"{source}: the weights do not match the released MLLM-HWSI layout "
            f"({'; '.join(problems)}); use the unmodified release"
        )


def _released_projector_layout(config: HwsiConfig) -> dict[str, Shape]:
    """The ``vl_projector.pt`` keys and shapes the release documents, for ``config``'s sizes."""
    d, hidden, q = config.hidden_size, config.projector_hidden, config.num_queries
    dims = {"wsi": config.wsi_dim, "region": config.region_dim, "patch": config.patch_dim,
            "cell": config.cell_dim}
    table: dict[str, Shape] = {}
    for scale in _SCALES:
        p = f"{scale}_proj.proj.projector."
        if config.projector_layernorm:
            table |= {p + "0.weight": (dims[scale],), p + "0.bias": (dims[scale],)}
        table |= {p + "1.weight": (hidden, dims[scale]), p + "1.bias": (hidden,),
                  p + "4.weight": (d, hidden), p + "4.bias": (d,)}
    table |= {
        "fusion.fuse.0.weight": (4 * d,), "fusion.fuse.0.bias": (4 * d,),
        "fusion.fuse.1.weight": (2 * d, 4 * d), "fusion.fuse.1.bias": (2 * d,),
        "fusion.fuse.4.weight": (d, 2 * d), "fusion.fuse.4.bias": (d,),
        "fusion.out_norm.weight": (d,), "fusion.out_norm.bias": (d,),
        "compressor.queries": (1, q, d),
        "compressor.attn.in_proj_weight": (3 * d, d), "compressor.attn.in_proj_bias": (3 * d,),
        "compressor.attn.out_proj.weight": (d, d), "compressor.attn.out_proj.bias": (d,),
        "compressor.norm1.weight": (d,), "compressor.norm1.bias": (d,),
        "compressor.norm2.weight": (d,), "compressor.norm2.bias": (d,),
        "compressor.mlp.0.weight": (4 * d, d), "compressor.mlp.0.bias": (4 * d,),
        "compressor.mlp.3.weight": (d, 4 * d), "compressor.mlp.3.bias": (d,),
    }
    return table


def released_layout(
    projector_config: Mapping[str, Any], text_config: Mapping[str, Any],
    *, input_dims: Mapping[str, int] | None = None,
) -> ReleasedLayout:
    """The key/shape table a released folder with these configs holds, built on the meta device.

    The projector part is the documented layout; the LLM part is what a Hugging Face folder of
    that LLM holds (its state dict without tied copies), built from ``text_config`` on the meta
    device. Nothing is allocated.

    Args:
        projector_config: the content of ``projector_config.json``.
        text_config: the content of the LLM's ``config.json``.
        input_dims: input width per scale (``wsi``, ``region``, ``patch``, ``cell``); default
            the released model's 192, 192, 512, 384.

    Raises:
        CheckpointMismatchError: the configs are invalid or disagree.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = _config(_parse_projector_config(projector_config, source=PROJECTOR_CONFIG),
                     text_config, dict(input_dims or _RELEASED_INPUT_DIMS), source=PROJECTOR_CONFIG)
    text = dict(text_config)
    try:
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(text.pop("model_type"), **text))
    except (ValueError, KeyError) as err:
        raise CheckpointMismatchError(f"config.json: not a known causal-LM config ({err})") from err
    tied = set(llm.all_tied_weights_keys)
    llm_table = {k: tuple(v.shape) for k, v in llm.state_dict().items() if k not in tied}
    return ReleasedLayout(projector=_released_projector_layout(config), llm=llm_table)


def check_layout(
    projector_config: Mapping[str, Any], text_config: Mapping[str, Any],
    layout: ReleasedLayout | None = None, *, input_dims: Mapping[str, int] | None = None,
) -> int:
    """Check that a released layout converts exactly onto our model, at full size, for free.

    Our model is built on the meta device from the configs (as :func:`load_official` would
    build it) and ``layout`` (default :func:`released_layout` of the same configs) is renamed
    with :data:`CONVERSION_TABLE` and compared key by key and shape by shape. No tensor memory
    is allocated, so the 8 B parameter release can be checked anywhere.

    Args:
        projector_config: the content of ``projector_config.json``.
        text_config: the content of the LLM's ``config.json``.
        layout: the released key/shape table to check (e.g. from :func:`read_released_layout`).
        input_dims: input width per scale; default read from ``layout``'s projector keys, else
            the released widths.

    Returns:
        The number of parameters of the converted model.

    Raises:
        CheckpointMismatchError: the configs are invalid, or the layout does not convert
            exactly (every problem named in one line).
    """
    parsed = _parse_projector_config(projector_config, source=PROJECTOR_CONFIG)
    if layout is None:
        layout = released_layout(projector_config, text_config, input_dims=input_dims)
    dims = dict(input_dims) if input_dims is not None else _input_dims(layout.projector)
    config = _config(parsed, text_config, dims, source=PROJECTOR_CONFIG)
    model = _meta_model(config, source=PROJECTOR_CONFIG)
    _match(layout, model, source="released layout")
    return sum(p.numel() for p in model.parameters())


# -- loading ------------------------------------------------------------------------------------


def _check_tied(model: HwsiForConditionalGeneration, state: Mapping[str, Tensor], *, source: str) -> None:
    """A tied key present in the files must equal its source, or it would be silently dropped."""
    for target, origin in model.all_tied_weights_keys.items():
        if target in state and origin in state and not torch.equal(state[target], state[origin]):
            raise CheckpointMismatchError(
                f"{source}: {_to_released(target)} differs from {_to_released(origin)} although "
                "config.json ties them (tie_word_embeddings); the folder is inconsistent"
            )


@contextmanager
def _hf_init_guard() -> Iterator[None]:
    from transformers.initialization import guard_torch_init_functions

    with guard_torch_init_functions():
        yield


def _materialise_buffers(model: HwsiForConditionalGeneration, *, source: str) -> None:
    """Recompute the non-persistent buffers (e.g. rotary frequencies) the meta build left empty.

    They are not in any file; like Hugging Face's own loader, the owning model's
    ``_init_weights`` recomputes them. Every loaded tensor is flagged as initialised first, so
    the guarded init functions cannot touch a loaded weight.
    """
    from transformers import PreTrainedModel

    for tensor in (*model.parameters(), *model.buffers()):
        if not tensor.is_meta:
            tensor._is_hf_initialized = True  # type: ignore[attr-defined]
    owners: dict[str, Any] = {}
    for name, buffer in list(model.named_buffers()):
        if not buffer.is_meta:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        persistent = attr not in parent._non_persistent_buffers_set
        parent.register_buffer(attr, torch.empty_like(buffer, device="cpu"), persistent=persistent)
        owners[parent_name] = parent
    with _hf_init_guard():
        for parent_name, parent in owners.items():
            owner: Any = model
            parts = parent_name.split(".") if parent_name else []
            for depth in range(len(parts), -1, -1):
                candidate = model.get_submodule(".".join(parts[:depth]))
                if isinstance(candidate, PreTrainedModel):
                    owner = candidate
                    break
            owner._init_weights(parent)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointMismatchError(
            f"{source}: {_list(left)} could not be rebuilt after loading; this LLM architecture "
            "is not supported by the importer"
        )


def load_official(
    folder: str | os.PathLike[str], *, dtype: torch.dtype | None = None,
    model_class: type[Any] | None = None,
) -> HwsiForConditionalGeneration:
    """Load a released MLLM-HWSI folder as :class:`HwsiForConditionalGeneration`, in eval mode.

    The model is built on the meta device, its key/shape table checked against the files in
    full, then every tensor is loaded from the files (nothing keeps a random initial value and
    no file tensor is left out), so the full-size release needs memory for its weights once.

    Args:
        folder: the released folder (LLM files, ``projector_config.json``, ``vl_projector.pt``
            or ``best_vl_projector.pt``).
        dtype: cast every floating tensor to this dtype; None keeps each file's dtype (the LLM
            and the vision-language module may then differ; the model handles that).
        model_class: the class ``from_pretrained`` was called on; only
            :class:`HwsiForConditionalGeneration` (or None) is accepted.

    Raises:
        ModelFileNotFoundError: the folder or one of its files is missing.
        CheckpointMismatchError: a file is malformed, unpicklable without arbitrary code, of the
            ``linear`` projector type, or its keys/shapes do not match (all named in one line).
    """
    path = Path(folder)
    if model_class is not None and model_class is not HwsiForConditionalGeneration:
        raise CheckpointMismatchError(
            f"{path}: a released MLLM-HWSI folder loads only as HwsiForConditionalGeneration, "
            f"not {model_class.__name__}; call HwsiForConditionalGeneration.from_pretrained"
        )
    released = _read_folder(path)
    source = str(path)
    config = _config(released.projector_config, released.text_config,
                     _input_dims(released.layout.projector), source=source)
    model = _meta_model(config, source=source)
    _match(released.layout, model, source=source)
    logger.info("%s: layout matches (%d projector and %d LLM tensors); loading", path,
                len(released.projector_state), len(released.llm_files))

    weights: dict[str, Tensor] = {}
    files: tuple[tuple[Source, dict[str, Tensor]], ...] = (
        ("projector", released.projector_state), ("llm", _load_llm_state(released.llm_files)))
    for file, tensors in files:
        for key, tensor in tensors.items():
            ours = _to_ours(file, key)
            if ours is not None:  # always, after _match
                weights[ours] = tensor
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    _check_tied(model, weights, source=source)
    result = model.load_state_dict(weights, strict=False, assign=True)
    tied = set(model.all_tied_weights_keys)
    if result.unexpected_keys or set(result.missing_keys) - tied:  # _match makes this impossible
        raise RuntimeError(f"load after a passed layout check left {result}")
    if tied:
        model.tie_weights()
    _materialise_buffers(model, source=source)
    model.eval()
    logger.info("%s: loaded %d parameters", path, sum(p.numel() for p in model.parameters()))
    return model


# -- writing our format ---------------------------------------------------------------------------


def import_official(
    folder: str | os.PathLike[str], out: str | os.PathLike[str], *, dtype: torch.dtype | None = None,
) -> Path:
    """Convert a released folder into this project's model folder at ``out``.

    ``out`` then holds the model (``config.json`` + safetensors, loadable with
    ``HwsiForConditionalGeneration.from_pretrained``) and the processor (the folder's tokenizer
    with its chat template + ``processor_config.json`` with ``prompt_layout: released``,
    loadable with ``HwsiProcessor.from_pretrained``). Everything is validated before anything
    is written; the files are written into a temporary sibling folder that is renamed to
    ``out`` at the end, so an interrupted import leaves no half-written model.

    Args:
        folder: the released folder.
        out: the folder to create (it may exist if empty).
        dtype: see :func:`load_official`.

    Returns:
        ``out``.

    Raises:
        InputError: ``out`` exists and is not an empty folder.
        ModelFileNotFoundError: the folder, one of its files or its tokenizer is missing.
        CheckpointMismatchError: see :func:`load_official`; also a tokenizer with no chat template.
    """
    from transformers import AutoTokenizer

    from omero_hwsi.model.processing_hwsi import HwsiProcessor

    source, target = Path(folder), Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(f"{target}: already exists and is not an empty folder; choose a new --out")
    model = load_official(source, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelFileNotFoundError(f"{source}: tokenizer files missing or unreadable ({err})") from err
    try:
        processor = HwsiProcessor.for_config(tokenizer, model.config)
    except ValueError as err:
        raise CheckpointMismatchError(f"{source}: tokenizer unusable for the released prompt ({err})") from err
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".importing", dir=target.parent))
    try:
        model.save_pretrained(str(staging))
        processor.save_pretrained(staging)
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("%s: imported into %s", source, target)
    return target


def describe_imported(folder: str | os.PathLike[str]) -> str:
    """One line about an imported model folder: LLM family and width, queries, parameters.

    Reads ``config.json`` and the safetensors headers only (no tensor is loaded).

    Raises:
        ModelFileNotFoundError: the folder holds no saved model.
    """
    from safetensors import safe_open

    path = Path(folder)
    config = read_json_object(path / "config.json", missing="the folder holds no saved model")
    text = config.get("text_config") or {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFileNotFoundError(f"{path}: no safetensors weights; the folder holds no saved model")
    count = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            count += sum(prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    return (f"{path}: {text.get('model_type', '?')} LLM of width {text.get('hidden_size', '?')}, "
            f"{config.get('num_queries', '?')} visual queries, {count:,} parameters, "
            f"prompt layout {config.get('prompt_layout', '?')}")
