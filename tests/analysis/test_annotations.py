"""--regions files: QuPath exports and plain GeoJSON in, one area out; bad files refused in one line."""

from __future__ import annotations

import json

import pytest

from omero_hwsi.errors import GeoJSONError
from qupath_bridge.geojson import read_regions

SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
OTHER = {"type": "Polygon", "coordinates": [[[20, 0], [30, 0], [30, 10], [20, 10], [20, 0]]]}


@pytest.mark.parametrize("doc", [
    SQUARE,
    {"type": "Feature", "geometry": SQUARE, "properties": {}},
    {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": SQUARE}]},
    [{"type": "Feature", "geometry": SQUARE, "properties": {"objectType": "annotation"}}],
])
def test_every_qupath_export_shape_reads(tmp_path, doc):
    path = tmp_path / "regions.geojson"
    path.write_text(json.dumps(doc))
    assert read_regions(path).area == 100


def test_areas_are_united(tmp_path):
    path = tmp_path / "regions.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": SQUARE}, {"type": "Feature", "geometry": OTHER}]}))
    assert read_regions(path).area == 200


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "not a readable JSON file"),
    (json.dumps({"features": []}), "expected a GeoJSON object"),
    (json.dumps({"type": "FeatureCollection", "features": []}), "no polygon"),
    (json.dumps({"type": "Point", "coordinates": [1, 2]}), "a Point selects no area"),
    (json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [1]]]}), "malformed Polygon"),
])
def test_bad_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "regions.geojson"
    path.write_text(text)
    with pytest.raises(GeoJSONError, match=message) as err:
        read_regions(path)
    assert "\n" not in str(err.value)
    with pytest.raises(GeoJSONError, match="not found"):
        read_regions(tmp_path / "missing.geojson")
