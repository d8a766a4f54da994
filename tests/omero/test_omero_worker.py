"""An OMERO job from the Run_Analysis script to the write-back, through a real ``hwsi worker``.

The script's action queues the job against the fake server; a worker subprocess whose OMERO is
the same fake (``fake_omero_worker.py``) pulls the slide, runs the four stages on the embedded
broker and ledger, and writes back; the fake's state file shows what reached the "server".
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("omero.model", reason="the omero extra (make setup-omero)")

from fake_omero_worker import SLIDE_NAME, build_server  # noqa: E402

from omero_hwsi.jobs.client import outputs, status  # noqa: E402
from omero_hwsi.jobs.ledger import TERMINAL_STATES  # noqa: E402
from omero_hwsi.omero.annotations import (  # noqa: E402
    NS_ANALYSIS,
    NS_EVIDENCE,
    NS_REPORT,
    job_marker,
    roi_marker,
)
from omero_hwsi.omero.script_actions import run_analysis  # noqa: E402

WRAPPER = Path(__file__).with_name("fake_omero_worker.py")


@pytest.mark.slow
def test_an_omero_job_runs_on_a_real_worker_and_writes_back_as_the_user(
        fixture_slide, omero_settings, workers, tmp_path):
    slide = fixture_slide(SLIDE_NAME)
    server, image = build_server(slide)
    script = server.suConn("ana")
    outcome = run_analysis(script, {"Data_Type": "Image", "IDs": [image.id], "Task": "report",
                                    "Evidence_Depth": "region"}, settings=omero_settings)
    (job_id,) = outcome.job_ids
    state = tmp_path / "fake-omero-state.json"
    env = {**os.environ, "HWSI_HEARTBEAT_SECONDS": "1", "HWSI_TEST_FAKE_SLIDE": str(slide),
           "HWSI_TEST_FAKE_STATE": str(state), "HWSI_LOG_LEVEL": "INFO"}
    workers.start(env, queues="cpu,gpu,io", name="omero", program=(str(WRAPPER),))
    deadline = time.monotonic() + 400
    while status(job_id, settings=omero_settings).state not in TERMINAL_STATES:
        assert time.monotonic() < deadline, "the OMERO job did not end in time"
        time.sleep(1)
    job = status(job_id, settings=omero_settings)
    assert (job.state, job.error) == ("succeeded", None)

    written = json.loads(state.read_text())
    rois = [r for r in written["rois"] if r["description"] == roi_marker(job_id)]
    assert rois and all(r["image"] == image.id and r["shapes"] >= 1 for r in rois)
    ours = [a for a in written["annotations"] if a["description"] == job_marker(job_id)]
    assert sorted((a["ns"], a.get("name")) for a in ours) == sorted([
        (NS_EVIDENCE, f"hwsi-{image.id}-{job_id[:8]}-evidence.geojson"),
        (NS_REPORT, f"hwsi-{image.id}-{job_id[:8]}-report.md"),
        (NS_REPORT, f"hwsi-{image.id}-{job_id[:8]}-report.html"),
        (NS_ANALYSIS, None)])
    linked = {ann for kind, parent, ann in written["links"] if kind == "Image"
              and parent == image.id}
    assert {a["id"] for a in ours} <= linked
    # The ledger lists the local result files and every OMERO object, once each.
    paths = [o.path for o in outputs(job_id, settings=omero_settings)]
    assert len(paths) == len(set(paths))
    omero_uris = [p for p in paths if p.startswith(f"omero://{server.db_uuid}/")]
    assert len(omero_uris) == len(rois) + 4
    assert (Path(job.out_dir) / "result.json").is_file()


def test_hwsi_jobs_submit_takes_omero_sources_as_the_user(fixture_slide, omero_settings,
                                                          monkeypatch):
    from collections.abc import Iterator
    from contextlib import contextmanager
    from typing import Any

    from typer.testing import CliRunner

    from omero_hwsi.cli import app
    from omero_hwsi.omero import connect

    server, image = build_server(fixture_slide(SLIDE_NAME))
    dataset = server.add_dataset("cohort", [image])
    acted_as: list[str | None] = []

    @contextmanager
    def fake_connection(settings: Any, *, user: str | None = None,
                        group: str | None = None) -> Iterator[Any]:
        acted_as.append(user)
        session = server.suConn(user or "", group=group)
        assert session is not None
        yield session

    monkeypatch.setattr(connect, "omero_connection", fake_connection)
    runner = CliRunner()
    args = ["jobs", "submit", f"omero:dataset/{dataset.id}", f"omero:image/{image.id + 1}",
            "--task", "report", "--evidence", "region", "--user", "ana"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    (job_id,) = first.stdout.split()
    assert acted_as == ["ana"]
    assert "skipped Image" in first.stderr and "associated image" in first.stderr
    job = status(job_id, settings=omero_settings)
    assert (job.input, job.user, job.params["omero"]["image"]) == \
        (f"omero:image/{image.id}", "ana", image.id)
    assert runner.invoke(app, args).stdout.split() == [job_id]  # the same job again
    bad = runner.invoke(app, ["jobs", "submit", "omero:slide/3"])
    assert bad.exit_code == 2 and "omero:image/ID" in bad.stderr
    local = runner.invoke(app, ["analyze", f"omero:image/{image.id}", "--out", "x"])
    assert local.exit_code == 2 and "hwsi jobs submit" in local.stderr
