"""The real ``omero.model`` objects the write-back creates (omero-py installed, no server)."""

from __future__ import annotations

import pytest
from shapely.geometry import Polygon, box

pytest.importorskip("omero.model", reason="the omero extra (make setup-omero)")

from omero_hwsi.omero.annotations import (  # noqa: E402
    NS_ANALYSIS,
    PROVENANCE_KEYS,
    attachment_name,
    provenance_pairs,
)
from omero_hwsi.omero.rois import (  # noqa: E402
    RoiSpec,
    geometry_shapes,
    omero_int_to_rgba,
    parse_shape_text,
    roi_to_geometry,
    shape_text,
    to_omero_roi,
)

UID = "6c0f5a34-1b6e-4f0a-8d2c-9e8f7a6b5c4d"


def _spec() -> RoiSpec:
    text = shape_text("annotation", ["HWSI evidence region"], UID, name="r7 (dlogp 0.25)")
    holed = Polygon([(0, 0), (300, 0), (300, 300), (0, 300)],
                    [[(100, 100), (200, 100), (200, 200), (100, 200)]])
    shapes = (geometry_shapes(box(4096, 0, 8192, 4096), text=text, stroke=(230, 120, 20, 255),
                              fill=(230, 120, 20, 48))
              + geometry_shapes(holed, text=text, stroke=(230, 120, 20, 255),
                                fill=(230, 120, 20, 48)))
    return RoiSpec(name="r7 (dlogp 0.25)", description="omero-hwsi job j-1", shapes=tuple(shapes))


def test_rois_are_real_omero_model_objects_with_shapes_text_colour_and_plane():
    from omero.model import ImageI, PolygonI, RectangleI, RoiI
    from omero.model.enums import UnitsLength

    roi = to_omero_roi(_spec(), 42, z=0, t=0)
    assert isinstance(roi, RoiI)
    assert isinstance(roi.getImage(), ImageI) and roi.getImage().getId().getValue() == 42
    assert roi.getName().getValue() == "r7 (dlogp 0.25)"
    assert roi.getDescription().getValue() == "omero-hwsi job j-1"
    shapes = roi.copyShapes()
    assert [type(s) for s in shapes] == [RectangleI, PolygonI, PolygonI]
    rect = shapes[0]
    assert (rect.getX().getValue(), rect.getY().getValue(), rect.getWidth().getValue(),
            rect.getHeight().getValue()) == (4096, 0, 4096, 4096)
    assert shapes[1].getPoints().getValue() == "0,0 300,0 300,300 0,300"
    assert shapes[2].getPoints().getValue() == "100,100 200,100 200,200 100,200"
    for item in shapes:
        fields = parse_shape_text(item.getTextValue().getValue())
        assert fields is not None and fields.uuid == UID
        assert omero_int_to_rgba(item.getStrokeColor().getValue()) == (230, 120, 20, 255)
        assert omero_int_to_rgba(item.getFillColor().getValue()) == (230, 120, 20, 48)
        assert item.getStrokeWidth().getUnit() == UnitsLength.PIXEL
        assert (item.getTheZ().getValue(), item.getTheT().getValue()) == (0, 0)
        assert item.getTheC() is None  # on every channel


def test_omero_rois_read_back_as_the_area_they_stand_for_holes_included():
    from omero.model import EllipseI, PointI, RoiI
    from omero.rtypes import rdouble

    area = roi_to_geometry(to_omero_roi(_spec(), 1))
    expected = box(4096, 0, 8192, 4096).union(Polygon(
        [(0, 0), (300, 0), (300, 300), (0, 300)], [[(100, 100), (200, 100), (200, 200),
                                                    (100, 200)]]))
    assert area.symmetric_difference(expected).area < 1e-6
    # A hand-drawn ellipse counts; a point has no area and is skipped.
    roi = RoiI()
    ellipse = EllipseI()
    for name, value in (("X", 50.0), ("Y", 60.0), ("RadiusX", 10.0), ("RadiusY", 5.0)):
        getattr(ellipse, f"set{name}")(rdouble(value))
    point = PointI()
    point.setX(rdouble(1.0))
    point.setY(rdouble(1.0))
    roi.addShape(ellipse)
    roi.addShape(point)
    geometry = roi_to_geometry(roi)
    assert geometry.area == pytest.approx(3.14159 * 10 * 5, rel=0.01)
    assert geometry.centroid.x == pytest.approx(50) and geometry.centroid.y == pytest.approx(60)


def test_the_provenance_map_annotation_holds_the_documented_keys_in_our_namespace():
    from omero.gateway import MapAnnotationWrapper

    result = {"task": "vqa", "question": "Is there tumour?", "answer": "Yes. " * 100,
              "created": "2026-11-30T01:00:00+00:00", "notice": "Research use only.",
              "model": {"config_sha256": "c" * 64},
              "evidence_methods": {"occlusion": "nats of answer log-likelihood lost"}}
    pairs = provenance_pairs(result, job_id="j-1", model="demo@abcdef012345",
                             model_sha256="a" * 64, evidence_depth="cell",
                             input_sha256="b" * 64, image_id=42, user="ana")
    assert [k for k, _ in pairs] == list(PROVENANCE_KEYS)
    values = dict(pairs)
    assert values["evidence method"] == "occlusion" and values["image id"] == "42"
    assert len(values["answer"]) <= 250 and values["answer"].endswith("\u2026")
    annotation = MapAnnotationWrapper()
    annotation.setNs(NS_ANALYSIS)
    annotation.setValue(pairs)
    stored = annotation._obj.getMapValue()
    assert [(nv.name, nv.value) for nv in stored] == [tuple(p) for p in pairs]
    assert annotation._obj.getNs().getValue() == "omero-hwsi/analysis"


def test_attachment_names_carry_the_image_and_the_job():
    assert attachment_name(42, "6815b6e9-aaaa", "report.md") == "hwsi-42-6815b6e9-report.md"
