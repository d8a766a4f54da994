"""The Celery app, built from the settings: one place that decides every Celery option.

- JSON only (``accept_content``): a shared broker never unpickles what someone else put there.
- Long GPU tasks: ``task_acks_late`` (a message is acknowledged when its task ends, so a killed
  worker's task is delivered again), ``task_reject_on_worker_lost`` (a killed pool process
  requeues its message at once; the ledger's attempt cap stops a poison task looping),
  ``worker_prefetch_multiplier = 1`` (a busy worker holds no one else's work).
- Time: ``HWSI_MAX_TASK_SECONDS`` is the soft limit (the task records a one-line failure), the
  hard limit is a little later (the pool process is killed), and Redis's ``visibility_timeout``
  later still, so Redis never hands a running task to a second worker. Every Redis worker looks
  for such expired messages every ``unacked_restore_interval`` (10 s): kombu's default scans on
  one call in ten only, which would leave a killed worker's message waiting up to 100 s past its
  timeout. Time limits need the prefork pool, which ``hwsi worker`` always uses. RabbitMQ has
  its own ``consumer_timeout`` (30 min by default, a server setting): raise it above the hard
  limit (``workers.md``).
- Queues ``cpu``, ``gpu`` and ``io`` (:mod:`omero_hwsi.jobs.routing`).
- No ``HWSI_BROKER_URL``: the embedded single-machine transport, kombu's SQLAlchemy transport on
  SQLite (``<data_dir>/broker.sqlite``). It needs no server and is safe with several worker
  processes (each fetch is one ``BEGIN IMMEDIATE`` transaction), but it cannot broadcast
  (remote control, gossip and mingle are off) and forgets a message whose whole worker was
  killed; the reconciler re-sends those from the ledger.

Flower and the ``celery`` command can use ``celery -A omero_hwsi.jobs.app ...``: the module's
``app`` attribute is built from the settings on first access.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from celery import Celery
from kombu.entity import Exchange, Queue

from omero_hwsi.jobs._db import ensure_broker_tables, sqlite_transport_options
from omero_hwsi.jobs.routing import QUEUES, Stage, queue_for, route_task, task_name
from omero_hwsi.settings import Settings, load_settings

__all__ = ["create_app", "is_embedded", "send_stage", "time_limits"]

logger = logging.getLogger(__name__)

RABBITMQ_DEFAULT_CONSUMER_TIMEOUT_S = 1800
"""RabbitMQ's default ``consumer_timeout`` (30 min); longer tasks need it raised on the server."""


def is_embedded(settings: Settings) -> bool:
    """Whether the jobs use the embedded SQLite transport (no ``HWSI_BROKER_URL``)."""
    return not settings.broker_url


def time_limits(settings: Settings) -> tuple[int, int, int]:
    """``(soft, hard, visibility)`` seconds derived from ``HWSI_MAX_TASK_SECONDS``.

    The hard limit leaves the task 5 % (at least 10 s) after the soft one to record its
    failure; the Redis visibility timeout adds as much again on top of the hard limit, so a
    message is only handed out again once its task is certainly gone.
    """
    soft = settings.max_task_seconds
    grace = max(10, math.ceil(0.05 * soft))
    return soft, soft + grace, soft + 2 * grace


def _transport_options(settings: Settings) -> dict[str, Any]:
    broker = settings.broker
    if broker.startswith(("sqla+", "sqlalchemy+")):
        return sqlite_transport_options() if "sqlite" in broker.split("://", 1)[0] else {}
    if broker.startswith(("redis://", "rediss://", "redis+socket://")):
        return {"visibility_timeout": time_limits(settings)[2], "unacked_restore_interval": 10,
                "unacked_restore_throttle": 1}
    return {}


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery options (see the module docstring for why each one)."""
    soft, hard, _ = time_limits(settings)
    backend = settings.result_backend or None
    embedded = is_embedded(settings)
    return {
        "broker_url": settings.broker,
        "result_backend": backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_queues": [Queue(name, Exchange(name, type="direct"), routing_key=name)
                        for name in QUEUES],
        "task_default_queue": "cpu",
        "task_create_missing_queues": False,
        "task_routes": (route_task,),
        "task_soft_time_limit": soft,
        "task_time_limit": hard,
        "task_ignore_result": backend is None,
        "task_track_started": backend is not None,
        "broker_transport_options": _transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "worker_enable_remote_control": not embedded,
        "worker_hijack_root_logger": True,
        "enable_utc": True,
        "timezone": "UTC",
    }


def create_app(settings: Settings | None = None, *, worker: bool = False) -> Celery:
    """A Celery app for these settings; the embedded broker's file is created (once) here.

    ``worker=True`` adds the reconciler bootstep (``hwsi worker``).
    """
    settings = settings or load_settings()
    if is_embedded(settings):
        ensure_broker_tables(settings.broker, QUEUES)
    app = Celery("omero_hwsi", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.conf.include = ["omero_hwsi.jobs.tasks"]
    if worker:
        from omero_hwsi.jobs.reconcile import ReconcilerStep

        app.steps["worker"].add(ReconcilerStep)
    if settings.broker.startswith("amqp") and time_limits(settings)[1] > \
            RABBITMQ_DEFAULT_CONSUMER_TIMEOUT_S:
        logger.info("RabbitMQ: tasks may run %d s; make sure the server's consumer_timeout is "
                    "larger (default 30 min, see docs/workers.md)", time_limits(settings)[1])
    return app


def send_stage(app: Celery, job_id: str, stage: Stage, *, artifacts: dict[str, Any],
               params: dict[str, Any]) -> str:
    """Send the message of one stage of a job to its queue; returns the Celery task id.

    The payload is JSON of ids, paths and checksums only (``job_id``, ``stage`` and the
    artifacts the earlier stages recorded: store path, staged result path); the task reads the
    job's parameters from the ledger.
    """
    queue = queue_for(stage, encoders=tuple(params.get("encoders", ())))
    payload = {**artifacts, "job_id": job_id, "stage": stage}
    with app.producer_or_acquire() as producer:
        result = app.send_task(task_name(stage), args=[payload], queue=queue, routing_key=queue,
                               producer=producer)
    return str(result.id)


def __getattr__(name: str) -> Any:
    """``app``: built from the settings on first use (for ``celery -A omero_hwsi.jobs.app``)."""
    if name == "app":
        value = create_app()
        globals()["app"] = value
        return value
    raise AttributeError(name)
