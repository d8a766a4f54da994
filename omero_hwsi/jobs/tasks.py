"""The stage tasks: each claims its job in the ledger, calls one pipeline function, hands on.

Tasks hold no pipeline logic: ``prepare`` calls :func:`~omero_hwsi.features.extract.prepare_slide`
(open, MPP, tissue, grid) after checking the slide's checksum, ``features``
:func:`~omero_hwsi.analysis.extract_features` (an existing store is reused), ``infer``
:func:`~omero_hwsi.analysis.ask_slide` (the result is staged as JSON under
``<data_dir>/jobs/<job id>/``), ``write`` :func:`~omero_hwsi.analysis.write_result` and the
QuPath sink, then registers the outputs. These are the functions ``hwsi analyze`` runs in one
process.

Every task follows one protocol (:func:`_run_stage`): claim the stage (duplicates, stale
messages and cancelled jobs are dropped; restarts are counted; past ``HWSI_TASK_RETRIES``
the job is dead-lettered and the message acknowledged), heartbeat from a thread while working,
report progress through the ledger (which also stops the work of a cancelled job), then record
the stage done and send the next stage's message. A user-facing :class:`HwsiError` fails the
job with its one line and is not retried; any other exception is a bug: the job fails with its
type and the traceback stays in the worker log.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from omero_hwsi._io import write_json_atomic
from omero_hwsi.errors import HwsiError, InputError, ModelFileNotFoundError
from omero_hwsi.jobs.app import send_stage
from omero_hwsi.jobs.keys import DigestCache, model_identity
from omero_hwsi.jobs.ledger import Job, Ledger, Output, utcnow
from omero_hwsi.jobs.routing import Stage, next_stage
from omero_hwsi.settings import Settings, load_settings

if TYPE_CHECKING:
    from omero_hwsi.analysis import AnalysisRequest
    from omero_hwsi.inference.pipeline import HwsiPipeline

__all__ = ["features", "infer", "prepare", "write"]

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.5
"""Progress calls reach the ledger (and see a cancellation) at most this often."""

_PIPELINES: dict[tuple[str, str], HwsiPipeline] = {}
"""Models loaded in this worker process, by folder and digest: loaded once, on first use."""


class _Stopped(Exception):
    """Raised from a progress call: the job was cancelled, or another task took it over."""


@functools.cache
def _settings() -> Settings:
    return load_settings()


@dataclass
class _Context:
    """One running stage: who runs it, and the ledger-backed progress and heartbeat."""

    ledger: Ledger
    job: Job
    runner: str
    worker: str
    settings: Settings
    task: Any
    stopped: str | None = None
    _last: float = field(default_factory=time.monotonic)  # the claim just wrote the ledger

    @property
    def params(self) -> dict[str, Any]:
        return self.job.params

    @property
    def job_settings(self) -> Settings:
        """The worker's settings with the analysis settings recorded in the job."""
        return self.settings.replace(**self.params.get("settings", {}))

    @property
    def staging(self) -> Path:
        return self.settings.data_dir / "jobs" / self.job.id

    def progress(self, stage: str, done: int, total: int) -> None:
        """A pipeline ``ProgressFn``: throttled writes to the ledger; stops a cancelled job."""
        if self.stopped:
            raise _Stopped(self.stopped)
        now = time.monotonic()
        if now - self._last < PROGRESS_INTERVAL_S:
            return  # the claim, the last write or the stage's end (finish_stage) is that recent
        self._last = now
        status = self.ledger.progress(self.job.id, runner=self.runner,
                                      fraction=done / total if total else 0.0)
        if status != "ok":
            self.stopped = status
            raise _Stopped(status)
        if self.task.app.conf.result_backend:
            self.task.update_state(state="PROGRESS", meta={"job_id": self.job.id, "step": stage,
                                                           "done": done, "total": total})

    @contextmanager
    def heartbeats(self) -> Iterator[None]:
        """Write the heartbeat every ``HWSI_HEARTBEAT_SECONDS`` from a thread while working."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.settings.heartbeat_seconds):
                try:
                    status = self.ledger.heartbeat(self.job.id, runner=self.runner)
                    if status != "ok":
                        self.stopped = self.stopped or status
                except HwsiError as err:  # the database is away: try again next beat
                    logger.warning("job %s: heartbeat failed: %s", self.job.id, err)

        thread = threading.Thread(target=beat, name=f"heartbeat-{self.job.id[:8]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(timeout=5)


def _regions(params: dict[str, Any], payload: dict[str, Any]) -> Path | None:
    """The regions file: the submitted one, or the one made from an OMERO image's ROIs."""
    found = params.get("regions") or payload.get("regions_file")
    return Path(found) if found else None


