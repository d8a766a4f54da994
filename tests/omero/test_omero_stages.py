"""The OMERO ends of a job: pull before ``prepare``, write back after ``write`` (fake server).

The job tasks open their connection with :func:`omero_hwsi.omero.connect.omero_connection`;
here it is replaced by a session of the fake server as the job's user, in the image's group,
as the service account would open it with ``suConn``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fake_gateway import FakeGateway, FakeImage

pytest.importorskip("omero.model", reason="the omero extra (make setup-omero)")

import omero_hwsi.omero.stages  # noqa: E402
from omero_hwsi.errors import InputError, OmeroPermissionError  # noqa: E402
from omero_hwsi.jobs.client import list_jobs  # noqa: E402
from omero_hwsi.jobs.ledger import Job  # noqa: E402
from omero_hwsi.omero import connect  # noqa: E402
from omero_hwsi.omero.annotations import roi_marker  # noqa: E402
from omero_hwsi.omero.script_actions import run_analysis  # noqa: E402
from omero_hwsi.omero.stages import OMERO_CACHE, pull_for_job, write_back_for_job  # noqa: E402
from omero_hwsi.settings import Settings  # noqa: E402

CMU = "CMU-1-Small-Region.svs"
RECT = (200.0, 300.0, 1200.0, 1500.0)
"""A user's rectangle ROI: x, y, width, height (level-0 px)."""


@pytest.fixture
def server(fixture_slide, monkeypatch) -> tuple[FakeGateway, FakeImage]:
    """A server with ana's slide, and the stages connected to it through ``suConn``."""
    gw = FakeGateway("hwsi-service", privileges=("Sudo",))
    gw.add_user("ana")
    image, _ = gw.add_slide(fixture_slide(CMU), CMU, size=(2220, 2967))

    @contextmanager
    def fake_connection(settings: Settings, *, user: str | None = None,
                        group: str | None = None, job_id: str | None = None,
                        end_session: bool = False) -> Iterator[FakeGateway]:
        session = gw.suConn(user, group=group, ttl=settings.max_task_seconds * 1000)
        assert session is not None, user
        session.c.enableKeepAlive(connect.KEEPALIVE_SECONDS)
        try:
            yield session
        finally:
            session.close()

    monkeypatch.setattr(omero_hwsi.omero.stages, "omero_connection", fake_connection)
    return gw, image


def _job(gw: FakeGateway, image: FakeImage, settings: Settings, **inputs) -> Job:
    """Queue the image's analysis as ana would from OMERO.web; the recorded job."""
    form = {"Data_Type": "Image", "IDs": [image.id], "Task": "report",
            "Evidence_Depth": "region", **inputs}
    script = gw.suConn("ana")
    (job_id,) = run_analysis(script, form, settings=settings).job_ids
    script.close()
    return next(job for job in list_jobs(settings=settings) if job.id == job_id)


def _rectangle_roi(image_id: int, description: str | None = None):
    from omero.model import ImageI, RectangleI, RoiI
    from omero.rtypes import rdouble, rstring

    roi = RoiI()
    roi.setImage(ImageI(image_id, False))
    if description is not None:
        roi.setDescription(rstring(description))
    shape = RectangleI()
    for name, value in zip(("X", "Y", "Width", "Height"), RECT):
        getattr(shape, f"set{name}")(rdouble(value))
    roi.addShape(shape)
    return roi


def test_pull_downloads_the_slide_as_the_user_in_the_images_group(server, fixture_slide,
                                                                  omero_settings, tmp_path):
    gw, image = server
    job = _job(gw, image, omero_settings)
    assert job.params["omero"]["route"] == "download"
    slide, regions = pull_for_job(omero_settings, job_id=job.id, user=job.user,
                                  params=job.params, staging=tmp_path)
    assert regions is None
    assert slide == omero_settings.data_dir / OMERO_CACHE / str(image.fileset.id) / CMU
    assert slide.read_bytes() == fixture_slide(CMU).read_bytes()
    session = gw.sessions[-1]
    assert (session.user, session.group, session.ttl) == (
        "ana", "lab", omero_settings.max_task_seconds * 1000)
    assert session.closed and not gw.open_stores


def test_a_slide_changed_after_submission_is_refused(server, omero_settings, tmp_path):
    gw, image = server
    job = _job(gw, image, omero_settings)
    image.fileset.files[0].hash = "0" * 40  # replaced on the server since
    with pytest.raises(InputError, match=f"OMERO Image {image.id} .*its files changed after "
                                         "the job was submitted"):
        pull_for_job(omero_settings, job_id=job.id,
                     user=job.user, params=job.params, staging=tmp_path)
    assert not gw.bytes_served


