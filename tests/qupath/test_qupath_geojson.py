"""QuPath GeoJSON in: every layout QuPath writes, our own evidence files, hostile files refused."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from shapely.geometry import box, shape

from omero_hwsi.errors import ConfigError, GeoJSONError
from omero_hwsi.results.evidence import RANK_MEASUREMENT, evidence_features, write_evidence_geojson
from omero_hwsi.results.schema import AnalysisResult, EvidenceItem
from omero_hwsi.settings import load_settings
from qupath_bridge.geojson import (
    QuPathObject,
    ReadOptions,
    analysis_regions,
    parse_objects,
    read_objects,
    read_regions,
)

Sample = Callable[[str], Path]


@pytest.fixture
def sample(fixture_slide: Callable[[str], Path]) -> Sample:
    """A hand-written QuPath sample from tests/data/qupath, checksum-verified."""
    return lambda name: fixture_slide(f"qupath/{name}")


def by_name(objects: list[QuPathObject]) -> dict[str | None, QuPathObject]:
    return {o.name: o for o in objects}


def ring(x: float, y: float, w: float, h: float) -> list[list[float]]:
    return [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]


def feature(geometry: Any, **properties: Any) -> dict[str, Any]:
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def polygon(*rings: list[list[float]]) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": list(rings)}


def write(tmp_path: Path, doc: Any, name: str = "in.geojson") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return path


# -- the QuPath samples ---------------------------------------------------------------------


def test_annotations_keep_holes_classes_and_colours(sample: Sample) -> None:
    objects = read_objects(sample("annotations_v0.5.geojson"))
    assert [o.object_type for o in objects] == ["annotation"] * 6
    bed = by_name(objects)["Tumour bed"]
    assert bed.id == "6f1c2b9e-3d4a-4c5b-9e8f-0a1b2c3d4e5f"
    assert bed.geometry.geom_type == "MultiPolygon"
    assert [len(p.interiors) for p in bed.geometry.geoms] == [1, 2]
    assert bed.geometry.area == 2000**2 - 500**2 + 1000**2 - 200**2 - 100**2
    assert (bed.classification, bed.class_color, bed.locked) == (("Tumor",), (200, 0, 0), True)
    assert bed.measurements == {"Num Detections": 2.0, "Num Tumor: Positive": 1.0}
    stroma = next(o for o in objects if o.classification == ("Stroma",))
    assert stroma.color == (255, 200, 0) and stroma.class_color == (150, 200, 150)
    assert stroma.metadata == {"Reviewed by": "pathologist 1", "Round": "2"}
    derived = next(o for o in objects if len(o.classification) == 2)
    assert derived.classification == ("Tumor", "Positive")
    assert derived.class_name == "Tumor: Positive"
    kinds = {o.name: o.geometry.geom_type for o in objects}
    assert kinds["Mitoses"] == "MultiPoint" and kinds["Margin distance"] == "LineString"
    assert kinds["Necrotic focus"] == "Polygon"  # an ellipse ROI: a polygon with isEllipse


def test_cells_in_a_bare_array_keep_nuclei_and_nan_measurements(sample: Sample) -> None:
    objects = read_objects(sample("cells_array_v0.5.geojson"))
    assert [o.object_type for o in objects] == ["cell", "cell", "detection", "tile"]
    first = objects[0]
    assert first.nucleus_geometry is not None
    assert first.nucleus_geometry.within(first.geometry)
    assert first.nucleus_geometry.area < first.geometry.area
    assert first.classification == ("Tumor", "Positive")
    assert first.measurements["Nucleus: Area µm^2"] == 21.75
    assert math.isnan(first.measurements["Cytoplasm: DAB OD std dev"])  # a bare NaN token
    assert math.isnan(objects[2].measurements["Solidity"])
    assert objects[2].nucleus_geometry is None
    assert objects[3].name == "Tile 1"


def test_single_feature_reads(sample: Sample) -> None:
    (obj,) = read_objects(sample("single_feature_v0.5.geojson"))
    assert obj.classification == ("Region*",) and obj.class_color == (0, 0, 180)
    assert obj.geometry.area == 1000 * 800 - 300 * 300


def test_plane_is_read_from_the_geometry(sample: Sample) -> None:
    annotation, detection = read_objects(sample("plane_v0.5.geojson"))
    assert annotation.plane == {"c": -1, "z": 3, "t": 1}
    assert detection.plane == {"c": 1, "z": 3, "t": 1}
    assert read_objects(sample("single_feature_v0.5.geojson"))[0].plane is None


def test_legacy_v02_file_reads_like_a_current_one(sample: Sample) -> None:
    objects = read_objects(sample("legacy_v0.2.geojson"))
    assert [o.object_type for o in objects] == ["annotation", "annotation", "cell", "detection", "tile"]
    assert all(o.id is None for o in objects)  # the id held a class name, not an identity
    tumor, other, cell, detection, tile = objects
    assert tumor.classification == ("Tumor",) and tumor.class_color == (200, 0, 0)
    assert other.color == (0, 255, 0)  # packed signed int -16711936
    assert cell.classification == ("Tumor", "Positive") and cell.class_color == (200, 50, 50)
    assert cell.nucleus_geometry is not None
    assert cell.measurements["Nucleus: Area"] == 21.75
    assert math.isnan(cell.measurements["Cell: DAB OD std dev"])
    assert detection.measurements == {"Area": 9.5} and tile.measurements == {"Hematoxylin: Mean": 0.2875}
    assert tumor.measurements == {}


@pytest.mark.parametrize(("props", "expected"), [
    ({"object_type": "detection"}, "detection"),
    ({"type": "tile"}, "tile"),
    ({"objectType": "tma_core"}, "tmaCore"),
    ({}, "annotation"),
])
def test_object_type_spellings(props: dict[str, Any], expected: str) -> None:
    (obj,) = parse_objects(json.dumps(feature(polygon(ring(0, 0, 1, 1)), **props)))
    assert obj.object_type == expected


def test_unknown_object_type_is_an_annotation_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="qupath_bridge.geojson"):
        (obj,) = parse_objects(json.dumps(feature(polygon(ring(0, 0, 1, 1)), objectType="blob")))
    assert obj.object_type == "annotation" and "blob" in caplog.text


@pytest.mark.parametrize(("classification", "names", "color"), [
    ("Tumor: Positive", ("Tumor", "Positive"), None),
    ({"name": "Tumor: Positive", "color": [1, 2, 3, 128]}, ("Tumor", "Positive"), (1, 2, 3)),
    ({"name": "Tumor", "color": [-16711936]}, ("Tumor",), (0, 255, 0)),
    ({"name": "Tumor", "colorRGB": 0x00C80000}, ("Tumor",), (200, 0, 0)),  # RGB without alpha
    ({}, (), None),
    (None, (), None),
])
def test_classification_layouts(classification: Any, names: tuple[str, ...],
                                color: tuple[int, int, int] | None) -> None:
    doc = feature(polygon(ring(0, 0, 1, 1)), classification=classification)
    (obj,) = parse_objects(json.dumps(doc))
    assert (obj.classification, obj.class_color) == (names, color)


def test_nan_as_a_string_null_and_unknown_properties_are_kept() -> None:
    doc = feature(polygon(ring(0, 0, 1, 1)), measurements={"a": "NaN", "b": None, "c": "-Infinity"},
                  metadata={"n": 3, "ok": True, "nested": {"x": 1}}, hid="r1", box=[0, 0, 1, 1])
    (obj,) = parse_objects(json.dumps(doc))
    assert math.isnan(obj.measurements["a"]) and math.isnan(obj.measurements["b"])
    assert obj.measurements["c"] == -math.inf
    assert obj.metadata == {"n": "3", "ok": "true"}  # QuPath keeps primitives as strings
    assert obj.properties == {"hid": "r1", "box": [0, 0, 1, 1]}


def test_geometry_collection_and_bare_geometry_read() -> None:
    collection = {"type": "GeometryCollection", "geometries": [
        polygon(ring(0, 0, 2, 2)), {"type": "Point", "coordinates": [5, 5]}]}
    (obj,) = parse_objects(json.dumps(collection))
    assert obj.geometry.geom_type == "GeometryCollection"
    assert analysis_regions([obj]).area == 4


# -- our own writer, read back --------------------------------------------------------------


def _evidence_result() -> AnalysisResult:
    square = {"type": "Polygon", "coordinates": [ring(0, 0, 512, 512)]}
    holed = {"type": "Polygon", "coordinates": [ring(512, 0, 512, 512), ring(600, 100, 100, 100)[::-1]]}
    nucleus = {"type": "Polygon", "coordinates": [[[50, 40], [60, 42], [62, 52], [52, 58], [44, 50], [50, 40]]]}
    return AnalysisResult(
        slide={"slide_id": "s1", "checksum": "ab" * 32}, task="vqa", question="Tumour?", answer="Yes",
        model={"path": "/models/m", "config_sha256": "cd" * 32}, decoding={"mode": "greedy"},
        created="2025-05-01T12:00:00+00:00",
        evidence=[EvidenceItem("r0", "region", "occlusion", 1.5, square),
                  EvidenceItem("r1", "region", "occlusion", float("nan"), holed),
                  EvidenceItem("r0.p3", "patch", "occlusion", 0.25, square, "r0"),
                  EvidenceItem("r0.p3.c0", "cell", "occlusion", -0.5, nucleus, "r0.p3")],
    )


def test_our_evidence_geojson_round_trips(tmp_path: Path) -> None:
    result = _evidence_result()
    path = tmp_path / "evidence.geojson"
    write_evidence_geojson(result, (4000, 3000), path)
    written = evidence_features(result, (4000, 3000))
    objects = read_objects(path)
    assert len(objects) == len(written) == 4
    for obj, feat in zip(objects, written, strict=True):
        props = feat["properties"]
        assert obj.id == feat["id"]
        assert obj.object_type == props["objectType"] and obj.name == props["name"]
        assert obj.geometry.equals(shape(feat["geometry"]))
        assert obj.classification == (props["classification"]["name"],)
        assert list(obj.class_color or ()) == props["classification"]["color"]
        assert obj.metadata == props["metadata"]
        assert obj.properties == {"hid": props["hid"]}
        for name, value in props["measurements"].items():
            assert (math.isnan(obj.measurements[name]) if value == "NaN"
                    else obj.measurements[name] == value)
    assert math.isnan(by_name(objects)["r1"].measurements["HWSI evidence (occlusion dlogp)"])
    assert by_name(objects)["r0"].measurements[RANK_MEASUREMENT] == 1.0
    assert [o.object_type for o in objects] == ["annotation", "annotation", "tile", "detection"]


# -- analysis regions -----------------------------------------------------------------------


def test_regions_are_the_union_of_annotation_areas(sample: Sample,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="qupath_bridge.geojson"):
        union = read_regions(sample("annotations_v0.5.geojson"))
    assert "skipped 2 point or line annotation(s)" in caplog.text
    objects = read_objects(sample("annotations_v0.5.geojson"))
    areas = [o.geometry for o in objects if o.geometry.area > 0]
    assert union.area == pytest.approx(sum(a.area for a in areas))  # disjoint areas
    assert union.is_valid


def test_class_filter_matches_full_and_single_names(sample: Sample) -> None:
    objects = read_objects(sample("annotations_v0.5.geojson"))
    tumor = analysis_regions(objects, ["Tumor"])
    assert tumor.area == by_name(objects)["Tumour bed"].geometry.area + 800 * 600
    assert analysis_regions(objects, ["Tumor: Positive"]).area == 800 * 600
    assert analysis_regions(objects, ["Stroma", "Necrosis"]).area == pytest.approx(
        1500 * 1000 + by_name(objects)["Necrotic focus"].geometry.area)
    with pytest.raises(GeoJSONError, match="no annotation of class Fat.*Necrosis, Stroma, Tumor"):
        analysis_regions(objects, ["Fat"], source="a.geojson")


def test_detections_are_not_regions(sample: Sample) -> None:
    with pytest.raises(GeoJSONError, match="no polygon with an area.*cell, detection, tile"):
        read_regions(sample("cells_array_v0.5.geojson"))


def test_only_points_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, [feature({"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]})])
    with pytest.raises(GeoJSONError, match="a MultiPoint selects no area"):
        read_regions(path)


# -- hostile and malformed input ------------------------------------------------------------


BOW_TIE = polygon([[0, 0], [10, 10], [10, 0], [0, 20], [0, 0]])


@pytest.mark.parametrize(("doc", "message"), [
    ("{not json", "not a readable JSON file"),
    ("[" * 100_000, "not a readable JSON file"),
    ('"just a string"', "expected a GeoJSON object"),
    ({"type": "Topology"}, "unknown GeoJSON type 'Topology'"),
    ({"type": ["Feature"]}, "expected a GeoJSON object with a 'type'"),
    ([{"type": ["Feature"]}], "feature 0: expected a Feature, got type \\['Feature'\\]"),
    ([feature({"type": {"a": 1}, "coordinates": []})], "unknown geometry type"),
    ({"type": "FeatureCollection", "features": {}}, "without a 'features' array"),
    ([42], "feature 0: expected a Feature object, got a number"),
    ([feature(polygon(ring(0, 0, 1, 1))), {"type": "Feature", "geometry": polygon(ring(0, 0, 1, 1)),
                                           "properties": []}],
     "feature 1: 'properties' must be an object, got an array"),
    ([feature(polygon(ring(0, 0, 1, 1)), measurements={"Area": "big"})],
     "feature 0: measurement 'Area' is not a number"),
    ([feature(polygon(ring(0, 0, 1, 1)), measurements=[{"value": 1}])], "measurement list entries"),
    ([feature(polygon(ring(0, 0, 1, 1)), measurements=[1, 2])], "measurement list entries"),
    ([feature(polygon(ring(0, 0, 1, 1)), measurements=3)], "'measurements' must be an object"),
    ([feature(polygon(ring(0, 0, 1, 1)), color="red")], "'color' must be"),
    ([feature(polygon(ring(0, 0, 1, 1)), color=[300, 0, 0])], "'color' must be"),
    ([feature(polygon(ring(0, 0, 1, 1)), classification=5)], "'classification' must be"),
    ([feature(polygon(ring(0, 0, 1, 1)), classification={"color": [1, 2, 3]})], "needs a 'name'"),
    ([feature(polygon(ring(0, 0, 1, 1)), objectType=3)], "'objectType' must be a string"),
    ([feature(polygon(ring(0, 0, 1, 1)), isLocked="yes")], "'isLocked' must be true or false"),
    ([feature(polygon(ring(0, 0, 1, 1)), metadata=[1])], "'metadata' must be an object"),
    ([feature({**polygon(ring(0, 0, 1, 1)), "plane": {"z": "top"}})], "plane 'z' must be an integer"),
    ([{"type": "Feature", "id": {"a": 1}, "geometry": polygon(ring(0, 0, 1, 1))}], "'id' must be"),
    ([feature(None)], "feature 0: no geometry"),
    ([feature({"type": "Circle", "coordinates": [0, 0], "radius": 3})], "unknown geometry type 'Circle'"),
    ([feature({"coordinates": [0, 0]})], "geometry without a 'type'"),
    ([feature({"type": "Polygon", "coordinates": "0 0 1 1"})], "malformed Polygon: 'coordinates' must be"),
    ([feature(polygon([[0, 0], [1, 0], [0, 0]]))], "malformed Polygon: degenerate ring with 3 position"),
    ([feature(polygon([[0, 0], [1, 1], [2, 2], [0, 0]]))], "degenerate ring \\(zero area"),
    ([feature(polygon([[0, 0], [0, 0], [0, 0], [0, 0]]))], "degenerate ring \\(zero area"),
    ([feature(polygon([[0, 0], [1, 0], [1, 1], [0, 1]]))], "must end where it started"),
    ([feature(polygon([[0, 0], [1, "a"], [1, 1], [0, 0]]))], "positions must be arrays of 2 or 3"),
    ([feature(polygon([[0, 0], [1], [1, 1], [0, 0]]))], "malformed Polygon"),
    ([feature({"type": "MultiPolygon", "coordinates": [[ring(0, 0, 1, 1)], [[[0, 0], [1, 1]]]]})],
     "malformed MultiPolygon: degenerate ring with 2"),
    ([feature({"type": "Point", "coordinates": [1]})], "malformed Point"),
    ([feature({"type": "LineString", "coordinates": [[1, 2]]})], "malformed LineString"),
    ([feature({"type": "GeometryCollection", "geometries": []})], "malformed GeometryCollection"),
    ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
     '[[[0, 0], [1, NaN], [1, 1], [0, 0]]]}}]', "non-finite coordinate .* at position 1"),
    ('{"type": "Point", "coordinates": [1e999, 0]}', "non-finite coordinate"),
    ('{"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, -Infinity], [0, 0]]]}', "non-finite"),
    ([feature({"type": "Feature", "geometry": polygon(ring(0, 0, 1, 1))})], "unknown geometry type 'Feature'"),
])
def test_malformed_files_are_one_line_errors(tmp_path: Path, doc: Any, message: str) -> None:
    path = write(tmp_path, doc)
    with pytest.raises(GeoJSONError, match=message) as info:
        read_objects(path)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"{path}: ")
    assert info.value.exit_code == 2


def test_missing_file_and_folder_are_refused(tmp_path: Path) -> None:
    with pytest.raises(GeoJSONError, match="not found"):
        read_objects(tmp_path / "missing.geojson")
    with pytest.raises(GeoJSONError, match="is a folder"):
        read_objects(tmp_path)


def test_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.geojson"
    path.write_bytes('{"type": "Feature", "properties": {"name": "Tumeur \u00e9"}}'.encode("latin-1"))
    with pytest.raises(GeoJSONError, match="not UTF-8"):
        read_objects(path)


def test_bow_tie_is_repaired_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, [feature(polygon(ring(100, 100, 5, 5))), feature(BOW_TIE)])
    with caplog.at_level(logging.WARNING, logger="qupath_bridge.geojson"):
        objects = read_objects(path, options=ReadOptions(invalid_geometry="repair"))
    assert "feature 1: repaired invalid Polygon (Self-intersection" in caplog.text
    repaired = objects[1].geometry
    assert repaired.is_valid and repaired.geom_type == "MultiPolygon"
    assert repaired.area == pytest.approx(250 / 3)  # two triangles meeting at (20/3, 20/3)
    assert objects[0].geometry.area == 25


def test_bow_tie_is_refused_in_refuse_mode(tmp_path: Path) -> None:
    path = write(tmp_path, [feature(BOW_TIE)])
    with pytest.raises(GeoJSONError, match=r"feature 0: invalid Polygon \(Self-intersection.*"
                                           "HWSI_QUPATH_INVALID_GEOMETRY=repair"):
        read_objects(path, options=ReadOptions(invalid_geometry="refuse"))


def test_overlapping_multipolygon_parts_are_repaired(tmp_path: Path) -> None:
    doc = feature({"type": "MultiPolygon", "coordinates": [[ring(0, 0, 10, 10)], [ring(5, 5, 10, 10)]]})
    (obj,) = read_objects(write(tmp_path, doc))
    assert obj.geometry.is_valid and obj.geometry.equals(box(0, 0, 10, 10).union(box(5, 5, 15, 15)))


def test_feature_cap(tmp_path: Path) -> None:
    path = write(tmp_path, [feature(polygon(ring(i, 0, 1, 1))) for i in range(4)])
    assert len(read_objects(path, options=ReadOptions(max_features=4))) == 4
    with pytest.raises(GeoJSONError, match="4 features, more than the limit of 3.*HWSI_QUPATH_MAX_FEATURES"):
        read_objects(path, options=ReadOptions(max_features=3))


def test_vertex_cap_counts_every_geometry(tmp_path: Path) -> None:
    cell = {**feature(polygon(ring(0, 0, 4, 4))), "nucleusGeometry": polygon(ring(1, 1, 1, 1))}
    path = write(tmp_path, [cell, cell])  # 4 rings of 5 positions
    assert len(read_objects(path, options=ReadOptions(max_vertices=20))) == 2
    with pytest.raises(GeoJSONError, match="more than 19 vertices.*HWSI_QUPATH_MAX_VERTICES"):
        read_objects(path, options=ReadOptions(max_vertices=19))


def test_file_size_cap_is_checked_before_reading(tmp_path: Path) -> None:
    path = write(tmp_path, "x" * 2_000)  # not JSON: the size is refused first
    with pytest.raises(GeoJSONError, match="over the 0.001 MB limit.*HWSI_QUPATH_MAX_FILE_MB"):
        read_objects(path, options=ReadOptions(max_file_mb=0.001))
    with pytest.raises(GeoJSONError, match="not a readable JSON"):
        read_objects(path, options=ReadOptions(max_file_mb=0.01))


def test_options_come_from_settings(tmp_path: Path) -> None:
    settings = load_settings({"HWSI_DATA_DIR": str(tmp_path), "HWSI_QUPATH_INVALID_GEOMETRY": "refuse",
                              "HWSI_QUPATH_MAX_FILE_MB": "1.5", "HWSI_QUPATH_MAX_FEATURES": "10",
                              "HWSI_QUPATH_MAX_VERTICES": "100"})
    assert ReadOptions.from_settings(settings) == ReadOptions("refuse", 1.5, 10, 100)
    assert ReadOptions.from_settings(load_settings({"HWSI_DATA_DIR": str(tmp_path)})) == ReadOptions()


@pytest.mark.parametrize(("var", "value"), [
    ("HWSI_QUPATH_INVALID_GEOMETRY", "ignore"),
    ("HWSI_QUPATH_MAX_FILE_MB", "0"),
    ("HWSI_QUPATH_MAX_FEATURES", "0"),
    ("HWSI_QUPATH_MAX_VERTICES", "many"),
])
def test_bad_qupath_settings_are_config_errors(tmp_path: Path, var: str, value: str) -> None:
    with pytest.raises(ConfigError, match=var.removeprefix("HWSI_").lower() + "|" + var):
        load_settings({"HWSI_DATA_DIR": str(tmp_path), var: value})


def test_reader_imports_neither_torch_nor_paquo() -> None:
    code = ("import sys\n"
            "import qupath_bridge.geojson\n"
            "bad = [m for m in ('torch', 'transformers', 'paquo', 'jpype') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
