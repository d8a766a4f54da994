"""The training loop behind ``hwsi train``: one function, :func:`train`, for stages 0-3.

Each optimiser step takes ``grad_accum`` micro-batches of up to ``batch_size`` different
slides (stage 0: corpus chunks). The terms are weighted so that accumulation does not change
the objective: the LM loss is divided by the supervised tokens of the whole step (not averaged
per micro-batch, which would over-weight short answers), the other terms by each
micro-batch's share of the step's slides. The contrastive negatives are those of a
micro-batch: accumulation adds examples, not negatives.

Outputs in ``output_dir``: ``metrics.jsonl`` (one row per optimiser step, plus ``"eval":
true`` rows), ``checkpoint-<step>/`` (see :mod:`~omero_hwsi.training.checkpoint`) and, at
the end, ``final/``: the model (LoRA merged unless ``merge_lora = false``), the processor, the
text tower and ``training_summary.json``, loadable with ``HwsiForConditionalGeneration``'s and
``HwsiProcessor``'s ``from_pretrained`` and :func:`~omero_hwsi.model.text_tower.load_text_encoder`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from omero_hwsi import __version__
from omero_hwsi._io import write_bytes_atomic, write_json_atomic
from omero_hwsi._types import ProgressFn
from omero_hwsi.errors import ConfigError
from omero_hwsi.model.text_tower import save_text_encoder
from omero_hwsi.training.batching import (
    FeatureCache,
    check_slide_count,
    plan_batches,
    read_corpus,
)
from omero_hwsi.training.builder import Run, build_run, seed_everything
from omero_hwsi.training.checkpoint import (
    frozen_fingerprint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from omero_hwsi.training.config import TrainConfig
from omero_hwsi.training.inputs import (
    SlideData,
    SlideSet,
    TrainingSet,
    corpus_sets,
    read_slide_data,
    store_signature,
)
from omero_hwsi.training.objective import MicroBatch, Objective, Terms, to_device
from omero_hwsi.training.optim import build_optimizer, schedule_factor

__all__ = ["FINAL", "METRICS", "SUMMARY", "train"]

logger = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
FINAL = "final"
SUMMARY = "training_summary.json"
# Keys that may change between a run and its resumption (they do not change the arithmetic).
_RESUMABLE_CHANGES = frozenset({"output_dir", "save_every", "eval_every", "keep_checkpoints",
                                "device", "feature_cache_slides"})


# -- set-up ---------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for but CUDA is not available; use device = \"cpu\"")
    return torch.device(name)


def _uses_bf16(precision: str, device: torch.device) -> bool:
    """auto = bf16 autocast on CUDA (halves activation memory, same range as fp32), fp32 on CPU."""
    if precision == "auto":
        return device.type == "cuda"
    return precision == "bf16"


def _start_point(config: TrainConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None; refuses to overwrite a previous run.

    Raises:
        ConfigError: ``output_dir`` holds a finished run, or a previous run without
            ``--resume``, or the checkpoint was made with a different config.
    """
    out = config.output_dir
    if (out / FINAL).exists():
        raise ConfigError(f"output_dir: {out} already holds a finished run ({FINAL}/); choose "
                          "another output_dir")
    checkpoint = latest_checkpoint(out)
    if not resume:
        if checkpoint is not None or (out / METRICS).exists():
            raise ConfigError(f"output_dir: {out} holds a previous run; pass --resume to continue "
                              "it or choose another output_dir")
        return None
    if checkpoint is None:
        logger.warning("no checkpoint in %s: starting at step 0", out)
        if (out / METRICS).exists():
            (out / METRICS).unlink()
        return None
    saved = json.loads((checkpoint / "train_config.json").read_text(encoding="utf-8"))
    for key, value in config.to_dict().items():
        if key not in _RESUMABLE_CHANGES and saved.get(key) != value:
            raise ConfigError(f"{key}: was {saved.get(key)!r} in the run of {checkpoint}, now "
                              f"{value!r}; resume with the same config or start a new output_dir")
    return checkpoint


