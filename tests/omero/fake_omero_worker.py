"""``hwsi worker`` whose OMERO is the in-process fake: an OMERO job end to end on a real worker.

The worker is the unchanged CLI (prefork pool, broker, ledger, the four stages); only
:func:`omero_hwsi.omero.stages.omero_connection` is replaced, before the pool forks, by one
that opens a session of the fake server built here exactly as the test builds it (same ids,
same files, same database UUID). After each session the fake's ROIs, annotations and links are
written to ``HWSI_TEST_FAKE_STATE`` (JSON), which is how the test sees what the worker wrote.
Run as ``python fake_omero_worker.py worker OPTIONS`` with ``HWSI_TEST_FAKE_SLIDE`` set.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fake_gateway import FakeGateway, FakeImage

SLIDE_NAME = "CMU-1-Small-Region.svs"


def build_server(slide: Path) -> tuple[FakeGateway, FakeImage]:
    """The fake server of the test: user ana, one imported slide (pyramid, label, macro)."""
    gw = FakeGateway("hwsi-service", privileges=("Sudo",))
    gw.add_user("ana")
    image, _ = gw.add_slide(slide, SLIDE_NAME, size=(2220, 2967))
    return gw, image


def _text(value: Any) -> str | None:
    return None if value is None else str(value.getValue())


def server_state(gw: FakeGateway) -> dict[str, Any]:
    """What was written: ROIs (description, shape count), annotations (kind, ns, description,
    file name), links (parent kind, parent id, annotation id)."""
    rois = [{"id": i, "image": roi.getImage().getId().getValue(),
             "description": _text(roi.getDescription()), "shapes": len(roi.copyShapes())}
            for i, roi in gw.rois.items()]
    annotations = []
    for i, ann in gw.annotations.items():
        item = {"id": i, "kind": type(ann).__name__.removesuffix("I"), "ns": _text(ann.getNs()),
                "description": _text(ann.getDescription())}
        if hasattr(ann, "getFile") and ann.getFile() is not None:
            item["name"] = _text(ann.getFile().getName())
        annotations.append(item)
    return {"rois": rois, "annotations": annotations, "links": [list(x) for x in gw.links]}


if __name__ == "__main__":
    from omero_hwsi._io import write_json_atomic
    from omero_hwsi.omero import stages
    from omero_hwsi.settings import Settings

    server, _ = build_server(Path(os.environ["HWSI_TEST_FAKE_SLIDE"]))
    state = Path(os.environ["HWSI_TEST_FAKE_STATE"])

    @contextmanager
    def fake_connection(settings: Settings, *, user: str | None = None,
                        group: str | None = None, job_id: str | None = None,
                        end_session: bool = False) -> Iterator[Any]:
        session = server.suConn(user or "", group=group, ttl=settings.max_task_seconds * 1000)
        if session is None:
            raise RuntimeError(f"the fake server has no user {user!r}")
        try:
            yield session
        finally:
            session.close()
            write_json_atomic(state, server_state(server))

    stages.omero_connection = fake_connection  # looked up at call time by the stages
    from omero_hwsi.cli import main

    sys.argv = ["hwsi", *sys.argv[1:]]
    main()
