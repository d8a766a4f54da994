"""Writing an analysis back onto its OMERO image (fake server, real ``omero.model`` objects)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_gateway import ConnectionLostException, FakeGateway, FakeImage

pytest.importorskip("omero.model", reason="the omero extra (make setup-omero)")

from omero_hwsi.errors import InputError, OmeroNotFoundError, OmeroPermissionError  # noqa: E402
from omero_hwsi.omero.annotations import (  # noqa: E402
    NS_ANALYSIS,
    NS_EVIDENCE,
    NS_REPORT,
    PROVENANCE_KEYS,
    job_marker,
    roi_marker,
)
from omero_hwsi.omero.rois import parse_shape_text  # noqa: E402
from omero_hwsi.omero.writeback import WriteBack, write_back  # noqa: E402

CMU = "CMU-1-Small-Region.svs"
JOB = "6815b6e9-0c3f-5a7e-9d2b-4f1e8a7c6b5d"
OTHER_JOB = "0b1c2d3e-4f50-5617-8293-a4b5c6d7e8f9"
FILES = ("evidence.geojson", "report.md", "report.html")
FIRST_RUN_WRITES = 9
"""Write calls of a first run: one ROI batch, three uploads and links, the key-values and link."""


@pytest.fixture
def server(fixture_slide) -> tuple[FakeGateway, FakeImage]:
    gw = FakeGateway("ana")
    pyramid, _ = gw.add_slide(fixture_slide(CMU), CMU, size=(2220, 2967))
    return gw, pyramid


def _spec(image_id: int, result_dir: Path, job_id: str = JOB, **changes) -> WriteBack:
    values = {"image_id": image_id, "job_id": job_id, "result_dir": result_dir, "user": "ana",
              "model": "demo@0123456789ab", "model_sha256": "a" * 64,
              "input_sha256": "b" * 64, "evidence_depth": "region", **changes}
    return WriteBack(**values)


def _region_ids(result_dir: Path) -> set[str]:
    doc = json.loads((result_dir / "evidence.geojson").read_text())
    return {f["id"] for f in doc["features"] if f["properties"]["objectType"] == "annotation"}


def _ours(image: FakeImage) -> list:
    return [a for ns in (NS_EVIDENCE, NS_REPORT, NS_ANALYSIS) for a in image.listAnnotations(ns=ns)]


def test_write_back_writes_rois_files_then_provenance_last(server, analysis_result):
    gw, image = server
    written = write_back(gw, _spec(image.id, analysis_result))
    regions = _region_ids(analysis_result)
    assert regions and len(written.rois) == len(regions)

    prefix = f"hwsi-{image.id}-{JOB[:8]}-"
    file_ids = [written.files[name] for name in FILES]
    assert gw.writes == [
        ("save", f"{len(regions)} Roi"),
        *[step for name, ann in zip(FILES, file_ids) for step in (
            ("upload", prefix + name), ("link", f"FileAnnotation:{ann} -> Image:{image.id}"))],
        ("save", "MapAnnotation"),
        ("link", f"MapAnnotation:{written.provenance} -> Image:{image.id}")]

    files = {a.getId(): a for ns in (NS_EVIDENCE, NS_REPORT) for a in image.listAnnotations(ns=ns)}
    assert sorted(files) == sorted(file_ids)
    expected = {"evidence.geojson": ("application/geo+json", NS_EVIDENCE),
                "report.md": ("text/plain", NS_REPORT), "report.html": ("text/html", NS_REPORT)}
    for name, ann_id in written.files.items():
        ann = files[ann_id]
        assert ann.getFileName() == prefix + name
        assert (ann.getFile().getMimetype(), ann.getNs()) == expected[name]
        assert ann.getDescription() == job_marker(JOB)
        assert gw.file_bytes[ann_id] == (analysis_result / name).read_bytes()
        assert ann.getFileSize() == (analysis_result / name).stat().st_size

    (provenance,) = image.listAnnotations(ns=NS_ANALYSIS)
    assert provenance.getId() == written.provenance
    assert provenance.getDescription() == job_marker(JOB)
    values = dict(provenance.getValue())
    assert [k for k, _ in provenance.getValue()] == list(PROVENANCE_KEYS)
    result = json.loads((analysis_result / "result.json").read_text())
    assert values["job id"] == JOB and values["image id"] == str(image.id)
    assert values["requested by"] == "ana" and values["task"] == "report"
    assert values["model"] == "demo@0123456789ab" and values["input sha256"] == "b" * 64
    assert values["evidence method"] == "occlusion" and values["evidence depth"] == "region"
    assert values["answer"] and result["answer"].startswith(values["answer"].rstrip("\u2026"))


def test_rois_are_real_omero_rois_carrying_the_evidence_ids(server, analysis_result):
    from omero.model import RoiI

    gw, image = server
    written = write_back(gw, _spec(image.id, analysis_result))
    rois = gw.getRoiService().findByImage(image.id, None).rois
    assert sorted(r.getId().getValue() for r in rois) == sorted(written.rois)
    uuids = set()
    for roi in rois:
        assert isinstance(roi, RoiI) and roi.getImage().getId().getValue() == image.id
        assert roi.getDescription().getValue() == roi_marker(JOB)
        shapes = roi.copyShapes()
        assert shapes and all(s.getId() is not None for s in shapes)
        texts = {parse_shape_text(s.getTextValue().getValue()) for s in shapes}
        (fields,) = texts  # one QuPath object per ROI
        assert fields.object_type == "annotation" and fields.classes == ("HWSI evidence region",)
        uuids.add(fields.uuid)
    assert uuids == _region_ids(analysis_result)
    assert written.uris(gw.db_uuid)[:len(rois)] == [f"omero://{gw.db_uuid}/Roi/{i}"
                                                     for i in written.rois]


def test_a_rerun_replaces_exactly_this_jobs_objects(server, analysis_result):
    from omero.model import ImageI, RectangleI, RoiI
    from omero.rtypes import rdouble, rstring

    gw, image = server
    gw.add_user("bo")
    hand_drawn = []
    for owner, description in (("ana", "tumour margin"), ("bo", None)):
        roi = RoiI()
        roi.setImage(ImageI(image.id, False))
        if description:
            roi.setDescription(rstring(description))
        shape = RectangleI()
        for name, value in (("X", 10.0), ("Y", 20.0), ("Width", 300.0), ("Height", 200.0)):
            getattr(shape, f"set{name}")(rdouble(value))
        roi.addShape(shape)
        hand_drawn.append(gw.add_roi(roi, owner=owner))
    other = write_back(gw, _spec(image.id, analysis_result, job_id=OTHER_JOB))
    first = write_back(gw, _spec(image.id, analysis_result))
    counts = (len(gw.rois), len(gw.annotations), len(gw.links))
    gw.writes.clear()

    again = write_back(gw, _spec(image.id, analysis_result))
    assert (len(gw.rois), len(gw.annotations), len(gw.links)) == counts
    first_annotations = sorted([*first.files.values(), first.provenance])
    assert gw.writes[:2] == [("delete", f"Roi:{sorted(first.rois)}"),
                             ("delete", f"Annotation:{first_annotations}")]
    assert (again.deleted_rois, again.deleted_annotations) == (len(first.rois), 4)
    assert set(hand_drawn) | set(other.rois) | set(again.rois) == set(gw.rois)
    assert not set(first.rois) & set(gw.rois)
    kept = {a.getId() for a in _ours(image)}
    assert kept == {*other.files.values(), other.provenance, *again.files.values(),
                    again.provenance}
    assert {a.getDescription() for a in _ours(image)} == {job_marker(JOB), job_marker(OTHER_JOB)}


def test_permission_denied_is_refused_before_any_write(server, analysis_result):
    gw, image = server
    image.can_annotate = False
    with pytest.raises(OmeroPermissionError, match=f"OMERO Image {image.id} .*may not annotate"):
        write_back(gw, _spec(image.id, analysis_result))
    assert gw.writes == [] and not gw.rois and not gw.annotations


@pytest.mark.parametrize("hidden", [False, True])
def test_a_missing_or_invisible_image_is_not_found(server, analysis_result, hidden):
    gw, image = server
    if hidden:
        image.hidden_from.add("ana")
    image_id = image.id if hidden else 424242
    with pytest.raises(OmeroNotFoundError, match=f"OMERO Image {image_id}: not found, or not "
                                                 "visible to this user"):
        write_back(gw, _spec(image_id, analysis_result))
    assert gw.writes == []


def test_an_incomplete_result_folder_is_refused_before_any_write(server, analysis_result,
                                                                 tmp_path):
    gw, image = server
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "result.json").write_bytes((analysis_result / "result.json").read_bytes())
    with pytest.raises(InputError, match="result file\\(s\\) missing: evidence.geojson, "
                                         "report.md, report.html"):
        write_back(gw, _spec(image.id, partial))
    assert gw.writes == []


@pytest.mark.parametrize("fail_after", range(FIRST_RUN_WRITES))
def test_a_write_back_killed_midway_is_repaired_by_its_rerun(server, analysis_result,
                                                             fail_after):
    gw, image = server
    gw.fail_after_saves = fail_after
    with pytest.raises(ConnectionLostException):
        write_back(gw, _spec(image.id, analysis_result))
    assert len(gw.writes) == fail_after
    assert list(image.listAnnotations(ns=NS_ANALYSIS)) == []  # not marked complete

    done = write_back(gw, _spec(image.id, analysis_result))
    regions = _region_ids(analysis_result)
    assert sorted(gw.rois) == sorted(done.rois) and len(done.rois) == len(regions)
    # Complete, and nothing left of the killed run, linked or not.
    assert sorted(gw.annotations) == sorted([*done.files.values(), done.provenance])
    assert sorted(a.getId() for a in _ours(image)) == sorted(gw.annotations)
    assert len(gw.links) == 4


def test_without_write_rois_no_roi_is_written(server, analysis_result):
    gw, image = server
    written = write_back(gw, _spec(image.id, analysis_result, write_rois=False))
    assert written.rois == [] and not gw.rois
    assert [verb for verb, _ in gw.writes] == ["upload", "link"] * 3 + ["save", "link"]
    assert written.provenance is not None and len(written.files) == 3