def _datasets(
    config: TrainConfig, run: Run, data: SlideData | list[str]
) -> tuple[TrainingSet, TrainingSet | None, dict[str, Any]]:
    """Training and validation sets, and their sizes for the summary.

    ``data`` is what was read before the model was built: the slide data, or the corpus's
    documents (stage 0).
    """
    if isinstance(data, list):
        corpus_train, corpus_val = corpus_sets(config, run.processor.tokenizer, data)
        return corpus_train, corpus_val, {"train_chunks": len(corpus_train),
                                          "validation_chunks": len(corpus_val) if corpus_val else 0}
    hconfig = run.model.config
    if hconfig.expected_features is None:
        # A new model records the encoders and grid it learns from; inference then refuses
        # stores made differently.
        hconfig.expected_features = store_signature(next(iter(data.stores.values())))
    if config.max_cells is not None:
        # Inference reads as many nuclei per patch as training did: the model records it.
        hconfig.max_cells = config.max_cells
    cache = FeatureCache(data.stores, max_cells=hconfig.max_cells, expected=hconfig.expected_features,
                         dims=(hconfig.region_dim, hconfig.patch_dim, hconfig.cell_dim),
                         capacity=config.feature_cache_slides)
    processor = run.processor if config.stage in (2, 3) else None

    def make(samples: list[Any]) -> SlideSet:
        return SlideSet(samples, cache, processor, data.scale_texts, config.uses_contrastive)

    train_set = make(data.train)
    val_set = make(data.validation) if data.validation else None
    sizes = {"train_samples": len(data.train),
             "train_slides": len({s.slide_id for s in data.train}),
             "validation_samples": len(data.validation),
             "validation_slides": len({s.slide_id for s in data.validation})}
    if config.uses_contrastive:
        check_slide_count(sizes["train_slides"], needed=2, what="the training set")
    return train_set, val_set, sizes


@dataclass(slots=True)
class _Plan:
    """Batch plans per epoch, rebuilt from (seed, epoch) whenever needed."""

    groups: list[Any]
    config: TrainConfig
    min_groups: int
    cache: dict[int, list[list[int]]] = field(default_factory=dict)

    def batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self.cache:
            self.cache = {epoch: plan_batches(
                self.groups, self.config.batch_size, seed=self.config.seed, epoch=epoch,
                distinct=self.config.stage != 0, min_groups=self.min_groups)}
        return self.cache[epoch]

    def steps(self, epoch: int) -> int:
        return math.ceil(len(self.batches(epoch)) / self.config.grad_accum)

    def total_steps(self) -> int:
        if self.config.max_steps:
            return self.config.max_steps
        return sum(self.steps(e) for e in range(self.config.epochs))


# -- loss bookkeeping -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Tally:
    """Sums of the terms over micro-batches, weighted like the objective.

    LM by supervised tokens; the other terms by slides (over the micro-batches that have them).
    """

    lm: float = 0.0
    lm_items: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    samples: int = 0

    def add(self, terms: Terms, batch: MicroBatch) -> None:
        self.tokens += batch.tokens
        self.samples += batch.slides
        if terms.lm is not None:
            self.lm += float(terms.lm.detach()) * batch.lm_items
            self.lm_items += batch.lm_items
        values = {"contrastive": terms.contrastive, "consistency": terms.consistency,
                  **{f"contrastive_{s}": v for s, v in terms.per_scale.items()}}
        for key, value in values.items():
            if value is not None:
                self.sums[key] = self.sums.get(key, 0.0) + float(value.detach()) * batch.slides
                self.weights[key] = self.weights.get(key, 0.0) + batch.slides

    def means(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.weights[k] for k in self.sums}
        if self.lm_items:
            out["lm"] = self.lm / self.lm_items
        return out


