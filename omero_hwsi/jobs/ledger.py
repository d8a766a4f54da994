"""The job ledger: the source of truth for what ran, for whom, how far it got and what it wrote.

Three tables (SQLAlchemy 2 models, created by Alembic migrations): ``jobs`` (one row per job id,
its state, stage, progress, heartbeat, attempts, parameters and error), ``events`` (every change:
time, worker, requesting user, message) and ``outputs`` (files a job wrote, unique per job and
path, so a stage that runs twice registers them once). The broker only carries messages; a
task reads and changes its job here, inside one short transaction per change (row lock on
PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so two deliveries of one message cannot both run.

States: ``queued`` (a message for ``stage`` is on its way), ``running`` (a task works on
``stage``: fraction in ``progress``, liveness in ``heartbeat``), then one of ``succeeded``,
``failed`` (a one-line error users can act on), ``cancelled`` or ``dead_letter`` (the worker
died on it more than ``HWSI_TASK_RETRIES`` times). ``attempts`` counts starts of the job: 1 for
a run without incident, +1 each time a stage starts again after its task died.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, TypeAlias

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    delete,
    select,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from omero_hwsi.errors import InputError, JobError, JobNotFoundError, ServiceError
from omero_hwsi.jobs._db import ledger_engine, redact

__all__ = ["ACTIVE_STATES", "STATES", "TERMINAL_STATES", "Claim", "Event", "Job", "JobState",
           "Ledger", "Output", "utcnow"]

JobState: TypeAlias = Literal["queued", "running", "succeeded", "failed", "cancelled",
                              "dead_letter"]
STATES: Final[tuple[JobState, ...]] = ("queued", "running", "succeeded", "failed", "cancelled",
                                       "dead_letter")
ACTIVE_STATES: Final[frozenset[str]] = frozenset({"queued", "running"})
TERMINAL_STATES: Final[frozenset[str]] = frozenset(STATES) - ACTIVE_STATES


def utcnow() -> datetime:
    """Now, timezone-aware UTC (every ledger time is UTC)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on SQLite (naive text) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[str] = mapped_column(String(16))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    heartbeat: Mapped[datetime | None] = mapped_column(UTCDateTime)
    enqueued: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    runner: Mapped[str | None] = mapped_column(String(255))
    task: Mapped[str] = mapped_column(String(16))
    input: Mapped[str] = mapped_column(Text)
    input_sha256: Mapped[str] = mapped_column(String(64))
    user: Mapped[str] = mapped_column(String(255), index=True)
    model: Mapped[str] = mapped_column(String(255))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    artifacts: Mapped[dict[str, Any]] = mapped_column(JSON)
    out_dir: Mapped[str] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    updated: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class EventRow(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"),
                                        index=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    worker: Mapped[str] = mapped_column(String(255))
    user: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)


class OutputRow(Base):
    __tablename__ = "outputs"
    __table_args__ = (UniqueConstraint("job_id", "path", name="uq_outputs_job_id_path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"),
                                        index=True)
    path: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[datetime] = mapped_column(UTCDateTime)


