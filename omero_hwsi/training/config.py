"""``TrainConfig``: every setting of one training run, read from a TOML file.

A run is reproducible from its config alone (plus the data and the starting folder): the
config is copied into every checkpoint and into the final folder's ``training_summary.json``.
Unknown keys and bad values are refused in one line naming the key, before anything is
written, so a typo (``learning_rate`` for ``lr``) cannot silently train with a default.
Relative paths are taken relative to the TOML file's folder, like the settings file.

Every key is documented in ``docs/training.md`` (a test keeps the two in step). This module
is pure Python: the config can be checked without torch.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from omero_hwsi.errors import ConfigError

__all__ = [
    "CONTRASTIVE_STAGES",
    "Precision",
    "Schedule",
    "TrainConfig",
    "load_train_config",
]

Schedule = Literal["cosine", "linear", "constant"]
Precision = Literal["auto", "fp32", "bf16"]
ConsistencyForm = Literal["l2", "cosine"]

CONTRASTIVE_STAGES = (1, 2, 3)
"""Stages that compute the hierarchical contrastive and consistency losses."""

# Stage defaults of the loss weights (the reference's presets; see ``LossWeights``). Kept as
# plain numbers here so this module needs no torch.
_STAGE_WEIGHTS: dict[int, tuple[float, float, float]] = {
    0: (1.0, 0.0, 0.0),
    1: (0.0, 2.0, 0.25),
    2: (0.7, 2.0, 0.25),
    3: (0.7, 0.2, 0.07),
}

_DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """One training run (see ``docs/training.md`` for each key's meaning and default)."""

    stage: int = field(default=-1, metadata=_doc(
        "Training stage: 0 LM pre-training, 1 alignment, 2 projection, 3 instruction tuning."))
    output_dir: Path = field(default=Path("train-output"), metadata=_doc(
        "Folder for `metrics.jsonl`, `checkpoint-<step>/` and `final/`."))
    # where the model comes from
    model: Path | None = field(default=None, metadata=_doc(
        "Model folder to start from (the previous stage's `final/`), loaded strictly."))
    model_config: Path | None = field(default=None, metadata=_doc(
        "JSON `HwsiConfig` for a model built from scratch (stages 0 and 1 only)."))
    tokenizer: Path | None = field(default=None, metadata=_doc(
        "Tokenizer folder (needed with `model_config`; default: the `model` folder's)."))
    # data
    train: Path | None = field(default=None, metadata=_doc(
        "Dataset: WSI-Bench train JSON or test JSONL (stages 1-3)."))
    feature_dir: Path | None = field(default=None, metadata=_doc(
        "Folder of complete feature stores, one per slide (stages 1-3)."))
    scale_texts: Path | None = field(default=None, metadata=_doc(
        "Optional JSONL of per-scale texts per slide for the contrastive loss."))
    corpus: Path | None = field(default=None, metadata=_doc(
        "Stage 0 text corpus: one document per line, or blank-line separated documents."))
    max_length: int = field(default=512, metadata=_doc(
        "Stage 0: tokens per training chunk."))
    val_fraction: float = field(default=0.05, metadata=_doc(
        "Share of slides (stage 0: documents) held out for validation, in [0, 1)."))
    max_cells: int | None = field(default=None, metadata=_doc(
        "Most nuclei per patch given to CCAF; unset = the model's `max_cells` (set: it becomes "
        "the model's, so inference reads as many)."))
    feature_cache_slides: int = field(default=0, metadata=_doc(
        "Slides whose features stay in memory (least recently used dropped); 0 = all."))
    # optimisation
    batch_size: int = field(default=8, metadata=_doc(
        "Slides (stage 0: chunks) per micro-batch; >= 2 when a contrastive term is on."))
    grad_accum: int = field(default=1, metadata=_doc(
        "Micro-batches per optimiser step."))
    lr: float = field(default=1e-4, metadata=_doc("Peak learning rate (AdamW)."))
    weight_decay: float = field(default=0.01, metadata=_doc(
        "AdamW weight decay (not applied to biases, norms and 1-d parameters)."))
    warmup_steps: int = field(default=100, metadata=_doc(
        "Optimiser steps of linear warm-up (step k uses (k+1)/`warmup_steps` of `lr`)."))
    schedule: str = field(default="cosine", metadata=_doc(
        "Learning-rate decay after warm-up: cosine, linear or constant."))
    max_grad_norm: float = field(default=1.0, metadata=_doc(
        "Gradient clipping norm; 0 turns clipping off (the norm is still logged)."))
    max_steps: int = field(default=0, metadata=_doc(
        "Optimiser steps to run; 0 = `epochs` full passes."))
    epochs: int = field(default=1, metadata=_doc("Passes over the training set when `max_steps` is 0."))
    seed: int = field(default=0, metadata=_doc(
        "Seed of torch, numpy, random, model initialisation, the split and the data order."))
    precision: str = field(default="auto", metadata=_doc(
        "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16."))
    device: str = field(default="auto", metadata=_doc(
        "auto (CUDA when available), cpu, cuda or cuda:N."))
    # output cadence
    save_every: int = field(default=500, metadata=_doc(
        "Write `checkpoint-<step>/` every this many steps; 0 = only the final folder."))
    keep_checkpoints: int = field(default=2, metadata=_doc(
        "Most recent checkpoints kept; 0 = keep all."))
    eval_every: int = field(default=500, metadata=_doc(
        "Validation loss every this many steps (and at the end); 0 = only at the end."))
    # LoRA (stage 3)
    lora: bool = field(default=True, metadata=_doc(
        "Stage 3: train LoRA adapters on the LLM (false: train the whole LLM)."))
    lora_r: int = field(default=128, metadata=_doc("LoRA rank."))
    lora_alpha: int = field(default=256, metadata=_doc("LoRA scaling alpha."))
    lora_dropout: float = field(default=0.05, metadata=_doc("Dropout on the LoRA input."))
    lora_targets: tuple[str, ...] = field(default=_DEFAULT_LORA_TARGETS, metadata=_doc(
        "LLM module names that get adapters (`[\"all-linear\"]` = every linear but the head)."))
    merge_lora: bool = field(default=True, metadata=_doc(
        "Merge the adapters into the LLM in `final/` (false: save them in `final/lora_adapter/`)."))
    # losses
    lm_weight: float | None = field(default=None, metadata=_doc(
        "Weight of L_LM (default per stage: 1 / - / 0.7 / 0.7)."))
    contrastive_weight: float | None = field(default=None, metadata=_doc(
        "Weight of L_ctr (default per stage: - / 2.0 / 2.0 / 0.2; 0 turns it off)."))
    consistency_weight: float | None = field(default=None, metadata=_doc(
        "Weight of L_cons (default per stage: - / 0.25 / 0.25 / 0.07; 0 turns it off)."))
    temperature: float = field(default=0.07, metadata=_doc(
        "Contrastive temperature tau (the starting value when learned)."))
    learn_temperature: bool = field(default=False, metadata=_doc(
        "Learn tau (stages 1-2), CLIP-style, clamped to [0.01, 1]."))
    consistency_form: str = field(default="l2", metadata=_doc(
        "Consistency loss form: l2 (the paper) or cosine (the reference code)."))
    # text tower
    text_dim: int = field(default=256, metadata=_doc("Width of a new text tower."))
    text_layers: int = field(default=2, metadata=_doc("Transformer blocks of a new text tower."))
    text_heads: int = field(default=4, metadata=_doc("Attention heads of a new text tower."))
    text_max_length: int = field(default=256, metadata=_doc(
        "Tokens read per text by the text tower (longer texts are cut)."))

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("stage", self.stage in (0, 1, 2, 3), "must be 0, 1, 2 or 3"),
            ("max_length", self.max_length >= 2, "must be >= 2"),
            ("val_fraction", 0.0 <= self.val_fraction < 1.0, "must be in [0, 1)"),
            ("max_cells", self.max_cells is None or self.max_cells >= 1, "must be >= 1"),
            ("feature_cache_slides", self.feature_cache_slides >= 0, "must be >= 0"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "must be > 0"),
            ("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, "must be >= 0"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("schedule", self.schedule in get_args(Schedule), f"must be one of {', '.join(get_args(Schedule))}"),
            ("max_grad_norm", math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0, "must be >= 0"),
            ("max_steps", self.max_steps >= 0, "must be >= 0"),
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("precision", self.precision in get_args(Precision), f"must be one of {', '.join(get_args(Precision))}"),
            ("device", self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             "must be auto, cpu, cuda or cuda:N"),
            ("save_every", self.save_every >= 0, "must be >= 0"),
            ("keep_checkpoints", self.keep_checkpoints >= 0, "must be >= 0"),
            ("eval_every", self.eval_every >= 0, "must be >= 0"),
            ("lora_r", self.lora_r >= 1, "must be >= 1"),
            ("lora_alpha", self.lora_alpha >= 1, "must be >= 1"),
            ("lora_dropout", 0.0 <= self.lora_dropout < 1.0, "must be in [0, 1)"),
            ("lora_targets", len(self.lora_targets) >= 1 and all(self.lora_targets), "must name modules"),
            ("temperature", math.isfinite(self.temperature) and 0.01 <= self.temperature <= 1.0,
             "must be in [0.01, 1]"),
            ("consistency_form", self.consistency_form in get_args(ConsistencyForm),
             f"must be one of {', '.join(get_args(ConsistencyForm))}"),
            ("text_dim", self.text_dim >= 1 and self.text_dim % max(self.text_heads, 1) == 0,
             "must be >= 1 and divisible by text_heads"),
            ("text_layers", self.text_layers >= 1, "must be >= 1"),
            ("text_heads", self.text_heads >= 1, "must be >= 1"),
            ("text_max_length", self.text_max_length >= 1, "must be >= 1"),
        ]
        for name in ("lm_weight", "contrastive_weight", "consistency_weight"):
            value = getattr(self, name)
            checks.append((name, value is None or (math.isfinite(value) and value >= 0), "must be >= 0"))
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{name}: {rule}, got {getattr(self, name)!r}")
        self._check_stage_inputs()

    def _check_stage_inputs(self) -> None:
        """The keys each stage needs, and combinations that cannot train."""
        if self.model is not None and self.model_config is not None:
            raise ConfigError("model and model_config: give one (a folder to start from, or a "
                              "config for a new model), not both")
        if self.model is None and self.model_config is None:
            raise ConfigError("model: missing; give the previous stage's folder (or model_config "
                              "and tokenizer for a new model in stages 0-1)")
        if self.model_config is not None:
            if self.stage > 1:
                raise ConfigError(f"model_config: stage {self.stage} must start from the previous "
                                  "stage's folder (model), not from a new model")
            if self.tokenizer is None:
                raise ConfigError("tokenizer: missing; a new model (model_config) needs a tokenizer folder")
        if self.stage == 0:
            if self.corpus is None:
                raise ConfigError("corpus: missing; stage 0 pre-trains the LLM on a text corpus")
        else:
            for name in ("train", "feature_dir"):
                if getattr(self, name) is None:
                    raise ConfigError(f"{name}: missing; stage {self.stage} trains on slide features")
        if self.uses_contrastive and self.batch_size < 2:
            raise ConfigError(
                "batch_size: 1 leaves the contrastive loss without in-batch negatives; use "
                "batch_size >= 2 (or contrastive_weight = 0)"
            )
        if self.stage == 1 and not (self.uses_contrastive or self.loss_weights[2] > 0):
            raise ConfigError("contrastive_weight and consistency_weight: both 0 leave stage 1 nothing to train")

    @property
    def loss_weights(self) -> tuple[float, float, float]:
        """``(lm, contrastive, consistency)``: the given weights, else the stage's defaults.

        Terms a stage does not compute are 0: stage 0 has only L_LM, stage 1 has no L_LM.
        """
        lm, ctr, cons = _STAGE_WEIGHTS[self.stage]
        if self.lm_weight is not None:
            lm = self.lm_weight
        if self.contrastive_weight is not None:
            ctr = self.contrastive_weight
        if self.consistency_weight is not None:
            cons = self.consistency_weight
        if self.stage == 0:
            return (lm, 0.0, 0.0)
        if self.stage == 1:
            return (0.0, ctr, cons)
        return (lm, ctr, cons)

    @property
    def uses_contrastive(self) -> bool:
        """True when the stage computes L_ctr (it then needs >= 2 slides per micro-batch)."""
        return self.stage in CONTRASTIVE_STAGES and self.loss_weights[1] > 0

    @property
    def uses_lora(self) -> bool:
        """LoRA applies to stage 3 only; the key is ignored by other stages."""
        return self.stage == 3 and self.lora

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (paths as strings, tuples as lists), as written to checkpoints."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some keys changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    if get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in get_args(kind) if a is not type(None)]
        return args[0], True
    return kind, False


def _convert(name: str, raw: Any, kind: Any, base: Path | None) -> Any:
    """A TOML value as the field's type; ``ConfigError`` naming the key otherwise."""
    inner, optional = _unwrap_optional(kind)
    if raw is None and optional:
        return None
    bad = ConfigError(f"{name}: {raw!r} is not a valid {getattr(inner, '__name__', str(inner))}")
    if inner is Path:
        if not isinstance(raw, str | Path) or not str(raw).strip():
            raise bad
        path = Path(str(raw)).expanduser()
        return base / path if base is not None and not path.is_absolute() else path
    if inner is bool:
        if not isinstance(raw, bool):
            raise bad
        return raw
    if inner is int:
        if isinstance(raw, bool) or not isinstance(raw, int | float) or (
                isinstance(raw, float) and not raw.is_integer()):
            raise bad
        return int(raw)
    if inner is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise bad
        return float(raw)
    if inner is str:
        if not isinstance(raw, str):
            raise bad
        return raw
    if get_origin(inner) is tuple:
        if not isinstance(raw, list | tuple) or not all(isinstance(v, str) for v in raw):
            raise ConfigError(f"{name}: {raw!r} is not a list of strings")
        return tuple(raw)
    raise TypeError(f"no converter for {name}: {kind}")  # pragma: no cover - a new field type


def load_train_config(
    path: str | Path | None = None, *, stage: int | None = None, **overrides: Any
) -> TrainConfig:
    """Read a training config from TOML, with overrides (e.g. CLI options) on top.

    Args:
        path: the TOML file (None: only ``overrides``, for library use and tests).
        stage: the stage asked for on the command line; must equal the file's ``stage`` when
            both are given.
        overrides: key -> value, applied after the file (``None`` values are ignored);
            relative paths here are taken as given (relative to the working folder).

    Raises:
        ConfigError: the file is unreadable or not TOML, holds an unknown key, a value of the
            wrong type or out of range, the stages disagree, or a stage lacks a key it needs.
            One line, naming the key.
    """
    kinds = _field_types()
    values: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        try:
            with file.open("rb") as handle:
                table = tomllib.load(handle)
        except FileNotFoundError as err:
            raise ConfigError(f"{file}: training config not found") from err
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"{file}: cannot read training config: {err}") from err
        unknown = sorted(set(table) - set(kinds))
        if unknown:
            raise ConfigError(f"{file}: unknown key(s) {', '.join(unknown)}; see docs/training.md "
                              "for the valid names")
        for name, raw in table.items():
            try:
                values[name] = _convert(name, raw, kinds[name], file.parent)
            except ConfigError as err:
                raise ConfigError(f"{file}: {err}") from None
        if stage is not None and "stage" in values and values["stage"] != stage:
            raise ConfigError(f"{file}: stage = {values['stage']} does not match --stage {stage}")
    for name, raw in overrides.items():
        if name not in kinds:
            raise TypeError(f"unknown training config key {name!r}")
        if raw is not None:
            values[name] = _convert(name, raw, kinds[name], None)
    if stage is not None:
        values["stage"] = stage
    if "stage" not in values:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}stage: missing; set stage = 0..3 in the file or pass --stage")
    try:
        return TrainConfig(**values)
    except ConfigError as err:
        if path is not None:
            raise ConfigError(f"{path}: {err}") from None
        raise
