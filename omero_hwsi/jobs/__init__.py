"""The job system: a Celery app, stage tasks, routing, the job ledger and a torch-free client.

``hwsi jobs ...`` and OMERO scripts use :mod:`omero_hwsi.jobs.client`; workers run
:mod:`omero_hwsi.jobs.tasks`. The ledger (:mod:`omero_hwsi.jobs.ledger`) is the source of truth
for a job's state, progress, events and outputs; the broker only carries messages. See
``docs/workers.md``. Nothing is imported here: importing a submodule costs only what it needs.
"""

from __future__ import annotations

__all__: list[str] = []
