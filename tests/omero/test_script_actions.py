"""What the OMERO scripts do, against the fake server and a real embedded ledger and broker."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from fake_gateway import FakeGateway, FakeImage
from sqlalchemy import create_engine, text

pytest.importorskip("omero.model", reason="the omero extra (make setup-omero)")

from omero_hwsi.errors import InputError  # noqa: E402
from omero_hwsi.jobs.client import cancel, list_jobs  # noqa: E402
from omero_hwsi.omero.images import resolve_images  # noqa: E402
from omero_hwsi.omero.rois import regions_digest  # noqa: E402
from omero_hwsi.omero.script_actions import (  # noqa: E402
    INDEX_COLUMNS,
    attach_index,
    job_status,
    report_index,
    run_analysis,
    script_error,
)
from omero_hwsi.omero.writeback import WriteBack, write_back  # noqa: E402

CMU = "CMU-1-Small-Region.svs"
REPORT = {"Data_Type": "Image", "Task": "report", "Evidence_Depth": "region", "Write_ROIs": True,
          "Restrict_To_ROIs": False}


@pytest.fixture
def server(fixture_slide) -> FakeGateway:
    """A server with ana and bo, reached as the service account (Sudo)."""
    gw = FakeGateway("hwsi-service", privileges=("Sudo",))
    gw.add_user("ana")
    gw.add_user("bo")
    return gw


def _as(server: FakeGateway, user: str) -> FakeGateway:
    """The connection a script gets: the session of the user who runs it."""
    session = server.suConn(user)
    assert session is not None
    return session


def _slides(server: FakeGateway, source: Path, names: list[str]) -> list[FakeImage]:
    return [server.add_slide(source, name, size=(2220, 2967))[0] for name in names]


def _broker_messages(settings) -> int:
    engine = create_engine(f"sqlite:///{settings.data_dir / 'broker.sqlite'}")
    with engine.connect() as connection:
        count = connection.execute(text("SELECT count(*) FROM kombu_message")).scalar_one()
    engine.dispose()
    return int(count)


def test_run_analysis_queues_one_job_per_pyramid_and_is_idempotent(server, fixture_slide,
                                                                   omero_settings):
    a, b = _slides(server, fixture_slide(CMU), ["a.svs", "b.svs"])
    macro = a.fileset.images[2]
    dataset = server.add_dataset("cohort", [a, macro, b])
    ana = _as(server, "ana")
    inputs = {**REPORT, "Data_Type": "Dataset", "IDs": [dataset.id]}

    outcome = run_analysis(ana, inputs, settings=omero_settings)
    assert len(outcome.job_ids) == 2 and len(set(outcome.job_ids)) == 2
    jobs = {job.id: job for job in list_jobs(settings=omero_settings)}
    assert set(jobs) == set(outcome.job_ids)
    assert {job.input for job in jobs.values()} == {f"omero:image/{a.id}", f"omero:image/{b.id}"}
    assert {(job.user, job.task, job.state) for job in jobs.values()} == {
        ("ana", "report", "queued")}
    lines = outcome.message.splitlines()
    assert lines[0].startswith("Queued 2 analyses (2 new, 0 already known)")
    assert "Research use only." in lines[0]
    assert f"a.svs: job {outcome.job_ids[0]} (queued)" in lines
    assert f"skipped Image {macro.id} (a.svs [macro image]): an associated image of a slide, " \
           "not analysed" in lines
    assert _broker_messages(omero_settings) == 2

    again = run_analysis(ana, inputs, settings=omero_settings)
    assert again.job_ids == outcome.job_ids
    assert again.message.startswith("Queued 2 analyses (0 new, 2 already known)")
    assert _broker_messages(omero_settings) == 2  # nothing queued twice


def _rectangle(image_id: int):
    from omero.model import ImageI, RectangleI, RoiI
    from omero.rtypes import rdouble

    roi = RoiI()
    roi.setImage(ImageI(image_id, False))
    shape = RectangleI()
    for name, value in zip(("X", "Y", "Width", "Height"), (100.0, 100.0, 800.0, 600.0)):
        getattr(shape, f"set{name}")(rdouble(value))
    roi.addShape(shape)
    return roi


def test_the_job_records_the_omero_image_and_no_credentials(server, fixture_slide,
                                                            omero_settings):
    (image,) = _slides(server, fixture_slide(CMU), [CMU])
    ana = _as(server, "ana")
    server.add_roi(_rectangle(image.id), owner="ana")
    outcome = run_analysis(ana, {**REPORT, "IDs": [image.id], "Write_ROIs": False,
                                 "Restrict_To_ROIs": True}, settings=omero_settings)
    (job,) = list_jobs(settings=omero_settings)
    assert outcome.job_ids == [job.id]
    resolved = resolve_images(ana, "Image", [image.id]).images[0]
    assert job.params["omero"] == {
        "server": server.db_uuid, "image": image.id, "name": CMU, "group": "lab",
        "files_sha256": resolved.files_sha256, "route": "download", "write_rois": False,
        "restrict_to_rois": True, "rois_sha256": regions_digest(ana, image.id)}
    # Writing the ROIs or not is part of what the job does: another job.
    again = run_analysis(ana, {**REPORT, "IDs": [image.id], "Write_ROIs": True,
                               "Restrict_To_ROIs": True}, settings=omero_settings)
    assert again.job_ids != outcome.job_ids
    assert job.params["slide"] is None and job.params["evidence"] == "region"
    recorded = json.dumps(job.params) + job.key + json.dumps(job.out_dir)
    assert "s3cret" not in recorded and "password" not in recorded.lower()
    assert "hwsi-service" not in recorded and "ana" not in job.key


def test_images_the_user_may_not_annotate_are_skipped_with_a_reason(server, fixture_slide,
                                                                    omero_settings):
    mine, theirs = _slides(server, fixture_slide(CMU), ["mine.svs", "theirs.svs"])
    theirs.can_annotate = False
    ana = _as(server, "ana")
    outcome = run_analysis(ana, {**REPORT, "IDs": [mine.id, theirs.id]},
                           settings=omero_settings)
    assert len(outcome.job_ids) == 1
    assert outcome.skipped[-1] == (f"Image {theirs.id} (theirs.svs): you may not annotate it, "
                                   "so its results could not be written back")
    with pytest.raises(InputError, match="nothing to analyse: .*you may not annotate it"):
        run_analysis(ana, {**REPORT, "IDs": [theirs.id]}, settings=omero_settings)
    with pytest.raises(InputError, match="nothing to analyse: Image 31337: not found"):
        run_analysis(ana, {**REPORT, "IDs": [31337]}, settings=omero_settings)


@pytest.mark.parametrize(("changes", "message"), [
    ({"Task": "vqa"}, "Task vqa needs a Question"),
    ({"Task": "vqa", "Question": "   "}, "Task vqa needs a Question"),
    ({"Task": "classify", "Labels": "tumour, "}, "Task classify needs at least two "
                                                 "comma-separated Labels"),
    ({"Task": "retrieve"}, "Task must be one of report, vqa, caption, classify, got 'retrieve'"),
    ({"Task": "segment"}, "Task must be one of report, vqa, caption, classify, got 'segment'"),
    ({"Evidence_Depth": "deep"}, "Evidence_Depth must be one of none, region, patch, cell, "
                                 "got 'deep'"),
    ({"Data_Type": "Plate"}, "Data_Type must be one of Image, Dataset, Project, got 'Plate'"),
])
def test_bad_forms_are_refused_in_one_line_before_anything_is_queued(
        server, fixture_slide, omero_settings, changes, message):
    (image,) = _slides(server, fixture_slide(CMU), [CMU])
    with pytest.raises(InputError) as err:
        run_analysis(_as(server, "ana"), {**REPORT, "IDs": [image.id], **changes},
                     settings=omero_settings)
    assert str(err.value) == message
    assert script_error(err.value) == f"Error: {message}"
    assert list_jobs(settings=omero_settings) == []


def test_job_status_lists_only_the_users_jobs(server, fixture_slide, omero_settings):
    first, second, bos = _slides(server, fixture_slide(CMU), ["1.svs", "2.svs", "3.svs"])
    ana, bo = _as(server, "ana"), _as(server, "bo")
    mine = run_analysis(ana, {**REPORT, "IDs": [first.id, second.id]}, settings=omero_settings)
    run_analysis(bo, {**REPORT, "IDs": [bos.id]}, settings=omero_settings)
    cancel(mine.job_ids[0], settings=omero_settings, user="ana")

    status = job_status(ana, {"Since": "1h"}, settings=omero_settings)
    assert status.job_ids == mine.job_ids[::-1]  # newest first
    head, *lines = status.message.splitlines()
    assert head.startswith("2 job(s) of ana since ")
    assert f"omero:image/{bos.id}" not in status.message
    assert [line.split()[1] for line in lines] == ["queued", "cancelled"]
    queued = job_status(ana, {"Since": "7d", "State": "queued"}, settings=omero_settings)
    assert queued.job_ids == [mine.job_ids[1]] and "in state queued" in queued.message
    with pytest.raises(InputError, match="State must be one of"):
        job_status(ana, {"State": "done"}, settings=omero_settings)


def test_report_index_joins_written_provenance_and_the_ledger(server, fixture_slide,
                                                              omero_settings, analysis_result,
                                                              tmp_path):
    done, waiting, other = _slides(server, fixture_slide(CMU), ["done.svs", "waiting.svs",
                                                                "other.svs"])
    project = server.add_project("study", [server.add_dataset("d1", [done]),
                                           server.add_dataset("d2", [waiting, done])])
    ana = _as(server, "ana")
    jobs = run_analysis(ana, {**REPORT, "IDs": [done.id, waiting.id, other.id]},
                        settings=omero_settings).job_ids
    job = next(j for j in list_jobs(settings=omero_settings) if j.id == jobs[0])
    written = write_back(ana, WriteBack(
        image_id=done.id, job_id=job.id, result_dir=analysis_result, user="ana", model=job.model,
        model_sha256=job.params["model"]["sha256"], input_sha256=job.params["omero"]["files_sha256"],
        evidence_depth="region"))

    index = report_index(ana, {"Data_Type": "Project", "IDs": [project.id]},
                         settings=omero_settings)
    rows = list(csv.reader(io.StringIO(index.csv_text)))
    assert tuple(rows[0]) == INDEX_COLUMNS
    by_job = {row[8]: dict(zip(INDEX_COLUMNS, row)) for row in rows[1:]}
    assert set(by_job) == {jobs[0], jobs[1]}  # other.svs is not in the project
    answer = json.loads((analysis_result / "result.json").read_text())["answer"]
    assert by_job[jobs[0]] == {
        **by_job[jobs[0]], "image_id": str(done.id), "image_name": "done.svs",
        "state": "succeeded", "task": "report", "model": job.model, "requested_by": "ana",
        "link": f"https://omero.lab/webclient/?show=image-{done.id}"}
    assert answer.startswith(by_job[jobs[0]]["answer"].rstrip("\u2026"))
    assert by_job[jobs[1]]["state"] == "queued" and by_job[jobs[1]]["image_name"] == "waiting.svs"
    assert index.rows == 2 and index.images == 2
    assert index.message == "2 analyses of 2 image(s) in Project " + str(project.id)

    # Another OMERO server sharing the ledger has its own image with the same id.
    elsewhere = FakeGateway("ana")
    elsewhere.db_uuid = "another-server"
    twin = elsewhere.add_slide(fixture_slide(CMU), "twin.svs", size=(2220, 2967))[0]
    twin.id = waiting.id
    elsewhere.images = {twin.id: twin}
    run_analysis(elsewhere, {**REPORT, "IDs": [twin.id]}, settings=omero_settings)
    assert report_index(ana, {"Data_Type": "Project", "IDs": [project.id]},
                        settings=omero_settings).csv_text == index.csv_text

    group = report_index(ana, {"Whole_Group": True}, settings=omero_settings)
    assert [row[8] for row in csv.reader(io.StringIO(group.csv_text))][1:] == [jobs[0]]
    assert written.provenance is not None

    annotation = attach_index(ana, index, target=("Project", project.id), folder=tmp_path)
    assert annotation.getFile().getMimetype() == "text/csv"
    assert annotation.getFileName().startswith(f"hwsi-report-index-project-{project.id}-")
    assert server.file_bytes[annotation.getId()] == index.csv_text.encode()
    assert ("Project", project.id, annotation.getId()) in server.links


def test_report_index_needs_a_selection(server, omero_settings):
    with pytest.raises(InputError, match="select a Project or Dataset"):
        report_index(_as(server, "ana"), {"Data_Type": "Project"}, settings=omero_settings)
    with pytest.raises(InputError, match="Project 77: not found"):
        report_index(_as(server, "ana"), {"Data_Type": "Project", "IDs": [77]},
                     settings=omero_settings)


class _ScriptClient:
    """What a script's ``omero.scripts.client`` offers the run: inputs, outputs, closing."""

    def __init__(self, inputs: dict) -> None:
        self.inputs, self.outputs, self.closed = inputs, {}, False

    def getInputs(self, unwrap: bool = False) -> dict:
        assert unwrap
        return self.inputs

    def setOutput(self, name: str, value) -> None:
        self.outputs[name] = value

    def closeSession(self) -> None:
        self.closed = True


