"""Stages, their task names and queues: one table that the app, tasks, client and reconciler share.

A slide's analysis is the chain ``prepare`` (``cpu``: open, MPP, tissue, grid, checksum) ->
``features`` (``gpu``: encoders, selection, nuclei; the built-in encoders run on CPU, so a
model on them may route this stage to ``cpu``) -> ``infer`` (``gpu``: model, evidence) ->
``write`` (``io``: result files, sinks, outputs). Each task, once its stage is recorded done in
the ledger, sends the next stage's message itself; so a cancelled or superseded stage ends the
chain, and the reconciler can restart a job at the stage where it stopped.
"""

from __future__ import annotations

from typing import Any, Final, Literal, TypeAlias

__all__ = ["QUEUES", "STAGES", "Queue", "Stage", "next_stage", "queue_for", "route_task",
           "task_name"]

Stage: TypeAlias = Literal["prepare", "features", "infer", "write"]
Queue: TypeAlias = Literal["cpu", "gpu", "io"]

STAGES: Final[tuple[Stage, ...]] = ("prepare", "features", "infer", "write")
QUEUES: Final[tuple[Queue, ...]] = ("cpu", "gpu", "io")

_QUEUE: Final[dict[Stage, Queue]] = {"prepare": "cpu", "features": "gpu", "infer": "gpu",
                                     "write": "io"}
_BUILTIN_ENCODERS: Final[frozenset[str]] = frozenset({"hed_texture", "layout"})


def task_name(stage: Stage) -> str:
    """The registered Celery task name of a stage (``hwsi.<stage>``)."""
    return f"hwsi.{stage}"


def queue_for(stage: Stage, *, encoders: tuple[str, ...] = ()) -> Queue:
    """The queue a stage runs on; ``features`` with only built-in encoders runs on ``cpu``."""
    if stage == "features" and encoders and set(encoders) <= _BUILTIN_ENCODERS:
        return "cpu"
    return _QUEUE[stage]


def next_stage(stage: Stage) -> Stage | None:
    """The stage after ``stage``, or None after ``write``."""
    index = STAGES.index(stage)
    return STAGES[index + 1] if index + 1 < len(STAGES) else None


def route_task(name: str, args: Any, kwargs: Any, options: Any, task: Any = None,
               **extra: Any) -> dict[str, str] | None:
    """Celery ``task_routes`` function: a stage task goes to its stage's default queue.

    A sender that names a queue (the client and tasks always do) wins over this default.
    """
    for stage in STAGES:
        if name == task_name(stage):
            return {"queue": _QUEUE[stage]}
    return None