def _weighted(terms: Terms, batch: MicroBatch, weights: tuple[float, float, float],
              lm_items: int, slides: int) -> torch.Tensor | None:
    """This micro-batch's share of the step's objective."""
    w_lm, w_ctr, w_cons = weights
    parts: list[torch.Tensor] = []
    if terms.lm is not None and lm_items:
        parts.append(w_lm * terms.lm * (batch.lm_items / lm_items))
    share = batch.slides / slides
    if terms.contrastive is not None:
        parts.append(w_ctr * terms.contrastive * share)
    if terms.consistency is not None:
        parts.append(w_cons * terms.consistency * share)
    if not parts:
        return None
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def _total(means: dict[str, float], weights: tuple[float, float, float]) -> float:
    w_lm, w_ctr, w_cons = weights
    return (w_lm * means.get("lm", 0.0) + w_ctr * means.get("contrastive", 0.0)
            + w_cons * means.get("consistency", 0.0))


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    """Floats rounded for the log; NaN and infinities as null (strict JSON)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, float):
            value = round(value, 7) if math.isfinite(value) else None
        out[key] = value
    return out


# -- the loop -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Trainer:
    """One run's objects and the step/eval/save routines over them."""

    config: TrainConfig
    run: Run
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    bf16: bool
    weights: tuple[float, float, float]

    def _autocast(self) -> AbstractContextManager[Any]:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _modes(self, training: bool) -> None:
        self.run.model.train(training)
        if self.run.text_encoder is not None:
            trains = any(p.requires_grad for p in self.run.text_encoder.parameters())
            self.run.text_encoder.train(training and trains)

    def _to_device(self, batch: MicroBatch) -> MicroBatch:
        return MicroBatch(slides=batch.slides, text=to_device(batch.text, self.device),
                          visual=to_device(batch.visual, self.device), texts=batch.texts)

    def step(self, micro: Sequence[MicroBatch]) -> dict[str, Any]:
        """One optimiser step over ``micro``; returns its metrics row (without step/epoch)."""
        started = time.perf_counter()
        self._modes(True)
        self.optimizer.zero_grad(set_to_none=True)
        lm_items = sum(b.lm_items for b in micro)
        slides = sum(b.slides for b in micro)
        tally = _Tally()
        loss = 0.0
        for batch in micro:
            batch = self._to_device(batch)
            with self._autocast():
                terms = self.objective(batch)
            part = _weighted(terms, batch, self.weights, lm_items, slides)
            if part is None:
                continue
            if part.requires_grad:  # stage 3's contrastive term alone reaches nothing trainable
                part.backward()  # type: ignore[no-untyped-call]
            loss += float(part.detach())
            tally.add(terms, batch)
        params = [p for _, p in self.run.parameters()]
        max_norm = self.config.max_grad_norm or math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        lr = float(self.scheduler.get_last_lr()[0])
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            logger.warning("non-finite loss or gradient (loss %s, grad norm %s): update skipped",
                           loss, grad_norm)
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        self.scheduler.step()
        seconds = time.perf_counter() - started
        row: dict[str, Any] = {"eval": False, "lr": lr, "loss": loss, **tally.means(),
                               "grad_norm": grad_norm, "samples_per_s": tally.samples / seconds,
                               "step_time_s": seconds}
        if tally.tokens:
            row["tokens_per_s"] = tally.tokens / seconds
        if self.run.temperature is not None:
            row["temperature"] = float(self.run.temperature().detach())
        if skipped:
            row["skipped"] = True
        return row

    @torch.no_grad()
    def evaluate(self, data: TrainingSet, batches: Sequence[Sequence[int]]) -> dict[str, Any]:
        """Mean validation terms over ``batches`` and their weighted total."""
        self._modes(False)
        tally = _Tally()
        for indices in batches:
            batch = self._to_device(data.micro_batch(indices))
            with self._autocast():
                terms = self.objective(batch)
            tally.add(terms, batch)
        means = tally.means()
        return {"eval": True, "loss": _total(means, self.weights), **means,
                "samples": tally.samples}


def _read_rows(path: Path, up_to: int | None = None) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if up_to is None or r["step"] <= up_to]


