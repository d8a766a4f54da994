"""QuPath projects: evidence mapped to project objects (everywhere), paquo round trips (QuPath).

The mapping, source specs, image choice and the error without QuPath run on any machine; the
tests marked ``qupath`` need a QuPath install (PAQUO_QUPATH_DIR) and are skipped, with the
reason, where there is none.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
from shapely.geometry import box, shape

from omero_hwsi.errors import GeoJSONError, InputError, MissingResourceError, SlideNotFoundError
from omero_hwsi.results.analysis_files import write_analysis_files
from omero_hwsi.results.evidence import CLASSES, RANK_MEASUREMENT, measurement_name
from omero_hwsi.results.schema import AnalysisResult, EvidenceItem
from qupath_bridge.geojson import QuPathObject, read_objects
from qupath_bridge.project import (
    ProjectImage,
    QuPathSource,
    add_evidence,
    analysis_tag,
    export_results,
    file_uri_path,
    is_analysis_object,
    is_project,
    object_name,
    parse_source,
    path_classes,
    pick_images,
    project_file,
    project_images,
    project_objects,
    project_regions,
    read_result_evidence,
    require_qupath,
)

SLIDE_NAME = "CMU-1-Small-Region.svs"
SIZE = (2220.0, 2967.0)  # the CMU slide's level 0
CHECKSUM = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
CREATED = "2025-05-01T12:00:00+00:00"
HWSI = [sys.executable, "-m", "omero_hwsi.cli"]


def _box(x: float, y: float, w: float, h: float) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h],
                                                [x, y]]]}


def _octagon(cx: float, cy: float, r: float) -> dict[str, Any]:
    ring = [[cx + r * math.cos(a), cy + r * math.sin(a)]
            for a in np.linspace(0, 2 * np.pi, 8, endpoint=False)]
    return {"type": "Polygon", "coordinates": [ring + [ring[0]]]}


def make_result(slide: Path, created: str = CREATED) -> AnalysisResult:
    """Two regions (one crossing the bottom border), one off the slide, a patch, two nuclei."""
    return AnalysisResult(
        slide={"slide_id": slide.stem, "slide_path": str(slide), "checksum": CHECKSUM,
               "store": "/stores/x"},
        task="vqa", question="Is there tumour?", answer="Yes, in the upper left.",
        model={"path": "/models/tiny", "config_sha256": "cd" * 32}, decoding={"mode": "greedy"},
        created=created,
        evidence=[
            EvidenceItem("r0", "region", "occlusion", 2.5, _box(0, 0, 1024, 1024)),
            EvidenceItem("r5", "region", "occlusion", -1.0, _box(1024, 2048, 1024, 1024)),
            EvidenceItem("r9", "region", "occlusion", 0.1, _box(4096, 0, 1024, 1024)),  # off
            EvidenceItem("r0.p6", "patch", "occlusion", 1.2, _box(512, 256, 256, 256), "r0"),
            EvidenceItem("r0.p6.c0", "cell", "occlusion", 0.4, _octagon(600, 300, 8), "r0.p6"),
            EvidenceItem("r0.p6.c1", "cell", "occlusion", float("nan"), _octagon(700, 400, 8),
                         "r0.p6"),
        ],
    )


def write_result(folder: Path, slide: Path, created: str = CREATED) -> Path:
    """A real result folder, as ``hwsi analyze`` writes it, for the given slide."""
    write_analysis_files(make_result(slide, created), folder,
                         thumbnail=np.full((30, 22, 3), 230, np.uint8), level0_per_px=100.0,
                         slide_size=SIZE,
                         provenance={"slide": {"path": str(slide.resolve()), "sha256": CHECKSUM}})
    return folder


@pytest.fixture
def slide(fixture_slide: Callable[[str], Path]) -> Path:
    return fixture_slide(SLIDE_NAME)


@pytest.fixture
def result_dir(tmp_path: Path, slide: Path) -> Path:
    return write_result(tmp_path / "result", slide)


def _features(result_dir: Path) -> list[dict[str, Any]]:
    features: list[dict[str, Any]] = json.loads(
        (result_dir / "evidence.geojson").read_text(encoding="utf-8"))["features"]
    return features


# -- evidence -> project objects ------------------------------------------------------------


def test_evidence_maps_to_annotations_tiles_and_detections(result_dir: Path, slide: Path) -> None:
    evidence = read_result_evidence(result_dir)
    assert evidence.slide_path == slide.resolve()
    assert evidence.tag == analysis_tag(CHECKSUM, CREATED)
    features = _features(result_dir)
    assert [o.kind for o in evidence.objects] == ["annotation", "annotation", "tile", "detection",
                                                  "detection"]  # r9 lies off the slide
    levels = {cls: (kind, color) for cls, kind, color in CLASSES.values()}
    for obj, feature in zip(evidence.objects, features, strict=True):
        props = feature["properties"]
        assert obj.name == f"{props['name']} (HWSI {evidence.tag})"
        assert obj.classification == (props["classification"]["name"],)
        assert (obj.kind, obj.class_color) == levels[obj.classification[0]]
        assert obj.geometry.equals(shape(feature["geometry"]))
        assert obj.nucleus_geometry is None
        assert set(obj.measurements) == {measurement_name("occlusion"), RANK_MEASUREMENT}
    by_name = {o.name.split(" ")[0]: o for o in evidence.objects}
    assert by_name["r0"].measurements[measurement_name("occlusion")] == 2.5
    assert by_name["r0"].measurements[RANK_MEASUREMENT] == 1.0
    assert math.isnan(by_name["r0.p6.c1"].measurements[measurement_name("occlusion")])
    assert by_name["r5"].geometry.bounds == (1024.0, 2048.0, 2048.0, 2967.0)  # clipped
    description = by_name["r0"].description or ""
    assert "HWSI question: Is there tumour?" in description.splitlines()
    assert "HWSI answer: Yes, in the upper left." in description.splitlines()
    assert all(o.description is None for o in evidence.objects if o.kind != "annotation")
    assert path_classes(evidence.objects) == {(cls,): color for cls, _, color in CLASSES.values()}


def test_one_analysis_one_tag(result_dir: Path, slide: Path, tmp_path: Path) -> None:
    first = read_result_evidence(result_dir)
    assert read_result_evidence(result_dir).tag == first.tag
    again = read_result_evidence(write_result(tmp_path / "again", slide, "2025-05-02T09:00:00+00:00"))
    assert again.tag != first.tag and len(again.tag) == 8
    for obj in first.objects:
        assert is_analysis_object(obj.name, first.tag)
        assert not is_analysis_object(obj.name, again.tag)
    assert not is_analysis_object(None, first.tag)
    assert not is_analysis_object("r0", first.tag)
    assert object_name("", first.tag) == f"(HWSI {first.tag})"


def test_cells_keep_their_nucleus(fixture_slide: Callable[[str], Path]) -> None:
    source = read_objects(fixture_slide("qupath/cells_array_v0.5.geojson"))
    objects = project_objects(source, tag="0badcafe")
    assert [o.kind for o in objects] == [o.object_type for o in source]
    cells = [(o, s) for o, s in zip(objects, source, strict=True) if o.kind == "cell"]
    assert cells
    for obj, read in cells:
        assert read.nucleus_geometry is not None and obj.nucleus_geometry is not None
        assert obj.nucleus_geometry.equals(read.nucleus_geometry)
        assert (obj.classification, obj.class_color) == (read.classification, read.class_color)
    assert cells[0][0].classification == ("Tumor", "Positive")
    first = cells[0][0].measurements
    assert first["Nucleus: Area µm^2"] == 21.75 and math.isnan(first["Cytoplasm: DAB OD std dev"])
    assert path_classes(objects)[("Tumor", "Positive")] == (200, 50, 50)


def test_cell_without_nucleus_is_a_detection_and_tma_cores_are_refused() -> None:
    cell = QuPathObject(object_type="cell", geometry=box(0, 0, 10, 10), name="c")
    (obj,) = project_objects([cell], tag="0badcafe")
    assert (obj.kind, obj.nucleus_geometry, obj.name) == ("detection", None, "c (HWSI 0badcafe)")
    core = QuPathObject(object_type="tmaCore", geometry=box(0, 0, 10, 10))
    with pytest.raises(GeoJSONError, match="feature 1: a tmaCore object cannot be added"):
        project_objects([cell, core], tag="0badcafe", source="x.geojson")


def _edit_result_json(result_dir: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = result_dir / "result.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    change(document)
    path.write_text(json.dumps(document), encoding="utf-8")


def _no_slide_path(doc: dict[str, Any]) -> None:
    del doc["provenance"]["slide"]["path"]
    doc["slide"]["slide_path"] = None


def _moved_slide(doc: dict[str, Any]) -> None:
    doc["provenance"]["slide"]["path"] = "/nowhere/moved.svs"


def _no_created(doc: dict[str, Any]) -> None:
    del doc["created"]


@pytest.mark.parametrize(("change", "error", "pattern"), [
    (_no_slide_path, InputError, "no slide path recorded"),
    (_moved_slide, SlideNotFoundError, "its slide /nowhere/moved.svs is not found"),
    (_no_created, InputError, "no 'created' time"),
])
def test_result_folder_problems_are_one_line(result_dir: Path, change: Callable[[dict[str, Any]], None],
                                             error: type[Exception], pattern: str) -> None:
    _edit_result_json(result_dir, change)
    with pytest.raises(error, match=pattern) as caught:
        read_result_evidence(result_dir)
    assert "\n" not in str(caught.value)


def test_not_a_result_folder_or_bad_evidence(result_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not an hwsi analyze result folder .no result.json"):
        read_result_evidence(tmp_path / "missing")
    (result_dir / "evidence.geojson").write_text("{not json")
    with pytest.raises(GeoJSONError, match="evidence.geojson: not a readable JSON file"):
        read_result_evidence(result_dir)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_slide_is_refused(result_dir: Path, slide: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked.svs"
    locked.write_bytes(b"not read")
    locked.chmod(0)
    _edit_result_json(result_dir, lambda doc: doc["provenance"]["slide"].update(path=str(locked)))
    with pytest.raises(InputError, match="locked.svs is not readable"):
        read_result_evidence(result_dir)


# -- sources, paths, images -----------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("qupath:/a/b", QuPathSource(Path("/a/b"))),
    ("qupath:/a/b#Image 1.svs", QuPathSource(Path("/a/b"), "Image 1.svs")),
    ("qupath:rel/project.qpproj#a#b", QuPathSource(Path("rel/project.qpproj"), "a#b")),
    ("/data/slide.svs", None),
    ("qupath.svs", None),
])
def test_source_specs(text: str, expected: QuPathSource | None) -> None:
    assert parse_source(text) == expected


@pytest.mark.parametrize(("text", "pattern"), [
    ("qupath:", "no QuPath project path"),
    ("qupath:  #Image 1", "no QuPath project path"),
    ("qupath:/a/b#", "empty image name after '#'"),
    ("qupath:/a/b#  ", "empty image name after '#'"),
])
def test_bad_source_specs_are_input_errors(text: str, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern) as caught:
        parse_source(text)
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(("uri", "path"), [
    ("file:/data/slides/a%20b.svs", "/data/slides/a b.svs"),
    ("file:///data/x.svs", "/data/x.svs"),
    ("file://localhost/data/x.svs", "/data/x.svs"),
    ("file://server/share/x.svs", "//server/share/x.svs"),
    ("https://omero.example.org/webclient/?show=image-1", None),
])
def test_file_uris(uri: str, path: str | None) -> None:
    assert file_uri_path(uri) == (None if path is None else Path(path))


def test_project_paths(tmp_path: Path) -> None:
    assert is_project(tmp_path) and is_project(tmp_path / "x.qpproj")
    assert not is_project(tmp_path / "x.geojson")
    assert project_file(tmp_path) == tmp_path / "project.qpproj"
    assert project_file(tmp_path / "other.qpproj") == tmp_path / "other.qpproj"


def test_pick_images(slide: Path, tmp_path: Path) -> None:
    project = tmp_path / "p"
    one = ProjectImage("CMU.svs", "1", slide.as_uri(), slide)
    two = ProjectImage("two", "2", slide.as_uri(), slide)
    assert pick_images([one, two], None, project=project) == [one, two]
    assert pick_images([one, two], "two", project=project) == [two]
    with pytest.raises(InputError, match="no image named 'three'; images: 'CMU.svs', 'two'"):
        pick_images([one, two], "three", project=project)
    with pytest.raises(InputError, match="2 images are named 'two'"):
        pick_images([two, replace(two, id="3")], "two", project=project)
    with pytest.raises(InputError, match="has no images"):
        pick_images([], None, project=project)
    remote = ProjectImage("remote", "4", "https://omero/x", None)
    with pytest.raises(InputError, match="image 'remote' is not a local file .https://omero/x"):
        pick_images([one, remote], None, project=project)
    moved = ProjectImage("moved", "5", "file:/gone.svs", Path("/gone.svs"))
    with pytest.raises(SlideNotFoundError, match="image 'moved': /gone.svs not found"):
        pick_images([moved], "moved", project=project)


# -- without QuPath -------------------------------------------------------------------------


def test_importing_the_project_module_starts_no_jvm() -> None:
    code = ("import sys\n"
            "import qupath_bridge.project\n"
            "bad = [m for m in ('torch', 'transformers', 'paquo', 'jpype') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)



def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HWSI, *args], capture_output=True, text=True, env=env, timeout=600)


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "java" not in proc.stderr.lower()
    return lines[0]


@pytest.fixture
def env(isolated_env: Path) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k != "PAQUO_QUPATH_DIR"}
    return {**environ, "COLUMNS": "200"}


def test_without_qupath_calls_fail_in_one_line(without_qupath: str, result_dir: Path,
                                               tmp_path: Path) -> None:
    with pytest.raises(MissingResourceError, match="PAQUO_QUPATH_DIR") as caught:
        require_qupath()
    assert caught.value.exit_code == 3 and "QuPath 0.2 to 0.6" in str(caught.value)
    with pytest.raises(MissingResourceError, match="PAQUO_QUPATH_DIR"):
        export_results([result_dir], tmp_path / "project")
    assert not (tmp_path / "project").exists()
    with pytest.raises(MissingResourceError, match="PAQUO_QUPATH_DIR"):
        project_images(tmp_path)


def test_without_qupath_export_exits_3(without_qupath: str, result_dir: Path, tmp_path: Path,
                                       env: dict[str, str]) -> None:
    project = tmp_path / "project"
    proc = _cli(["qupath", "export", str(result_dir), "--project", str(project)], env)
    assert proc.returncode == 3
    line = _one_error_line(proc)
    assert "no QuPath install found and PAQUO_QUPATH_DIR is not set" in line
    assert "set PAQUO_QUPATH_DIR to the QuPath folder (paquo 0.9 supports QuPath 0.2 to 0.6)" in line
    assert not project.exists()


def test_a_wrong_qupath_dir_is_named(result_dir: Path, tmp_path: Path, env: dict[str, str]) -> None:
    # PAQUO_QUPATH_DIR turns paquo's search off, so this fails with or without a QuPath install
    not_qupath = tmp_path / "not-qupath"
    not_qupath.mkdir()
    proc = _cli(["qupath", "export", str(result_dir), "--project", str(tmp_path / "p")],
                {**env, "PAQUO_QUPATH_DIR": str(not_qupath)})
    assert proc.returncode == 3
    assert f"PAQUO_QUPATH_DIR={not_qupath} is not a usable QuPath folder" in _one_error_line(proc)


def test_without_qupath_project_sources_exit_3(without_qupath: str, tmp_path: Path,
                                               env: dict[str, str]) -> None:
    regions = _cli(["qupath", "regions", str(tmp_path), "--image", "a.svs",
                    "--out", str(tmp_path / "r.geojson")], env)
    assert regions.returncode == 3 and "PAQUO_QUPATH_DIR" in _one_error_line(regions)
    analyze = _cli(["analyze", f"qupath:{tmp_path}#a.svs", "--out", str(tmp_path / "out")], env)
    assert analyze.returncode == 3 and "PAQUO_QUPATH_DIR" in _one_error_line(analyze)
    assert not (tmp_path / "r.geojson").exists() and not (tmp_path / "out").exists()


# -- with QuPath ----------------------------------------------------------------------------


def _paquo_objects(project_dir: Path, image: str) -> dict[str, list[Any]]:
    """Every object of one image by kind, read back through paquo."""
    from paquo.projects import QuPathProject

    with QuPathProject(project_dir, mode="r") as project:
        (entry,) = [e for e in project.images if e.image_name == image]
        hierarchy = entry.hierarchy
        detections = list(hierarchy.detections)
        return {"annotation": list(hierarchy.annotations),
                "tile": list(hierarchy.tiles),
                "cell": list(hierarchy.cells),
                "detection": [d for d in detections
                              if str(d.java_object.getClass().getSimpleName())
                              == "PathDetectionObject"]}


def _region_union(result_dir: Path) -> Any:
    return shapely.union_all([shape(f["geometry"]) for f in _features(result_dir)
                              if f["properties"]["objectType"] == "annotation"])


@pytest.mark.qupath
def test_export_round_trip_without_duplicates(result_dir: Path, slide: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (first,) = export_results([result_dir], project)
    assert first.image_added and first.replaced == 0
    assert first.added == {"annotation": 2, "tile": 1, "detection": 2}
    (image,) = project_images(project)
    assert image.path == slide.resolve() and image == first.image
    regions = project_regions(project, image.name)
    assert regions.symmetric_difference(_region_union(result_dir)).area == pytest.approx(0, abs=1)
    assert project_regions(project, image.name, ["HWSI evidence region"]).area == regions.area
    with pytest.raises(GeoJSONError, match="no annotation of class Tumor"):
        project_regions(project, image.name, ["Tumor"])

    objects = _paquo_objects(project, image.name)
    assert {k: len(v) for k, v in objects.items()} == {"annotation": 2, "tile": 1, "cell": 0,
                                                       "detection": 2}
    tag = read_result_evidence(result_dir).tag
    r0 = next(a for a in objects["annotation"] if a.name == f"r0 (HWSI {tag})")
    assert r0.path_class.name == "HWSI evidence region"
    assert tuple(r0.path_class.color.to_rgb()) == CLASSES["region"][2]
    assert r0.measurements[measurement_name("occlusion")] == 2.5
    assert "HWSI question: Is there tumour?" in (r0.description or "")
    assert objects["tile"][0].path_class.name == "HWSI evidence patch"

    (again,) = export_results([result_dir], project)  # the same result: replaced, not added
    assert not again.image_added and again.replaced == 5 and again.added == first.added
    assert {k: len(v) for k, v in _paquo_objects(project, image.name).items()} == {
        "annotation": 2, "tile": 1, "cell": 0, "detection": 2}
    (kept,) = export_results([result_dir], project, overwrite_evidence=False)
    assert kept.kept == 5 and kept.added == {}

    other = write_result(tmp_path / "other", slide, "2025-06-01T08:00:00+00:00")
    (beside,) = export_results([other], project)  # another analysis: added beside
    assert beside.replaced == 0
    assert len(_paquo_objects(project, image.name)["annotation"]) == 4
    assert len(project_images(project)) == 1


@pytest.mark.qupath
def test_cells_are_added_with_their_nucleus(result_dir: Path, fixture_slide: Callable[[str], Path],
                                            tmp_path: Path) -> None:
    cells = fixture_slide("qupath/cells_array_v0.5.geojson")
    (result_dir / "evidence.geojson").write_bytes(cells.read_bytes())
    project = tmp_path / "project"
    (exported,) = export_results([result_dir], project)
    expected = [o for o in read_objects(cells) if o.object_type == "cell"]
    assert exported.added["cell"] == len(expected)
    added = _paquo_objects(project, exported.image.name)["cell"]
    assert sorted(c.nucleus_roi.area for c in added) == pytest.approx(
        sorted(o.nucleus_geometry.area for o in expected if o.nucleus_geometry is not None))
    assert {c.path_class.id for c in added} == {"Tumor: Positive", "Tumor: Negative"}


@pytest.mark.qupath
def test_add_evidence_writes_onto_the_named_image(result_dir: Path, slide: Path,
                                                  tmp_path: Path) -> None:
    project = tmp_path / "project"
    (first,) = export_results([result_dir], project)
    again = add_evidence(project, first.image.name, result_dir)
    assert again.replaced == 5 and sum(again.added.values()) == 5
    with pytest.raises(InputError, match="no image named 'nope'"):
        add_evidence(project, "nope", result_dir)
    copy = tmp_path / "copy" / "elsewhere.svs"
    copy.parent.mkdir()
    copy.write_bytes(slide.read_bytes())
    other = tmp_path / "other"
    write_result(other, copy)
    with pytest.raises(InputError, match=re.escape(f"analysed {copy.resolve()}, but image")):
        add_evidence(project, first.image.name, other)


@pytest.mark.qupath
def test_export_refuses_a_folder_that_is_not_a_project(result_dir: Path, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a QuPath project; give a project folder"):
        export_results([result_dir], busy)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


@pytest.mark.qupath
@pytest.mark.slow
def test_analyze_a_project_image_with_its_annotations_and_write_back(
        result_dir: Path, slide: Path, tmp_path: Path, isolated_env: Path,
        monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    from tiny import SMALL_GRID, save_tiny, tiny_model
    from typer.testing import CliRunner

    from omero_hwsi.cli import app
    from omero_hwsi.features.extract import ExtractionConfig, extract_slide
    from omero_hwsi.features.store import load_features
    from omero_hwsi.model.compat import feature_signature

    store = extract_slide(slide, tmp_path_factory.mktemp("fs"), grid=SMALL_GRID,
                          config=ExtractionConfig(workers=0, n_candidates=8, k=4))
    expected = feature_signature(load_features(store.path).provenance)
    model = save_tiny(tmp_path_factory.mktemp("model"), *tiny_model(expected_features=expected))
    monkeypatch.setenv("HWSI_EXTRACT_WORKERS", "0")
    project = tmp_path / "project"
    (exported,) = export_results([result_dir], project)  # region annotations to analyse
    out = tmp_path / "out"
    run = CliRunner().invoke(app, [
        "analyze", f"qupath:{project}#{exported.image.name}", "--regions-from-annotations",
        "--class", "HWSI evidence region", "--write-back", "--model", str(model),
        "--out", str(out), "-q", "Is there tumour?", "--max-new-tokens", "4",
        "--evidence", "region"])
    assert run.exit_code == 0, run.output
    assert run.stdout.strip() == str(out)
    document = json.loads((out / "result.json").read_text())
    assert document["provenance"]["regions_file"] == str(out / "qupath-regions.geojson")
    assert read_objects(out / "qupath-regions.geojson")
    tag = read_result_evidence(out).tag
    annotations = _paquo_objects(project, exported.image.name)["annotation"]
    assert any(is_analysis_object(a.name, tag) for a in annotations)  # written back