@dataclass(frozen=True, slots=True)
class Job:
    """One queued analysis as the ledger records it (the ``Job`` contract).

    Attributes:
        id: ``uuid5`` of ``key`` (see :mod:`omero_hwsi.jobs.keys`).
        key: canonical JSON of what decides the outputs.
        state: see :data:`STATES`.
        stage: the stage queued or running (the last one reached, once finished).
        progress: fraction of ``stage`` done, in [0, 1].
        heartbeat: last sign of life of the task running it (UTC).
        attempts: starts of the job (1 without incident).
        runner: the Celery task id of the task that claimed ``stage`` (None once handed on or
            ended; kept on cancellation, so a cancel can revoke that task id).
        task: ``vqa``, ``report``, ``caption``, ``classify`` or ``retrieve``.
        input: the slide as submitted (a path).
        user: who requested it.
        model: ``<model id>@<first 12 hex of its digest>``.
        params: the analysis request and settings the workers apply (JSON).
        out_dir: where the result files go.
        error: one line, for ``failed`` and ``dead_letter``.
        created, updated: UTC times.
    """

    id: str
    key: str
    state: JobState
    stage: str
    progress: float
    heartbeat: datetime | None
    attempts: int
    runner: str | None
    task: str
    input: str
    user: str
    model: str
    params: dict[str, Any]
    out_dir: str
    error: str | None
    created: datetime
    updated: datetime

    @classmethod
    def from_row(cls, row: JobRow) -> Job:
        return cls(id=row.id, key=row.key, state=row.state,  # type: ignore[arg-type]
                   stage=row.stage, progress=row.progress, heartbeat=row.heartbeat,
                   attempts=row.attempts, runner=row.runner, task=row.task, input=row.input,
                   user=row.user, model=row.model, params=dict(row.params), out_dir=row.out_dir,
                   error=row.error, created=row.created, updated=row.updated)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (times as ISO 8601 UTC)."""
        data = {name: getattr(self, name) for name in self.__slots__}
        for name in ("heartbeat", "created", "updated"):
            value = data[name]
            data[name] = None if value is None else value.isoformat(timespec="seconds")
        return data


@dataclass(frozen=True, slots=True)
class Event:
    """One change of a job: when, on which worker (or client host), for whom, what."""

    job_id: str
    time: datetime
    worker: str
    user: str
    state: str
    stage: str
    message: str


@dataclass(frozen=True, slots=True)
class Output:
    """A file a job wrote, registered once."""

    job_id: str
    path: str
    kind: str
    sha256: str
    bytes: int
    created: datetime


ClaimOutcome: TypeAlias = Literal["run", "skip", "dead_letter"]


@dataclass(frozen=True, slots=True)
class Claim:
    """What a task starting ``stage`` of a job may do: run it, or drop its message (and why)."""

    outcome: ClaimOutcome
    reason: str
    job: Job | None


def _event(row: JobRow, *, worker: str, message: str, user: str | None = None,
           when: datetime | None = None) -> EventRow:
    return EventRow(job_id=row.id, time=when or utcnow(), worker=worker, user=user or row.user,
                    state=row.state, stage=row.stage, message=message)


def _older(value: datetime | None, than: datetime) -> bool:
    return value is None or value < than


class Ledger:
    """Operations on one ledger database; cheap to create (engines are cached per process)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = ledger_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        try:
            with self._sessions() as session, session.begin():
                yield session
        except SQLAlchemyError as err:
            raise ServiceError(f"job ledger {redact(self.url)}: {type(err).__name__}: "
                               f"{str(err).splitlines()[0]}") from err

    @staticmethod
    def _locked(session: Session, job_id: str) -> JobRow | None:
        return session.get(JobRow, job_id, with_for_update=True)

    # -- clients -----------------------------------------------------------------------------

    def insert(self, *, job_id: str, key: str, task: str, input: str, input_sha256: str,
               user: str, model: str, params: dict[str, Any], out_dir: str,
               host: str | None = None) -> tuple[Job, bool]:
        """Record a new queued job, or return the existing job with this id (``created`` False)."""
        now = utcnow()
        try:
            return self._insert(job_id=job_id, key=key, task=task, input=input,
                                input_sha256=input_sha256, user=user, model=model, params=params,
                                out_dir=out_dir, host=host, now=now)
        except ServiceError as err:
            if not isinstance(err.__cause__, IntegrityError):
                raise
            # Another client inserted the same job between our read and our write.
            return self.find(job_id), False

    def _insert(self, *, job_id: str, key: str, task: str, input: str, input_sha256: str,
                user: str, model: str, params: dict[str, Any], out_dir: str, host: str | None,
                now: datetime) -> tuple[Job, bool]:
        with self._transaction() as session:
            existing = self._locked(session, job_id)
            if existing is not None:
                return Job.from_row(existing), False
            row = JobRow(id=job_id, key=key, state="queued", stage="prepare", progress=0.0,
                         heartbeat=None, enqueued=now, attempts=0, runner=None, task=task,
                         input=input, input_sha256=input_sha256, user=user, model=model,
                         params=params, artifacts={}, out_dir=out_dir, error=None, created=now,
                         updated=now)
            session.add(row)
            session.flush()
            session.add(_event(row, worker=host or socket.gethostname(), when=now,
                               message=f"submitted: {task} on {input} with {model}"))
            return Job.from_row(row), True

    def find(self, ref: str) -> Job:
        """The job with id ``ref``, or the only one whose id starts with ``ref`` (>= 4 chars).

        Raises:
            JobNotFoundError: no such job. InputError: the prefix matches several jobs.
        """
        ref = ref.strip().lower()
        with self._transaction() as session:
            row = session.get(JobRow, ref)
            if row is None and len(ref) >= 4:
                rows = session.scalars(select(JobRow).where(JobRow.id.startswith(ref))
                                       .limit(2)).all()
                if len(rows) > 1:
                    raise InputError(f"job id prefix {ref!r} matches several jobs; give more of it")
                row = rows[0] if rows else None
            if row is None:
                raise JobNotFoundError(f"no job {ref!r} in the ledger; `hwsi jobs list` shows them")
            return Job.from_row(row)

    def artifacts(self, job_id: str) -> dict[str, Any]:
        """Paths and checksums the stages of a job left for the next ones."""
        with self._transaction() as session:
            row = session.get(JobRow, job_id)
            return dict(row.artifacts) if row is not None else {}

    def list_jobs(self, *, since: datetime | None = None, states: Sequence[str] = (),
             user: str | None = None, limit: int | None = None) -> list[Job]:
        """Jobs created at or after ``since``, in the given states, of ``user``; oldest first."""
        query = select(JobRow).order_by(JobRow.created, JobRow.id)
        if since is not None:
            query = query.where(JobRow.created >= since)
        if states:
            query = query.where(JobRow.state.in_(list(states)))
        if user:
            query = query.where(JobRow.user == user)
        if limit is not None:
            query = query.limit(limit)
        with self._transaction() as session:
            return [Job.from_row(row) for row in session.scalars(query)]

    def events(self, job_id: str) -> list[Event]:
        """Every change of a job, oldest first."""
        with self._transaction() as session:
            rows = session.scalars(select(EventRow).where(EventRow.job_id == job_id)
                                   .order_by(EventRow.time, EventRow.id))
            return [Event(r.job_id, r.time, r.worker, r.user, r.state, r.stage, r.message)
                    for r in rows]

    def outputs(self, job_id: str) -> list[Output]:
        """The files a job registered, in registration order."""
        with self._transaction() as session:
            rows = session.scalars(select(OutputRow).where(OutputRow.job_id == job_id)
                                   .order_by(OutputRow.id))
            return [Output(r.job_id, r.path, r.kind, r.sha256, r.bytes, r.created) for r in rows]

    def cancel(self, job_id: str, *, user: str, host: str | None = None) -> tuple[Job, bool]:
        """Cancel a queued or running job (a running task stops at its next progress call).

        Returns the job and whether this call changed it (False: it had already ended).
        """
        with self._transaction() as session:
            row = self._locked(session, job_id)
            if row is None:
                raise JobNotFoundError(f"no job {job_id!r} in the ledger")
            if row.state not in ACTIVE_STATES:
                return Job.from_row(row), False
            row.state, row.updated = "cancelled", utcnow()
            session.add(_event(row, worker=host or socket.gethostname(), user=user,
                               message=f"cancelled by {user}"))
            return Job.from_row(row), True

    def reset_for_retry(self, job_id: str, *, user: str, host: str | None = None) -> Job:
        """Queue a failed, cancelled or dead-letter job again from ``prepare`` (attempts reset).

        Raises:
            JobError: the job is queued, running or succeeded.
        """
        with self._transaction() as session:
            row = self._locked(session, job_id)
            if row is None:
                raise JobNotFoundError(f"no job {job_id!r} in the ledger")
            if row.state in ACTIVE_STATES:
                raise JobError(f"job {row.id} is {row.state}; only an ended job can be retried")
            if row.state == "succeeded":
                raise JobError(f"job {row.id} succeeded; its results are in {row.out_dir}")
            now = utcnow()
            previous = row.state
            row.state, row.stage, row.progress, row.attempts = "queued", "prepare", 0.0, 0
            row.error, row.runner, row.enqueued, row.updated = None, None, now, now
            session.add(_event(row, worker=host or socket.gethostname(), user=user, when=now,
                               message=f"retry requested by {user} (was {previous})"))
            return Job.from_row(row)

    def prune(self, older_than: datetime) -> int:
        """Delete ended jobs last updated before ``older_than``, with their events and outputs.

        Result files stay where they were written. Returns the number of jobs deleted.
        """
        with self._transaction() as session:
            ids = list(session.scalars(select(JobRow.id).where(
                JobRow.state.in_(sorted(TERMINAL_STATES)), JobRow.updated < older_than)))
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                session.execute(delete(EventRow).where(EventRow.job_id.in_(chunk)))
                session.execute(delete(OutputRow).where(OutputRow.job_id.in_(chunk)))
                session.execute(delete(JobRow).where(JobRow.id.in_(chunk)))
            return len(ids)

    # -- tasks -------------------------------------------------------------------------------

    def claim(self, job_id: str, stage: str, *, runner: str, worker: str, retries: int,
              stale_seconds: float) -> Claim:
        """A task's start: decide whether this delivery runs ``stage``, and count the attempt.

        ``runner`` is the Celery task id of this delivery. The same id again means the message
        came back after its process died (``task_reject_on_worker_lost``); another id with a
        fresh heartbeat is a duplicate and is dropped; a stale heartbeat means the earlier task
        is gone and this one takes over. A start past ``retries`` restarts dead-letters the job.
        """
        now = utcnow()
        with self._transaction() as session:
            row = self._locked(session, job_id)
            if row is None:
                return Claim("skip", "the job is not in the ledger (pruned?)", None)
            if row.state not in ACTIVE_STATES:
                if row.state == "cancelled":
                    session.add(_event(row, worker=worker, message=f"message for {stage} "
                                       "dropped: the job was cancelled"))
                return Claim("skip", f"the job is {row.state}", Job.from_row(row))
            if row.stage != stage:
                return Claim("skip", f"a stale {stage} message; the job is at {row.stage}",
                             Job.from_row(row))
            if row.state == "running":
                fresh = row.heartbeat is not None and \
                    (now - row.heartbeat).total_seconds() < stale_seconds
                if row.runner != runner and fresh:
                    return Claim("skip", f"a duplicate: {stage} is running in {row.runner}",
                                 Job.from_row(row))
                row.attempts += 1
                why = "its message came back" if row.runner == runner else "its heartbeat is stale"
                note = f"{stage} restarted ({why}; the earlier task died)"
            else:
                row.attempts = max(row.attempts, 1)
                note = f"{stage} started"
            if row.attempts > retries + 1:
                row.state, row.updated = "dead_letter", now
                row.error = (f"gave up at stage {stage} after {row.attempts - 1} start(s): the "
                             f"worker died each time (HWSI_TASK_RETRIES={retries})")
                row.runner = None
                session.add(_event(row, worker=worker, when=now, message=row.error))
                return Claim("dead_letter", row.error, Job.from_row(row))
            row.state, row.runner, row.heartbeat, row.progress, row.updated = \
                "running", runner, now, 0.0, now
            session.add(_event(row, worker=worker, when=now,
                               message=f"{note} (attempt {row.attempts})"))
            return Claim("run", note, Job.from_row(row))

    def heartbeat(self, job_id: str, *, runner: str) -> str:
        """Record a sign of life; ``ok``, or why to stop: ``cancelled`` or ``superseded``."""
        return self._touch(job_id, runner=runner, fraction=None)

    def progress(self, job_id: str, *, runner: str, fraction: float) -> str:
        """Record progress; ``ok``, or why to stop: ``cancelled`` or ``superseded``."""
        return self._touch(job_id, runner=runner, fraction=fraction)

    def _touch(self, job_id: str, *, runner: str, fraction: float | None) -> str:
        """The heartbeat (and progress, when given) of the task that owns a running job."""
        with self._transaction() as session:
            row = self._locked(session, job_id)
            if row is None or row.state == "cancelled":
                return "cancelled"
            if row.state != "running" or row.runner != runner:
                return "superseded"
            row.heartbeat = utcnow()
            if fraction is not None:
                row.progress = min(max(fraction, 0.0), 1.0)
            return "ok"

    def _owned(self, session: Session, job_id: str, runner: str) -> JobRow | None:
        row = self._locked(session, job_id)
        if row is None or row.state != "running" or row.runner != runner:
            return None
        return row

    def finish_stage(self, job_id: str, *, runner: str, worker: str, next_stage: str,
                     artifacts: dict[str, Any], message: str) -> bool:
        """Record ``stage`` done and the job queued at ``next_stage``; False if not ours."""
        with self._transaction() as session:
            row = self._owned(session, job_id, runner)
            if row is None:
                return False
            now = utcnow()
            done = row.stage
            row.artifacts = {**row.artifacts, **artifacts}
            row.state, row.stage, row.progress, row.runner = "queued", next_stage, 0.0, None
            row.enqueued, row.updated = now, now
            session.add(EventRow(job_id=row.id, time=now, worker=worker, user=row.user,
                                 state="running", stage=done, message=message))
            return True

    def succeed(self, job_id: str, *, runner: str, worker: str, outputs: Sequence[Output],
                message: str) -> bool:
        """Register the outputs (each path once per job) and mark the job succeeded."""
        with self._transaction() as session:
            row = self._owned(session, job_id, runner)
            if row is None:
                return False
            known = set(session.scalars(select(OutputRow.path).where(OutputRow.job_id == job_id)))
            for item in outputs:
                if item.path not in known:
                    session.add(OutputRow(job_id=job_id, path=item.path, kind=item.kind,
                                          sha256=item.sha256, bytes=item.bytes,
                                          created=item.created))
                    known.add(item.path)
            now = utcnow()
            row.state, row.progress, row.runner, row.updated = "succeeded", 1.0, None, now
            session.add(_event(row, worker=worker, when=now, message=message))
            return True

    def fail(self, job_id: str, *, runner: str, worker: str, error: str) -> bool:
        """Mark the job failed with a one-line error (no retry); False if not ours."""
        with self._transaction() as session:
            row = self._owned(session, job_id, runner)
            if row is None:
                return False
            row.state, row.error, row.runner, row.updated = \
                "failed", " ".join(error.split()), None, utcnow()
            session.add(_event(row, worker=worker, message=f"failed: {row.error}"))
            return True

    def note(self, job_id: str, *, worker: str, message: str) -> None:
        """Add an event without changing the job (a task that stopped, a dropped message)."""
        with self._transaction() as session:
            row = session.get(JobRow, job_id)
            if row is not None:
                session.add(_event(row, worker=worker, message=message))

    # -- reconciler --------------------------------------------------------------------------

    def lost(self, *, stale_seconds: float, requeue_seconds: float) -> list[tuple[str, str]]:
        """``(job id, stage)`` of jobs with no live task that nobody re-enqueued recently.

        Running with a heartbeat older than ``stale_seconds`` (and no re-enqueue since), or
        queued with its message sent more than ``requeue_seconds`` ago.
        """
        now = utcnow()
        stale, old = now - timedelta(seconds=stale_seconds), now - timedelta(seconds=requeue_seconds)
        with self._transaction() as session:
            rows = session.execute(select(JobRow.id, JobRow.stage, JobRow.state, JobRow.heartbeat,
                                          JobRow.enqueued)
                                   .where(JobRow.state.in_(sorted(ACTIVE_STATES)))).all()
        found = []
        for job_id, stage, state, heartbeat, enqueued in rows:
            if state == "running" and _older(heartbeat, stale) and _older(enqueued, stale):
                found.append((job_id, stage))
            elif state == "queued" and _older(enqueued, old):
                found.append((job_id, stage))
        return found

    def mark_requeued(self, job_id: str, stage: str, *, worker: str, stale_seconds: float,
                      requeue_seconds: float) -> bool:
        """Claim the re-enqueue of a lost job (one reconciler wins); True: send its message."""
        now = utcnow()
        with self._transaction() as session:
            row = self._locked(session, job_id)
            if row is None or row.stage != stage:
                return False
            if row.state == "running":
                limit = now - timedelta(seconds=stale_seconds)
                if not (_older(row.heartbeat, limit) and _older(row.enqueued, limit)):
                    return False
                why = f"no heartbeat for {stale_seconds:g} s"
            elif row.state == "queued":
                if not _older(row.enqueued, now - timedelta(seconds=requeue_seconds)):
                    return False
                why = f"no worker started it in {requeue_seconds:g} s"
            else:
                return False
            row.enqueued = now
            session.add(_event(row, worker=worker, when=now,
                               message=f"re-enqueued {stage} by the reconciler ({why})"))
            return True
