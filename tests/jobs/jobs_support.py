"""Helpers shared by the job tests (imported by name: tests/jobs is on sys.path)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from typer.testing import CliRunner

from omero_hwsi.cli import app


def wait_for(check: Callable[[], Any], *, timeout: float, what: str, every: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def pool_processes(pid: int) -> list[int]:
    """The pool processes (ForkPoolWorker) of the worker whose main process is ``pid``.

    ``hwsi worker`` starts nothing else under its main process, and tasks extract features in
    their own process, so its children are exactly the prefork pool.
    """
    import psutil

    return [child.pid for child in psutil.Process(pid).children()]


def hwsi(*args: str) -> Any:
    """Run ``hwsi ARGS`` in this process (settings from this process's environment)."""
    return CliRunner().invoke(app, list(args))
