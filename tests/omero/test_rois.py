"""Evidence regions -> OMERO shape specs in QuPath's ROI text convention (pure, no server)."""

from __future__ import annotations

import uuid

import pytest
from shapely.geometry import MultiPolygon, Polygon, box

from omero_hwsi.errors import InputError
from omero_hwsi.omero.rois import (
    FILL_ALPHA,
    geometry_shapes,
    omero_int_to_rgba,
    parse_points,
    parse_shape_text,
    points_string,
    rgba_to_omero_int,
    roi_specs_from_features,
    shape_text,
)
from omero_hwsi.results.geojson import qupath_feature

UID = "3f2b8c1e-0d5a-4e4b-9a7c-1b2c3d4e5f60"


@pytest.mark.parametrize(("rgba", "value"), [
    ((255, 0, 0, 255), -16776961),        # opaque red: the top bit set, so negative
    ((0, 255, 0, 255), 16711935),
    ((0, 0, 255, 255), 65535),
    ((255, 255, 255, 255), -1),
    ((0, 0, 0, 0), 0),
    ((230, 120, 20, 48), (230 << 24 | 120 << 16 | 20 << 8 | 48) - (1 << 32)),
])
def test_colours_are_signed_rgba_ints_with_red_on_top(rgba, value):
    assert rgba_to_omero_int(rgba) == value
    assert -(1 << 31) <= value < (1 << 31)
    assert omero_int_to_rgba(value) == rgba


@pytest.mark.parametrize("bad", [(256, 0, 0, 0), (-1, 0, 0, 0), (1, 2, 3)])
def test_colour_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="0-255"):
        rgba_to_omero_int(bad)


def test_shape_text_follows_the_qupath_omero_convention():
    assert shape_text("annotation", ["HWSI evidence region"], UID, name="r3") == \
        f"Annotation:HWSI evidence region:{UID}:NoParent:r3"
    # A derived class joins its parts with '&'; ':' cannot appear inside a field.
    text = shape_text("detection", ["Tumor", "Positive"], UID, name="a: b", parent=UID)
    assert text == f"Detection:Tumor&Positive:{UID}:{UID}:a- b"
    assert shape_text("annotation", [], UID) == f"Annotation:NoClass:{UID}:NoParent:NoName"


def test_shape_text_round_trips_and_foreign_texts_are_not_ours():
    fields = parse_shape_text(shape_text("annotation", ["Tumor", "Positive"], UID, name="r1"))
    assert fields is not None
    assert (fields.object_type, fields.classes, fields.uuid, fields.parent, fields.name) == \
        ("annotation", ("Tumor", "Positive"), UID, None, "r1")
    assert parse_shape_text("my hand-drawn tumour") is None
    assert parse_shape_text("Annotation:Tumor:not-a-uuid:NoParent:x") is None
    assert parse_shape_text(None) is None


def test_shape_text_refuses_ids_that_are_not_uuids():
    with pytest.raises(InputError, match="not a UUID"):
        shape_text("annotation", ["A"], "r3")


def test_points_are_written_compactly_and_read_back():
    points = [(0.0, 0.0), (10.5, 0.0), (10.5, 20.25), (1 / 3, 7.0)]
    text = points_string(points)
    assert text == "0,0 10.5,0 10.5,20.25 0.333,7"
    assert parse_points(text) == [(0, 0), (10.5, 0), (10.5, 20.25), (0.333, 7)]
    assert parse_points("1,2, 3,4") == [(1, 2), (3, 4)]  # an older comma-space layout
    with pytest.raises(InputError, match="x,y"):
        parse_points("1,2 3")
    with pytest.raises(InputError, match="finite"):
        parse_points("1,2 nan,4")


def test_a_box_is_a_rectangle_and_a_polygon_with_a_hole_is_one_shape_per_ring():
    stroke, fill = (230, 120, 20, 255), (230, 120, 20, FILL_ALPHA)
    [rect] = geometry_shapes(box(100, 200, 4196, 4296), text="t", stroke=stroke, fill=fill)
    assert rect.kind == "rectangle" and rect.points == ((100, 200), (4196, 4296))
    holed = Polygon([(0, 0), (100, 0), (100, 100), (0, 100)],
                    [[(20, 20), (40, 20), (40, 40), (20, 40)],
                     [(60, 60), (80, 60), (80, 80), (60, 80)]])
    shapes = geometry_shapes(holed, text="t", stroke=stroke, fill=fill)
    assert [s.kind for s in shapes] == ["polygon"] * 3
    assert shapes[0].points == ((0, 0), (100, 0), (100, 100), (0, 100))  # no closing repeat
    assert all(s.text == "t" for s in shapes)
    # XOR of the rings (how QuPath joins shapes sharing a uuid) gives the original back.
    area = Polygon(shapes[0].points)
    for hole in shapes[1:]:
        area = area.symmetric_difference(Polygon(hole.points))
    assert area.equals(holed)
    parts = MultiPolygon([box(0, 0, 10, 10), Polygon([(20, 0), (30, 0), (25, 8)])])
    assert [s.kind for s in geometry_shapes(parts, text="t", stroke=stroke, fill=fill)] == \
        ["rectangle", "polygon"]


def test_only_region_annotations_become_rois_with_their_id_class_colour_and_score():
    region = qupath_feature(box(0, 0, 4096, 4096), object_type="annotation", name="r0",
                            fid=UID, classification="HWSI evidence region", color=(230, 120, 20),
                            measurements={"HWSI evidence (occlusion dlogp)": 0.4321,
                                          "HWSI evidence rank": 1.0})
    patch = qupath_feature(box(0, 0, 256, 256), object_type="tile", name="r0.p0",
                           fid=str(uuid.uuid4()), classification="HWSI evidence patch")
    [spec] = roi_specs_from_features([region, patch], description="omero-hwsi job j1")
    assert spec.description == "omero-hwsi job j1"
    [item] = spec.shapes
    assert item.kind == "rectangle"
    fields = parse_shape_text(item.text)
    assert fields is not None and fields.uuid == UID and fields.classes == ("HWSI evidence region",)
    assert fields.name is not None and fields.name.startswith("r0 (")
    assert "0.432" in fields.name
    assert item.stroke == (230, 120, 20, 255) and item.fill == (230, 120, 20, FILL_ALPHA)