def train(config: TrainConfig, *, resume: bool = False, progress: ProgressFn | None = None) -> Path:
    """Run one training stage to the end; returns the ``final/`` folder.

    Args:
        config: the run (see ``docs/training.md``).
        resume: continue from the newest ``checkpoint-<step>/`` in ``output_dir`` (the losses
            then equal an uninterrupted run's); without one, start at step 0.
        progress: called as ``progress("steps", done, total)`` after every optimiser step.

    Raises:
        ConfigError: unusable config, ``output_dir`` holding another run, a changed config on
            resume, no CUDA for ``device = "cuda"``.
        DatasetError: a malformed dataset, slides without stores, too few slides.
        FeatureStoreError: a store made with other encoders, grid or widths than the model's.
        ModelFileNotFoundError, CheckpointMismatchError: the start folder is missing or does
            not fit, or a checkpoint does not fit the rebuilt run.
    """
    out = config.output_dir
    checkpoint = _start_point(config, resume)
    device = _device(config.device)
    bf16 = _uses_bf16(config.precision, device)
    # Data problems fail here, before an LLM is loaded.
    data: SlideData | list[str] = (read_slide_data(config) if config.stage
                                   else read_corpus(cast(Path, config.corpus)))
    seed_everything(config.seed)
    run = build_run(config)
    train_set, val_set, sizes = _datasets(config, run, data)
    fingerprint = frozen_fingerprint(run.model)
    cast(torch.nn.Module, run.model).to(device)
    if run.text_encoder is not None:
        run.text_encoder.to(device)
    if run.temperature is not None:
        run.temperature.to(device)
    weights = config.loss_weights
    optimizer = build_optimizer(run.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    min_groups = 2 if config.uses_contrastive else 1
    plan = _Plan(train_set.groups, config, min_groups)
    if not plan.batches(0):
        raise ConfigError(f"batch_size: no training batch of {min_groups}+ slides can be formed")
    total = plan.total_steps()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(
        total_steps=total, warmup_steps=config.warmup_steps, schedule=config.schedule))
    tau = run.temperature if run.temperature is not None else config.temperature
    objective = Objective(run.model, stage=config.stage, weights=weights,
                          tokenizer=run.processor.tokenizer, text_encoder=run.text_encoder,
                          temperature=tau, consistency_form=config.consistency_form,
                          text_max_length=config.text_max_length)
    trainer = _Trainer(config, run, objective, optimizer, scheduler, device, bf16, weights)

    step, epoch, cursor, elapsed = 0, 0, 0, 0.0
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / METRICS
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model=run.model, text_encoder=run.text_encoder,
                                temperature=run.temperature, optimizer=optimizer,
                                scheduler=scheduler, fingerprint=fingerprint)
        step, epoch, cursor, elapsed = (int(state["step"]), int(state["epoch"]), int(state["cursor"]),
                                        float(state["elapsed_s"]))
        kept = _read_rows(metrics_path, up_to=step)
        write_bytes_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())
    else:
        write_bytes_atomic(metrics_path, b"")
    val_batches: list[list[int]] = []
    if val_set is not None:
        # Validation keeps one-slide batches: their contrastive term is simply left out.
        val_batches = plan_batches(val_set.groups, config.batch_size, seed=config.seed, epoch=0,
                                   shuffle=False, distinct=config.stage != 0)
    logger.info("stage %d: %d step(s) on %s (%s), training %s", config.stage, total, device,
                "bf16" if bf16 else "fp32", run.trainable)
    started = time.perf_counter() - elapsed
    last_eval: dict[str, Any] | None = None
    with metrics_path.open("a", encoding="utf-8") as log:

        def write(row: dict[str, Any]) -> None:
            log.write(json.dumps(_clean(row), allow_nan=False) + "\n")
            log.flush()

        while step < total:
            batches = plan.batches(epoch)
            if cursor >= len(batches):
                epoch, cursor = epoch + 1, 0
                continue
            chosen = batches[cursor : cursor + config.grad_accum]
            row = trainer.step([train_set.micro_batch(ix) for ix in chosen])
            step += 1
            cursor += len(chosen)
            if cursor >= len(batches):
                epoch, cursor = epoch + 1, 0
            position = epoch + cursor / len(plan.batches(epoch)) if plan.batches(epoch) else float(epoch)
            write({"step": step, "epoch": position, **row,
                   "elapsed_s": time.perf_counter() - started})
            logger.debug("step %d: loss %.4f", step, row["loss"])
            if progress is not None:
                progress("steps", step, total)
            if val_set is not None and val_batches and config.eval_every \
                    and step % config.eval_every == 0:
                last_eval = {"step": step, "epoch": position,
                             **trainer.evaluate(val_set, val_batches)}
                write(last_eval)
            if config.save_every and step % config.save_every == 0 and step < total:
                state = {"step": step, "epoch": epoch, "cursor": cursor,
                         "elapsed_s": time.perf_counter() - started, "fingerprint": fingerprint,
                         "omero_hwsi": __version__}
                save_checkpoint(out, step, model=run.model, text_encoder=run.text_encoder,
                                temperature=run.temperature, optimizer=optimizer,
                                scheduler=scheduler, state=state, config=config.to_dict(),
                                keep=config.keep_checkpoints)
        if val_set is not None and val_batches and (last_eval is None or last_eval["step"] != step):
            last_eval = {"step": step, "epoch": float(epoch), **trainer.evaluate(val_set, val_batches)}
            write(last_eval)
    rows = _read_rows(metrics_path)
    summary = _summary(config, run, rows, sizes, last_eval, time.perf_counter() - started, bf16, device)
    return _save_final(config, run, summary)