def _slide(params: dict[str, Any], payload: dict[str, Any]) -> str:
    """The slide file: the submitted path, or the local copy ``prepare`` pulled from OMERO."""
    return str(payload.get("slide") or params["slide"])


def _request(params: dict[str, Any], payload: dict[str, Any]) -> AnalysisRequest:
    """The job's :class:`AnalysisRequest` from its JSON parameters (imports torch: ``infer``)."""
    from omero_hwsi.analysis import AnalysisRequest
    from omero_hwsi.inference.pipeline import Decoding

    return AnalysisRequest(task=params["task"], question=params.get("question"),
                           labels=tuple(params.get("labels", ())), evidence=params["evidence"],
                           evidence_method=params["evidence_method"],
                           regions=_regions(params, payload),
                           mpp=params.get("mpp"), decoding=Decoding(**params["decoding"]))


def _model_dir(params: dict[str, Any], cache: DigestCache) -> Path:
    """The model folder on this worker, checked against the digest recorded at submission.

    Raises:
        ModelFileNotFoundError: the folder is missing here or holds another model.
    """
    from omero_hwsi.plan import default_model

    model = params["model"]
    folder = Path(model["path"]) if model.get("path") else default_model()
    if not folder.is_dir():
        raise ModelFileNotFoundError(f"{folder}: model folder not found on this worker; share "
                                     "it at the same path as on the submitting machine")
    digest = model_identity(folder, cache)["sha256"]
    if digest != model["sha256"]:
        raise ModelFileNotFoundError(
            f"{folder}: the model on this worker (sha256 {digest[:12]}) is not the one the job "
            f"was submitted with ({model['sha256'][:12]}); install the same model everywhere")
    return folder


def _pipeline(folder: Path, digest: str) -> HwsiPipeline:
    """The model of ``folder``, loaded once per worker process (models are loaded lazily)."""
    from omero_hwsi.inference import HwsiPipeline

    key = (str(folder), digest)
    if key not in _PIPELINES:
        _PIPELINES.clear()  # one model at a time per process: GPU memory is the limit
        _PIPELINES[key] = HwsiPipeline.from_pretrained(folder)
    return _PIPELINES[key]


def _prepare(ctx: _Context, payload: dict[str, Any]) -> dict[str, Any]:
    from omero_hwsi.features.extract import prepare_slide
    from omero_hwsi.plan import expected_features, grid_spec
    from qupath_bridge.geojson import ReadOptions, read_regions

    params, settings = ctx.params, ctx.job_settings
    cache = DigestCache(ctx.settings.data_dir / "cache")
    artifacts: dict[str, Any] = {}
    if params.get("omero"):
        from omero_hwsi.omero.stages import pull_for_job

        slide, pulled_regions = pull_for_job(ctx.settings, job_id=ctx.job.id, user=ctx.job.user,
                                             params=params, staging=ctx.staging,
                                             progress=ctx.progress)
        checksum = cache.slide(slide)
        artifacts = {"slide": str(slide),
                     "regions_file": None if pulled_regions is None else str(pulled_regions)}
    else:
        slide = Path(params["slide"])
        if not slide.is_file():
            raise InputError(f"{slide}: slide not found on this worker; HWSI_DATA_DIR and the "
                             "slides must be shared at the same paths on every machine")
        checksum = cache.slide(slide)
        if checksum != params["slide_sha256"]:
            raise InputError(f"{slide}: the file changed after the job was submitted; submit "
                             "it again")
    regions = _regions(params, artifacts)
    restrict = (read_regions(regions, options=ReadOptions.from_settings(settings))
                if regions is not None else None)
    expected = expected_features(_model_dir(params, cache))
    hierarchy = prepare_slide(slide, grid_spec(expected, settings), mpp=params.get("mpp"),
                              mpp_tolerance=settings.mpp_tolerance, restrict=restrict)
    return {**artifacts, "slide_sha256": checksum, "regions": hierarchy.n_regions}