def test_a_user_who_lost_access_gets_a_permission_error(server, omero_settings, tmp_path):
    gw, image = server
    job = _job(gw, image, omero_settings)
    image.can_annotate = False
    with pytest.raises(OmeroPermissionError, match="may not annotate"):
        pull_for_job(omero_settings, job_id=job.id,
                     user=job.user, params=job.params, staging=tmp_path)


def test_restrict_to_rois_reads_the_users_own_rois_as_regions(server, omero_settings,
                                                              tmp_path):
    from omero.rtypes import rdouble

    from qupath_bridge.geojson import read_regions

    gw, image = server
    staging = tmp_path / "jobs" / "j"  # made when needed
    with pytest.raises(InputError, match="no ROI with an area to restrict"):
        _job(gw, image, omero_settings, Restrict_To_ROIs=True)  # refused at submission

    drawn = gw.add_roi(_rectangle_roi(image.id), owner="ana")
    ours = _rectangle_roi(image.id, roi_marker("0ld-j0b"))
    ours.copyShapes()[0].setWidth(rdouble(2000.0))
    gw.add_roi(ours, owner="ana")  # an earlier job's evidence: never an analysis region
    job = _job(gw, image, omero_settings, Restrict_To_ROIs=True)
    assert job.params["omero"]["rois_sha256"]
    _, regions = pull_for_job(omero_settings, job_id=job.id, user=job.user,
                              params=job.params, staging=staging)
    assert regions == staging / "omero-regions.geojson"
    area = read_regions(regions)
    x, y, w, h = RECT
    assert area.area == pytest.approx(w * h)
    assert area.bounds == pytest.approx((x, y, x + w, y + h))

    # ROIs edited after submission: the job would not analyse what its key says.
    gw.rois[drawn].copyShapes()[0].setHeight(rdouble(h / 2))
    with pytest.raises(InputError, match="its ROIs changed after the job was submitted"):
        pull_for_job(omero_settings, job_id=job.id,
                     user=job.user, params=job.params, staging=staging)
    assert _job(gw, image, omero_settings, Restrict_To_ROIs=True).id != job.id
    del gw.rois[drawn]
    with pytest.raises(InputError, match="Restrict_To_ROIs was asked but the image has no ROI"):
        pull_for_job(omero_settings, job_id=job.id,
                     user=job.user, params=job.params, staging=staging)


def test_pull_analyse_and_write_back_end_to_end(server, omero_settings, demo_pipeline,
                                                tmp_path):
    from shapely.geometry import box

    from omero_hwsi.analysis import AnalysisRequest, analyze_slide
    from omero_hwsi.omero.rois import roi_to_geometry

    gw, image = server
    gw.add_roi(_rectangle_roi(image.id), owner="ana")
    job = _job(gw, image, omero_settings, Restrict_To_ROIs=True)
    slide, regions = pull_for_job(omero_settings, job_id=job.id, user=job.user,
                                  params=job.params, staging=tmp_path)
    out = Path(job.out_dir)
    analyze_slide(slide, out, pipeline=demo_pipeline, settings=omero_settings,
                  request=AnalysisRequest(task="report", evidence="region", regions=regions))
    uris = write_back_for_job(omero_settings, job_id=job.id, user=job.user, params=job.params,
                              model=job.model, input_sha256=job.params["omero"]["files_sha256"],
                              out_dir=out)

    ours = [i for i, roi in gw.rois.items()
            if roi.getDescription() is not None
            and roi.getDescription().getValue() == roi_marker(job.id)]
    assert ours
    files = [i for i, a in gw.annotations.items() if type(a).__name__ == "FileAnnotationI"]
    (provenance,) = [i for i, a in gw.annotations.items()
                     if type(a).__name__ == "MapAnnotationI"]
    prefix = f"omero://{gw.db_uuid}"
    assert uris == ([f"{prefix}/Roi/{i}" for i in ours]
                    + [f"{prefix}/FileAnnotation/{i}" for i in files]
                    + [f"{prefix}/MapAnnotation/{provenance}"])
    assert all(gw.owners[i] == "ana" for i in [*ours, *files, provenance])
    x, y, w, h = RECT  # only regions meeting the user's ROI were analysed
    assert all(roi_to_geometry(gw.rois[i]).intersects(box(x, y, x + w, y + h)) for i in ours)
    values = dict(next(iter(image.listAnnotations(ns="omero-hwsi/analysis"))).getValue())
    assert values["job id"] == job.id and values["model"] == job.model
    assert values["input sha256"] == job.params["omero"]["files_sha256"]
    assert values["model sha256"] == job.params["model"]["sha256"]
    assert all(session.closed for session in gw.sessions)
