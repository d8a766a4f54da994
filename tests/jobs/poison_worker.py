"""``hwsi worker`` whose ``prepare`` stage kills its own process: a slide that crashes its worker.

No real input crashes a worker deterministically (a decoder bug on a corrupt file would), and
the package carries no test hooks, so this wrapper replaces the stage's pipeline call before
the worker starts and then runs the unchanged CLI. The pool processes it forks inherit the
replacement; everything else (the claim, the restart count, the dead letter, the
acknowledgement) is the real worker's. Run as ``python poison_worker.py worker OPTIONS``.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from omero_hwsi.jobs import tasks


def _crash(ctx: Any, payload: dict[str, Any]) -> None:
    """Die the way a native crash does: SIGKILL, no Python cleanup, nothing written anywhere."""
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    tasks._prepare = _crash  # looked up when the task runs, so the pool processes see it
    from omero_hwsi.cli import main

    sys.argv = ["hwsi", *sys.argv[1:]]
    main()