def _features(ctx: _Context, payload: dict[str, Any]) -> dict[str, Any]:
    from omero_hwsi.analysis import extract_features
    from omero_hwsi.plan import expected_features

    cache = DigestCache(ctx.settings.data_dir / "cache")
    started = time.perf_counter()
    # In the task's own process: Celery's pool processes are daemonic and may not start
    # extraction processes; the pool (--concurrency) is the parallelism on a worker.
    extracted = extract_features(
        _slide(ctx.params, payload), expected=expected_features(_model_dir(ctx.params, cache)),
        settings=ctx.job_settings.replace(extract_workers=0),
        regions=_regions(ctx.params, payload),
        mpp=ctx.params.get("mpp"), progress=ctx.progress)
    return {"store": str(extracted.path), "features_reused": extracted.already_complete,
            "features_s": round(time.perf_counter() - started, 3)}


def _infer(ctx: _Context, payload: dict[str, Any]) -> dict[str, Any]:
    from omero_hwsi.analysis import ask_slide, result_provenance
    from omero_hwsi.features.store import load_features

    staged = ctx.staging / "result.staged.json"
    if staged.is_file():  # a restart after the answer was staged: infer is not run twice
        document = json.loads(staged.read_text(encoding="utf-8"))
        if document.get("job_key_sha256") == _key_digest(ctx.job):
            return {"staged": str(staged)}
    cache = DigestCache(ctx.settings.data_dir / "cache")
    folder = _model_dir(ctx.params, cache)
    pipeline = _pipeline(folder, ctx.params["model"]["sha256"])
    features = load_features(payload["store"])
    request = _request(ctx.params, payload)
    started = time.perf_counter()
    result = ask_slide(features, pipeline=pipeline, request=request, settings=ctx.job_settings,
                       progress=ctx.progress)
    provenance = result_provenance(features, reused=bool(payload.get("features_reused")),
                                   request=request)
    provenance["job_id"] = ctx.job.id
    write_json_atomic(staged, {"job_key_sha256": _key_digest(ctx.job), "result": result.to_dict(),
                               "provenance": provenance,
                               "infer_s": round(time.perf_counter() - started, 3)})
    return {"staged": str(staged)}


def _key_digest(job: Job) -> str:
    return hashlib.sha256(job.key.encode("utf-8")).hexdigest()


def _write(ctx: _Context, payload: dict[str, Any]) -> dict[str, Any]:
    from omero_hwsi.analysis import write_result
    from omero_hwsi.results.schema import AnalysisResult

    started = time.perf_counter()
    document = json.loads(Path(payload["staged"]).read_text(encoding="utf-8"))
    result = AnalysisResult.from_dict(document["result"])
    features_s = float(payload.get("features_s", 0.0))
    result = replace(result, timings={"features_s": features_s, **result.timings,
                                      "total_s": round(features_s + document["infer_s"], 3)})
    out = Path(ctx.job.out_dir)
    written = write_result(_slide(ctx.params, payload), out, result,
                           provenance=document["provenance"], settings=ctx.job_settings,
                           mpp=ctx.params.get("mpp"))
    sink = ctx.params.get("qupath")
    if sink:
        from qupath_bridge.geojson import ReadOptions
        from qupath_bridge.project import add_evidence

        add_evidence(Path(sink["project"]), sink["image"], out,
                     options=ReadOptions.from_settings(ctx.job_settings))
    cache = DigestCache(ctx.settings.data_dir / "cache")
    now = utcnow()
    outputs = [Output(ctx.job.id, str(path), path.suffix.lstrip(".") or "file", cache.file(path),
                      path.stat().st_size, now) for path in written]
    if ctx.params.get("omero"):
        from omero_hwsi.omero.stages import write_back_for_job

        uris = write_back_for_job(ctx.settings, job_id=ctx.job.id, user=ctx.job.user,
                                  params=ctx.params, model=ctx.job.model,
                                  input_sha256=ctx.params["omero"]["files_sha256"],
                                  out_dir=out)
        outputs += [Output(ctx.job.id, uri, "omero", "", 0, now) for uri in uris]
    ctx.ledger.succeed(ctx.job.id, runner=ctx.runner, worker=ctx.worker, outputs=outputs,
                       message=f"write done: {len(outputs)} file(s) in {out} "
                               f"({time.perf_counter() - started:.1f} s)")
    return {"out_dir": str(out), "outputs": len(outputs)}