def _summary(config: TrainConfig, run: Run, rows: list[dict[str, Any]], sizes: dict[str, Any],
             last_eval: dict[str, Any] | None, elapsed: float, bf16: bool,
             device: torch.device) -> dict[str, Any]:
    train_rows = [r for r in rows if not r["eval"]]
    tail = [r["loss"] for r in train_rows[-10:] if r["loss"] is not None]
    return _clean({
        "stage": config.stage,
        "steps": train_rows[-1]["step"] if train_rows else 0,
        "epochs": train_rows[-1]["epoch"] if train_rows else 0.0,
        **sizes,
        "first_loss": train_rows[0]["loss"] if train_rows else None,
        "last_loss_mean10": sum(tail) / len(tail) if tail else None,
        "final_eval": _clean(last_eval) if last_eval else None,
        "elapsed_s": elapsed,
        "trainable_parameters": run.trainable,
        "lora": ({"r": config.lora_r, "alpha": config.lora_alpha, "targets": list(config.lora_targets),
                  "merged": config.merge_lora} if run.lora else None),
        "temperature": (float(run.temperature().detach()) if run.temperature is not None
                        else config.temperature),
        "precision": "bf16" if bf16 else "fp32",
        "device": str(device),
        "config": config.to_dict(),
        "omero_hwsi": __version__,
    })


def _save_final(config: TrainConfig, run: Run, summary: dict[str, Any]) -> Path:
    """Write ``final/`` under a temporary name, then rename it into place."""
    out = config.output_dir
    final, tmp = out / FINAL, out / f".{FINAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = run.model
    cast(torch.nn.Module, model).eval()
    if run.lora:
        peft_model: Any = model.language_model
        if config.merge_lora:
            model.language_model = peft_model.merge_and_unload()
        else:
            peft_model.save_pretrained(str(tmp / "lora_adapter"))
            model.language_model = peft_model.unload()
    model.save_pretrained(str(tmp))
    run.processor.save_pretrained(tmp)
    if run.text_encoder is not None:
        save_text_encoder(run.text_encoder, tmp)
    write_json_atomic(tmp / SUMMARY, summary)
    os.replace(tmp, final)
    logger.info("stage %d finished: %s", config.stage, final)
    return final
