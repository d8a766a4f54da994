"""Submit and follow jobs: what ``hwsi jobs`` and OMERO scripts call (torch-free).

Submitting hashes the slide (cached), builds the job key and id (:mod:`omero_hwsi.jobs.keys`),
records the job in the ledger and, only if the ledger did not know it yet, sends the
``prepare`` message. So submitting the same slide, question, parameters and model again returns
the same job and queues nothing. Messages carry the job id and paths only: no user
credentials, no broker or database URL, never pixels.

This module imports neither torch nor the model code (a test checks ``sys.modules`` in a fresh
interpreter): an OMERO server's Python can enqueue work for GPU workers.
"""

from __future__ import annotations

import getpass
import logging
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from omero_hwsi.errors import HwsiError, InputError, ServiceError, check_choice
from omero_hwsi.jobs._db import redact
from omero_hwsi.jobs.keys import (
    KEY_VERSION,
    DigestCache,
    canonical_json,
    job_id_for,
    model_identity,
)
from omero_hwsi.jobs.ledger import STATES, Event, Job, Ledger, Output, utcnow
from omero_hwsi.omero.images import OmeroImage, pixel_route
from omero_hwsi.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["ANALYSIS_SETTINGS", "CSV_COLUMNS", "EVIDENCE_DEPTHS", "EVIDENCE_METHODS", "TASKS",
           "JobInput", "JobRequest", "OmeroJobInput", "Submission", "cancel", "csv_row",
           "default_user", "events", "list_jobs", "outputs", "parse_duration", "parse_since",
           "prune", "retry", "status", "submit"]

logger = logging.getLogger(__name__)

TASKS: Final = ("vqa", "report", "caption", "classify", "retrieve")
"""The analysis tasks (``omero_hwsi.inference.pipeline.Task``; a test keeps them in step)."""
EVIDENCE_DEPTHS: Final = ("none", "region", "patch", "cell")
EVIDENCE_METHODS: Final = ("occlusion", "grad_x_input", "attention")
ANALYSIS_SETTINGS: Final = ("target_mpp", "region_px", "patch_px", "mpp_tolerance",
                            "min_tissue_fraction", "candidates_per_region", "patches_per_region",
                            "evidence_top_regions", "evidence_top_patches")
"""Settings that change a result: recorded in the job (and its key) and applied by workers."""

CSV_COLUMNS: Final = ("job_id", "state", "stage", "progress", "task", "input", "user", "model",
                      "created", "updated", "error")
"""The columns of ``hwsi jobs list --format csv``, in this order."""


@dataclass(frozen=True, slots=True)
class JobRequest:
    """What to ask about each slide: the options of ``hwsi analyze``.

    Raises:
        InputError: an option outside its vocabulary (checked on creation).
    """

    task: str = "vqa"
    question: str | None = None
    labels: tuple[str, ...] = ()
    evidence: str = "cell"
    evidence_method: str = "occlusion"
    regions: Path | None = None
    mpp: float | None = None
    max_new_tokens: int = 256
    seed: int | None = None

    def __post_init__(self) -> None:
        check_choice("--task", self.task, TASKS)
        check_choice("--evidence", self.evidence, EVIDENCE_DEPTHS)
        check_choice("--evidence-method", self.evidence_method, EVIDENCE_METHODS)
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.mpp is not None and not self.mpp > 0:
            raise InputError(f"--mpp must be > 0, got {self.mpp}")

    def decoding(self) -> dict[str, Any]:
        """The ``Decoding`` fields (greedy unless a seed asks for sampling)."""
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.seed is not None,
                "seed": self.seed}


@dataclass(frozen=True, slots=True)
class JobInput:
    """One slide to analyse, with what is specific to it.

    Attributes:
        slide: the slide file (on storage every worker sees at the same path).
        regions: a GeoJSON of areas for this slide (wins over the request's ``regions``).
        out_dir: where its result files go (default ``<data_dir>/results/<job id>``).
        qupath_project, qupath_image: a QuPath project image to add the evidence to.
    """

    slide: Path
    regions: Path | None = None
    out_dir: Path | None = None
    qupath_project: Path | None = None
    qupath_image: str | None = None