def test_the_scripts_run_their_action_as_the_user_and_report_errors_in_one_line(
        server, fixture_slide, omero_settings, monkeypatch):
    import omero.gateway
    from omero.model import FileAnnotationI

    from omero_hwsi.omero.scripting import run_script

    (image,) = _slides(server, fixture_slide(CMU), [CMU])
    project = server.add_project("study", [server.add_dataset("cohort", [image])])
    monkeypatch.setattr(omero.gateway, "BlitzGateway",
                        lambda client_obj: _as(server, "ana"))
    client = _ScriptClient({**REPORT, "IDs": [image.id]})
    run_script(client, "run_analysis")
    (job,) = list_jobs(settings=omero_settings)
    assert client.closed and client.outputs["Job_IDs"].getValue() == job.id
    assert client.outputs["Message"].getValue().startswith("Queued 1 analysis (1 new, ")

    bad = _ScriptClient({**REPORT, "IDs": [image.id], "Task": "vqa"})
    run_script(bad, "run_analysis")
    assert bad.closed and set(bad.outputs) == {"Message"}
    assert bad.outputs["Message"].getValue() == "Error: Task vqa needs a Question"

    index = _ScriptClient({"Data_Type": "Project", "IDs": [project.id], "Whole_Group": False})
    run_script(index, "report_index_script")
    annotation = index.outputs["File_Annotation"].getValue()
    assert isinstance(annotation, FileAnnotationI)
    assert index.outputs["Message"].getValue().startswith("1 analysis of 1 image(s)")
