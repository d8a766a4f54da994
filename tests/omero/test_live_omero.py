"""Opt-in: the OMERO flow against a real server (``pytest -m live_omero``).

Set ``HWSI_TEST_OMERO_HOST``, ``HWSI_TEST_OMERO_USER`` and ``HWSI_TEST_OMERO_PASSWORD`` (a
service account with the Sudo privilege, e.g. root of ``deploy/compose/omero-test``) and
optionally ``HWSI_TEST_OMERO_PORT`` (4064) and ``HWSI_TEST_OMERO_AS`` (the user the jobs act as,
default ``hwsi-user`` from that compose folder's ``setup.sh``). The suite creates a small image
as that user, pulls it through the pixels service, analyses it with the embedded demo model,
writes the results back, checks them, reruns the write-back, and deletes everything it made.
Without the variables every test here is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.live_omero

HOST = os.environ.get("HWSI_TEST_OMERO_HOST", "")
if not HOST:
    pytest.skip("live OMERO tests need HWSI_TEST_OMERO_HOST, _USER and _PASSWORD",
                allow_module_level=True)


@pytest.fixture
def settings(tmp_path: Path, isolated_env: Path):
    from omero_hwsi.settings import load_settings

    password = tmp_path / "password"
    password.write_text(os.environ["HWSI_TEST_OMERO_PASSWORD"] + "\n")
    password.chmod(0o600)
    return load_settings(omero_host=HOST, omero_port=int(os.environ.get("HWSI_TEST_OMERO_PORT",
                                                                        "4064")),
                         omero_user=os.environ["HWSI_TEST_OMERO_USER"],
                         omero_password_file=password)


@pytest.fixture
def as_user() -> str:
    return os.environ.get("HWSI_TEST_OMERO_AS", "hwsi-user")


def _tissue_planes(size: int):
    """Three 8-bit channels of the synthetic H&E look-alike (one plane per channel)."""
    from omero_hwsi.synthetic.svs import SyntheticTissue

    rgb = SyntheticTissue(seed=3).render(0.0, 0.0, size, size, 1.0)
    for channel in range(3):
        yield np.ascontiguousarray(rgb[:, :, channel])


@pytest.fixture
def live_image(settings, as_user):
    """A 2048 x 2048 RGB image at 0.5 um/px owned by ``as_user``; deleted afterwards."""
    from omero.model import LengthI
    from omero.model.enums import UnitsLength

    from omero_hwsi.omero.connect import omero_connection

    with omero_connection(settings, user=as_user) as conn:
        image = conn.createImageFromNumpySeq(_tissue_planes(2048), "hwsi-live-test.tif",
                                             sizeZ=1, sizeC=3, sizeT=1)
        pixels = image.getPrimaryPixels()._obj
        pixels.setPhysicalSizeX(LengthI(0.5, UnitsLength.MICROMETER))
        pixels.setPhysicalSizeY(LengthI(0.5, UnitsLength.MICROMETER))
        conn.getUpdateService().saveObject(pixels, conn.SERVICE_OPTS)
        image_id = int(image.getId())
    yield image_id
    with omero_connection(settings, user=as_user) as conn:
        conn.deleteObjects("Image", [image_id], deleteAnns=True, deleteChildren=True, wait=True)


def test_the_service_account_can_act_as_the_user(settings, as_user):
    from omero_hwsi.omero.connect import check_connection

    report = check_connection(settings, user=as_user)
    assert report.ok, report.lines


def test_pull_analyse_write_back_and_rerun_on_a_real_server(settings, as_user, live_image,
                                                             tmp_path):
    from omero_hwsi.analysis import AnalysisRequest, analyze_slide
    from omero_hwsi.inference import HwsiPipeline
    from omero_hwsi.omero.annotations import NS_ANALYSIS, NS_EVIDENCE, NS_REPORT, job_marker
    from omero_hwsi.omero.connect import omero_connection
    from omero_hwsi.omero.images import describe_image, pixel_route
    from omero_hwsi.omero.pull import materialize_pixels
    from omero_hwsi.omero.writeback import WriteBack, write_back
    from omero_hwsi.plan import default_model
    from omero_hwsi.slide.local import open_slide

    with omero_connection(settings, user=as_user) as conn:
        image = describe_image(conn.getObject("Image", live_image))
        assert pixel_route(image) == "pixels"
        slide = materialize_pixels(conn, image, cache_root=tmp_path / "cache", mpp=None)
    assert open_slide(slide).dimensions == (2048, 2048)
    pipeline = HwsiPipeline.from_pretrained(default_model())
    out = tmp_path / "result"
    analyze_slide(slide, out, pipeline=pipeline, settings=settings,
                  request=AnalysisRequest(task="report", evidence="region"))
    spec = WriteBack(image_id=live_image, job_id="0" * 8 + "-live-test", result_dir=out,
                     user=as_user, model="demo@live", model_sha256="0" * 64,
                     input_sha256=image.files_sha256, evidence_depth="region")
    with omero_connection(settings, user=as_user) as conn:
        first = write_back(conn, spec)
        second = write_back(conn, spec)  # a rerun replaces, never duplicates
        assert second.deleted_rois == len(first.rois)
        assert second.deleted_annotations == len(first.files) + 1
        server_image = conn.getObject("Image", live_image)
        ours = [a for ns in (NS_EVIDENCE, NS_REPORT, NS_ANALYSIS)
                for a in server_image.listAnnotations(ns=ns)]
        assert len(ours) == 4 and all(a.getDescription() == job_marker(spec.job_id) for a in ours)
        rois = conn.getRoiService().findByImage(live_image, None).rois
        assert len(rois) == len(second.rois) > 0