@dataclass(frozen=True, slots=True)
class Submission:
    """A submitted job, and whether this submission created it (False: it existed)."""

    job: Job
    created: bool


def default_user() -> str:
    """The requesting user by default: the OS user running the command."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


_APPS: dict[str, Celery] = {}


def _app(settings: Settings) -> Celery:
    from omero_hwsi.jobs.app import create_app

    if settings.broker not in _APPS:
        _APPS[settings.broker] = create_app(settings)
    return _APPS[settings.broker]


def _send(settings: Settings, job: Job, artifacts: dict[str, Any]) -> None:
    from omero_hwsi.jobs.app import send_stage

    try:
        send_stage(_app(settings), job.id, "prepare", artifacts=artifacts, params=job.params)
    except HwsiError:
        raise
    except Exception as err:  # kombu/redis/amqp errors at this edge become one line
        raise ServiceError(
            f"job {job.id} is recorded but the broker {redact(settings.broker)} did not take "
            f"its message ({type(err).__name__}: {err}); a worker's reconciler sends it after "
            "HWSI_REQUEUE_SECONDS, or cancel and retry it") from err


def _ledger(settings: Settings) -> Ledger:
    return Ledger(settings.ledger_url)


@dataclass(frozen=True, slots=True)
class OmeroJobInput:
    """One OMERO image to analyse (resolved by :func:`omero_hwsi.omero.images.resolve_images`).

    Attributes:
        image: the pyramid image, its group and its original files' stored hashes.
        server: the OMERO server's database UUID (``omero.db.uuid``): ids are per server.
        write_rois: write the evidence regions back as ROIs (files and key-values always are).
        restrict_to_rois: analyse only inside the image's existing ROIs (not ours).
        rois_sha256: the digest of those ROIs' area at submission
            (:func:`omero_hwsi.omero.rois.regions_digest`), so edited ROIs make another job.
        out_dir: where its result files go (default ``<data_dir>/results/<job id>``).
    """

    image: OmeroImage
    server: str
    write_rois: bool = True
    restrict_to_rois: bool = False
    rois_sha256: str | None = None
    out_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class _Item:
    """What the ledger records about one input, whatever its kind."""

    label: str
    checksum: str
    identity: dict[str, Any]
    params: dict[str, Any]
    out_dir: Path | None


def _file_item(item: JobInput, request: JobRequest, cache: DigestCache) -> _Item:
    slide = item.slide.resolve()
    checksum = cache.slide(slide)
    regions = item.regions or request.regions
    regions = regions.resolve() if regions is not None else None
    return _Item(
        label=str(slide), checksum=checksum, out_dir=item.out_dir,
        identity={"sha256": checksum,
                  "regions_sha256": cache.file(regions) if regions is not None else None},
        params={"slide": str(slide), "slide_sha256": checksum,
                "regions": None if regions is None else str(regions),
                "qupath": None if item.qupath_project is None else {
                    "project": str(item.qupath_project.resolve()), "image": item.qupath_image}})


def _omero_item(item: OmeroJobInput) -> _Item:
    image = item.image
    checksum = image.files_sha256
    return _Item(
        label=f"omero:image/{image.id}", checksum=checksum, out_dir=item.out_dir,
        identity={"omero_server": item.server, "omero_image": image.id,
                  "files_sha256": checksum, "write_rois": item.write_rois,
                  "restrict_to_rois": item.restrict_to_rois, "rois_sha256": item.rois_sha256},
        params={"slide": None, "slide_sha256": None, "regions": None, "qupath": None,
                "omero": {"server": item.server, "image": image.id, "name": image.name,
                          "group": image.group, "files_sha256": checksum,
                          "route": pixel_route(image), "write_rois": item.write_rois,
                          "restrict_to_rois": item.restrict_to_rois,
                          "rois_sha256": item.rois_sha256}})


def submit(inputs: Sequence[JobInput | OmeroJobInput], request: JobRequest, *,
           settings: Settings, model: Path | None = None,
           user: str | None = None) -> list[Submission]:
    """Record one job per input and queue the new ones; existing jobs are returned as they are.

    A file input is identified by its SHA-256, an OMERO image by the server, the image id and
    the hashes OMERO stored for its original files (no download needed).

    Raises:
        InputError: a slide or regions file is missing (checked before anything is recorded).
        MissingResourceError: the model folder is missing or unreadable.
        ServiceError: the ledger or the broker cannot be reached.
    """
    from omero_hwsi.plan import default_model, expected_features

    files = [item for item in inputs if isinstance(item, JobInput)]
    missing = [str(item.slide) for item in files if not item.slide.is_file()]
    missing += [str(r) for item in files
                if (r := item.regions or request.regions) is not None and not r.is_file()]
    if missing:
        raise InputError(f"file(s) not found: {', '.join(missing)}")
    user = user or default_user()
    cache = DigestCache(settings.data_dir / "cache")
    model = model or settings.model
    folder = (model or default_model()).resolve()
    identity = model_identity(folder, cache)
    expected = expected_features(folder) or {}
    encoders = [str(expected.get(scale, {}).get("id", default))
                for scale, default in (("patch", "hed_texture"), ("region", "layout"))]
    analysis = {name: getattr(settings, name) for name in ANALYSIS_SETTINGS}
    common = {"task": request.task, "question": request.question,
              "labels": list(request.labels), "evidence": request.evidence,
              "evidence_method": request.evidence_method, "mpp": request.mpp,
              "decoding": request.decoding(), "settings": analysis}
    ledger = _ledger(settings)
    host = socket.gethostname()
    submitted: list[Submission] = []
    for item in inputs:
        entry = (_file_item(item, request, cache) if isinstance(item, JobInput)
                 else _omero_item(item))
        key = canonical_json({"v": KEY_VERSION, **common, "input": entry.identity,
                              "model": identity})
        job_id = job_id_for(key)
        out_dir = (entry.out_dir or settings.data_dir / "results" / job_id).resolve()
        params = {**common, **entry.params,
                  "model": {**identity, "path": None if model is None else str(folder)},
                  "encoders": encoders}
        job, created = ledger.insert(
            job_id=job_id, key=key, task=request.task, input=entry.label,
            input_sha256=entry.checksum, user=user,
            model=f"{identity['id']}@{identity['sha256'][:12]}", params=params,
            out_dir=str(out_dir), host=host)
        if created:
            _send(settings, job, {})
        submitted.append(Submission(job, created))
    return submitted


def status(ref: str, *, settings: Settings) -> Job:
    """The job with id (or unique id prefix) ``ref``.

    Raises:
        JobNotFoundError: no such job.
    """
    return _ledger(settings).find(ref)


def events(ref: str, *, settings: Settings) -> list[Event]:
    """Every change of a job, oldest first (``hwsi jobs log``)."""
    ledger = _ledger(settings)
    return ledger.events(ledger.find(ref).id)


def outputs(ref: str, *, settings: Settings) -> list[Output]:
    """The files a job registered."""
    ledger = _ledger(settings)
    return ledger.outputs(ledger.find(ref).id)


def cancel(ref: str, *, settings: Settings, user: str | None = None) -> tuple[Job, bool]:
    """Cancel a queued or running job; a running task stops at its next progress call.

    The ledger is what stops the job. With Redis or RabbitMQ the running task's id is also
    revoked (:func:`_revoke`). Returns the job and whether it was cancelled by this call
    (False: it had already ended).
    """
    ledger = _ledger(settings)
    job, changed = ledger.cancel(ledger.find(ref).id, user=user or default_user())
    if changed and job.runner is not None and settings.broker_url:
        _revoke(settings, job.runner)
    return job, changed


def _revoke(settings: Settings, task_id: str) -> None:
    """Broadcast ``revoke`` of a cancelled job's running task (``terminate=False``).

    An extra for brokers that broadcast: every worker running now remembers the id and
    acknowledges a copy of that message delivered again (after its worker died) without running
    it. The task itself is not interrupted; it stops at its next ledger progress call, so a
    broadcast that fails changes nothing and is only logged.
    """
    try:
        _app(settings).control.revoke(task_id, terminate=False)
    except Exception as err:  # kombu/redis/amqp errors: the ledger has cancelled the job
        logger.warning("could not broadcast revoke of task %s on %s (%s: %s); the job is "
                       "cancelled in the ledger all the same", task_id,
                       redact(settings.broker), type(err).__name__, err)


def retry(ref: str, *, settings: Settings, user: str | None = None) -> Job:
    """Run a failed, cancelled or dead-letter job again from ``prepare``.

    Raises:
        JobError: the job is queued, running or succeeded.
    """
    ledger = _ledger(settings)
    job = ledger.reset_for_retry(ledger.find(ref).id, user=user or default_user())
    _send(settings, job, {})
    return job


def list_jobs(*, settings: Settings, since: datetime | None = None,
              states: Sequence[str] = (), user: str | None = None) -> list[Job]:
    """Jobs, oldest first, filtered by creation time, state and user (``hwsi jobs list``).

    Raises:
        InputError: an unknown state.
    """
    for state in states:
        check_choice("--state", state, STATES)
    return _ledger(settings).list_jobs(since=since, states=states, user=user)


def prune(*, settings: Settings, older_than: timedelta) -> tuple[int, int]:
    """Delete ended jobs not updated for ``older_than`` (result files stay).

    With the embedded broker, delivered messages older than that are deleted too (kombu's
    SQLAlchemy transport keeps them). Returns ``(jobs deleted, messages deleted)``.
    """
    cutoff = utcnow() - older_than
    jobs = _ledger(settings).prune(cutoff)
    messages = 0
    if not settings.broker_url:
        from sqlalchemy import create_engine, text

        engine = create_engine(settings.broker.removeprefix("sqla+"), connect_args={"timeout": 30})
        try:
            with engine.begin() as connection:
                result = connection.execute(
                    text("DELETE FROM kombu_message WHERE visible = 0 AND timestamp < :cutoff"),
                    {"cutoff": cutoff.astimezone().replace(tzinfo=None)})  # kombu: local time
                messages = int(getattr(result, "rowcount", 0) or 0)
        finally:
            engine.dispose()
    return jobs, messages


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """``30s``, ``15m``, ``2h``, ``7d``, ``4w`` -> a timedelta.

    Raises:
        InputError: anything else.
    """
    match = _DURATION.match(text)
    if not match:
        raise InputError(f"{text!r} is not a duration; use a number and s, m, h, d or w (7d)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def parse_since(text: str) -> datetime:
    """A duration ago (``2h``, ``7d``) or an ISO date/time (UTC unless it says otherwise).

    Raises:
        InputError: neither.
    """
    if _DURATION.match(text):
        return utcnow() - parse_duration(text)
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError as err:
        raise InputError(f"--since {text!r}: give a duration (2h, 7d) or an ISO date "
                         "(2025-03-01 or 2025-03-01T08:00)") from err
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def csv_row(job: Job) -> list[str]:
    """One row of :data:`CSV_COLUMNS` for a job (times ISO 8601 UTC, progress 0-1)."""
    return [job.id, job.state, job.stage, f"{job.progress:.3f}", job.task, job.input, job.user,
            job.model, job.created.isoformat(timespec="seconds"),
            job.updated.isoformat(timespec="seconds"), job.error or ""]