def _run_stage(task: Any, payload: dict[str, Any], stage: Stage,
               body: Callable[[_Context, dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """The protocol every stage task follows (see the module docstring)."""
    settings = _settings()
    job_id = str(payload["job_id"])
    worker = str(task.request.hostname or socket.gethostname())
    runner = str(task.request.id)
    ledger = Ledger(settings.ledger_url)
    claim = ledger.claim(job_id, stage, runner=runner, worker=worker,
                         retries=settings.task_retries, stale_seconds=settings.stale_seconds)
    if claim.outcome != "run" or claim.job is None:
        logger.info("job %s: %s message not run: %s", job_id, stage, claim.reason)
        return {"job_id": job_id, "stage": stage, "skipped": claim.reason}
    ctx = _Context(ledger, claim.job, runner, worker, settings, task)
    started = time.perf_counter()
    with ctx.heartbeats():
        try:
            artifacts = body(ctx, payload)
        except _Stopped as stop:
            ledger.note(job_id, worker=worker, message=f"{stage} stopped: the job was {stop}")
            return {"job_id": job_id, "stage": stage, "stopped": str(stop)}
        except SoftTimeLimitExceeded:
            error = (f"stage {stage} ran longer than HWSI_MAX_TASK_SECONDS="
                     f"{settings.max_task_seconds}; raise it for slides this large")
            ledger.fail(job_id, runner=runner, worker=worker, error=error)
            return {"job_id": job_id, "stage": stage, "failed": error}
        except HwsiError as err:
            ledger.fail(job_id, runner=runner, worker=worker, error=str(err))
            return {"job_id": job_id, "stage": stage, "failed": str(err)}
        except Exception as err:
            ledger.fail(job_id, runner=runner, worker=worker,
                        error=f"internal error in stage {stage}: {type(err).__name__}: {err} "
                              f"(a bug: the traceback is in the log of worker {worker})")
            raise
    following = next_stage(stage)
    if following is not None:
        handed_on = {**{k: v for k, v in payload.items() if k not in ("job_id", "stage")},
                     **artifacts}
        if ledger.finish_stage(job_id, runner=runner, worker=worker, next_stage=following,
                               artifacts=handed_on,
                               message=f"{stage} done in {time.perf_counter() - started:.1f} s"):
            try:
                send_stage(task.app, job_id, following, artifacts=handed_on,
                           params=claim.job.params)
            except Exception as err:  # the broker is away: the ledger keeps the job queued
                logger.exception("job %s: cannot send stage %s", job_id, following)
                ledger.note(job_id, worker=worker, message=(
                    f"could not send the {following} message ({type(err).__name__}); the "
                    "reconciler sends it again after HWSI_REQUEUE_SECONDS"))
    return {"job_id": job_id, "stage": stage, **artifacts}


@shared_task(name="hwsi.prepare", bind=True)
def prepare(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Stage ``prepare`` (queue ``cpu``): checksum, open, MPP, tissue, grid."""
    return _run_stage(self, payload, "prepare", _prepare)


@shared_task(name="hwsi.features", bind=True)
def features(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Stage ``features`` (queue ``gpu``, ``cpu`` for built-in encoders): the feature store."""
    return _run_stage(self, payload, "features", _features)


@shared_task(name="hwsi.infer", bind=True)
def infer(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Stage ``infer`` (queue ``gpu``): the model's answer and evidence, staged as JSON."""
    return _run_stage(self, payload, "infer", _infer)


@shared_task(name="hwsi.write", bind=True)
def write(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Stage ``write`` (queue ``io``): result files, sinks, outputs registered once."""
    return _run_stage(self, payload, "write", _write)
