"""The reconciler: what guarantees that no job is lost, whatever the broker forgets.

Every worker runs it at start and then every ``HWSI_RECONCILE_SECONDS`` (a bootstep owning a
daemon thread in the worker's main process). It asks the ledger for jobs with no live task:
running with a heartbeat older than ``HWSI_STALE_SECONDS`` (the task's process or machine died,
or the embedded transport dropped the message of a killed worker), or queued with a message
sent more than ``HWSI_REQUEUE_SECONDS`` ago (a broker restarted without its data). For each,
one reconciler wins the ledger's compare-and-set (:meth:`Ledger.mark_requeued`) and sends the
stage's message again, with the artifacts recorded so far. A duplicate that meets a live task
is dropped at claim; a restart counts as an attempt, so a job that kills its worker ends in
``dead_letter`` instead of looping.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, bootsteps

from omero_hwsi.errors import HwsiError
from omero_hwsi.jobs.app import send_stage
from omero_hwsi.jobs.ledger import Ledger
from omero_hwsi.settings import Settings, load_settings

__all__ = ["ReconcilerStep", "reconcile"]

logger = logging.getLogger(__name__)


def reconcile(app: Celery, settings: Settings, *, worker: str) -> list[str]:
    """Re-enqueue the stage of every job with no live task; returns the job ids re-sent."""
    ledger = Ledger(settings.ledger_url)
    sent: list[str] = []
    for job_id, stage in ledger.lost(stale_seconds=settings.stale_seconds,
                                     requeue_seconds=settings.requeue_seconds):
        if not ledger.mark_requeued(job_id, stage, worker=worker,
                                    stale_seconds=settings.stale_seconds,
                                    requeue_seconds=settings.requeue_seconds):
            continue
        job = ledger.find(job_id)
        send_stage(app, job_id, stage, artifacts=ledger.artifacts(job_id),  # type: ignore[arg-type]
                   params=job.params)
        logger.warning("job %s: re-enqueued stage %s (no live task)", job_id, stage)
        sent.append(job_id)
    return sent


class ReconcilerStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: the reconciler thread, started with the worker and stopped with it."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        settings = load_settings()

        def loop() -> None:
            while True:
                try:
                    reconcile(worker.app, settings, worker=str(worker.hostname))
                except HwsiError as err:
                    logger.warning("reconciler: %s", err)
                except Exception:  # a bug must not kill the thread that keeps jobs alive
                    logger.exception("reconciler failed; trying again later")
                if self._stop.wait(settings.reconcile_seconds):
                    return

        self._thread = threading.Thread(target=loop, name="hwsi-reconciler", daemon=True)
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
