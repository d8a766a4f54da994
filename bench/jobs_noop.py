"""The two workers of bench_jobs.py: our job system with empty stages, and a bare Celery chain.

``python jobs_noop.py ours worker OPTIONS`` runs the real ``hwsi worker`` (the same app, task
protocol, ledger, hand-on through ``send_stage`` and reconciler) with only the four pipeline
calls replaced, before the pool forks, by no-ops that make the ledger writes a real stage makes:
a progress write each, and for ``write`` the five outputs with the success. So a no-op job
costs exactly what the job system adds around the analysis: the client's insert and send, then
per stage the claim, progress, ``finish_stage`` (or ``succeed``) and the next message.

``python jobs_noop.py bare OPTIONS`` runs the reference: a plain Celery app with the same
options (:func:`omero_hwsi.jobs.app.celery_config`) and one task that does nothing, which the
benchmark chains four times over the same queues. Its first and last links record their times
in the broker's Redis, which is how the benchmark reads a chain's start and end.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from omero_hwsi.jobs.app import celery_config
from omero_hwsi.settings import Settings, load_settings

__all__ = ["BARE_ENDS", "BARE_STARTS", "bare_app"]

BARE_STARTS = "bench:bare:starts"
"""Redis hash: chain id -> start time of its first task (``time.time()``)."""
BARE_ENDS = "bench:bare:ends"
"""Redis hash: chain id -> end time of its last task."""


def _ours_noop(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """A stage with nothing to compute: only the progress write a real stage makes."""
    ctx.progress("noop", 1, 1)
    return {}


def _ours_noop_write(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """``write`` without files: progress, then the five outputs registered with the success."""
    from omero_hwsi.jobs.ledger import Output, utcnow
    from omero_hwsi.results.analysis_files import ANALYSIS_FILES

    ctx.progress("write", 1, 1)
    now = utcnow()
    outputs = [Output(ctx.job.id, str(Path(ctx.job.out_dir) / name), Path(name).suffix[1:],
                      "0" * 64, 0, now) for name in ANALYSIS_FILES]
    ctx.ledger.succeed(ctx.job.id, runner=ctx.runner, worker=ctx.worker, outputs=outputs,
                       message="write done (no-op)")
    return {"outputs": len(outputs)}


def bare_app(settings: Settings, *, worker: bool = False) -> Celery:
    """The reference app: our Celery options; ``worker=True`` registers ``bench.noop``.

    The benchmark only sends by name, so its apps carry no task: two reference sides in one
    process would otherwise register the same task name twice.
    """
    app = Celery("hwsi_bench_bare", set_as_current=False)
    app.conf.update(celery_config(settings))
    if worker:
        marks = redis.Redis.from_url(settings.broker)

        @app.task(name="bench.noop")
        def noop(payload: dict[str, Any]) -> None:
            if payload["link"] == "first":
                marks.hset(BARE_STARTS, payload["chain"], time.time())
            elif payload["link"] == "last":
                marks.hset(BARE_ENDS, payload["chain"], time.time())

    return app


def main(argv: list[str]) -> None:
    """``ours worker OPTIONS`` (the hwsi CLI) or ``bare --queues Q --name N`` (Celery)."""
    side, rest = argv[0], argv[1:]
    if side == "ours":
        from omero_hwsi.cli import main as hwsi_main
        from omero_hwsi.jobs import tasks

        tasks._prepare = tasks._features = tasks._infer = _ours_noop
        tasks._write = _ours_noop_write
        sys.argv = ["hwsi", *rest]
        hwsi_main()
    elif side == "bare":
        settings = load_settings()
        queues, name = rest[rest.index("--queues") + 1], rest[rest.index("--name") + 1]
        # The argv `hwsi worker` builds for a Redis broker (omero_hwsi/cli_jobs.py).
        bare_app(settings, worker=True).worker_main(
            ["worker", "--pool", "prefork", "--concurrency", "1", "--queues", queues,
             "--hostname", name, "--loglevel", settings.log_level.upper()])
    else:
        raise SystemExit(f"usage: jobs_noop.py ours worker OPTIONS | bare --queues Q --name N "
                         f"(got {side!r})")


if __name__ == "__main__":
    main(sys.argv[1:])
