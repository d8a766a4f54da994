"""The qupath commands and `hwsi analyze qupath:` on the command line: bad input one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import geojson
import pytest

from qupath_bridge.geojson import read_objects

HWSI = [sys.executable, "-m", "omero_hwsi.cli"]


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HWSI, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture
def env(isolated_env: Path) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200"}


@pytest.fixture
def annotations(fixture_slide: Callable[[str], Path]) -> Path:
    return fixture_slide("qupath/annotations_v0.5.geojson")


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    return lines[0]


def test_class_filter_writes_valid_readable_regions(annotations: Path, env: dict[str, str],
                                                    tmp_path: Path) -> None:
    out = tmp_path / "regions" / "tumor.geojson"
    proc = run(["qupath", "regions", str(annotations), "--class", "Tumor", "--out", str(out)], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    doc = geojson.loads(out.read_text(encoding="utf-8"))
    assert doc.is_valid and doc["type"] == "FeatureCollection"
    regions = read_objects(out)
    assert {r.object_type for r in regions} == {"annotation"}
    assert all(r.geometry.geom_type == "Polygon" and r.id for r in regions)
    source = {o.name: o for o in read_objects(annotations)}
    expected = source["Tumour bed"].geometry.union(
        next(o for o in source.values() if o.class_name == "Tumor: Positive").geometry)
    assert sum(r.geometry.area for r in regions) == pytest.approx(expected.area)
    assert len(regions) == 3  # the bed's two parts and the Tumor: Positive rectangle


def test_regions_of_every_annotation_rerun_to_the_same_bytes(annotations: Path, env: dict[str, str],
                                                             tmp_path: Path) -> None:
    first, second = tmp_path / "a.geojson", tmp_path / "b.geojson"
    assert run(["qupath", "regions", str(annotations), "--out", str(first)], env).returncode == 0
    proc = run(["qupath", "regions", str(first), "--out", str(second)], env)
    assert proc.returncode == 0, proc.stderr
    assert first.read_bytes() == second.read_bytes()  # regions of regions: same ids, same file
    names = sorted(o.class_name or "" for o in read_objects(annotations) if o.geometry.area > 0)
    assert names == ["Necrosis", "Stroma", "Tumor", "Tumor: Positive"]
    assert len(json.loads(first.read_text())["features"]) == 5  # 2 + 1 + 1 + 1 polygons


@pytest.mark.parametrize(("content", "extra", "pattern"), [
    ("{not json", [], "not a readable JSON file"),
    (json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 0]]]}), [], "degenerate ring"),
    (json.dumps({"type": "Point", "coordinates": [1, 2]}), [], "a Point selects no area"),
    (json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]]}),
     ["--class", "Tumor"], "no annotation of class Tumor"),
    (json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]]}),
     ["--image", "slide.svs"], "--image applies to QuPath projects only"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(env: dict[str, str], tmp_path: Path,
                                                         content: str, extra: list[str],
                                                         pattern: str) -> None:
    source = tmp_path / "in.geojson"
    source.write_text(content)
    out = tmp_path / "out" / "regions.geojson"
    proc = run(["qupath", "regions", str(source), "--out", str(out), *extra], env)
    assert proc.returncode == 2
    assert pattern in one_error_line(proc)
    assert not out.parent.exists()


@pytest.mark.parametrize("name", ["project.qpproj", "project-folder"])
def test_projects_need_an_image_name(env: dict[str, str], tmp_path: Path, name: str) -> None:
    project = tmp_path / name
    if name.endswith(".qpproj"):
        project.write_text("{}")
    else:
        project.mkdir()
    proc = run(["qupath", "regions", str(project), "--out", str(tmp_path / "r.geojson")], env)
    assert proc.returncode == 2
    assert f"{project}: a QuPath project needs --image NAME" in one_error_line(proc)
    assert not (tmp_path / "r.geojson").exists()


@pytest.mark.parametrize(("args", "pattern"), [
    (["qupath:"], "'qupath:': no QuPath project path"),
    (["qupath:/p#"], "'qupath:/p#': empty image name after '#'"),
    (["SLIDE", "--write-back"],
     "--write-back: only for QuPath project sources (qupath:PROJECT_DIR[#IMAGE_NAME])"),
    (["SLIDE", "--regions-from-annotations", "--class", "Tumor"],
     "--regions-from-annotations, --class: only for QuPath project sources"),
    (["qupath:/p", "--class", "Tumor"], "--class selects the annotations of "
     "--regions-from-annotations"),
    (["qupath:/p", "--regions-from-annotations", "--regions", "r.geojson"],
     "give either --regions FILE or --regions-from-annotations, not both"),
])
def test_analyze_qupath_argument_errors_exit_2(env: dict[str, str], tmp_path: Path,
                                               fixture_slide: Callable[[str], Path],
                                               args: list[str], pattern: str) -> None:
    slide = str(fixture_slide("CMU-1-Small-Region.svs"))
    out = tmp_path / "out"
    proc = run(["analyze", *[slide if a == "SLIDE" else a for a in args], "--out", str(out)], env)
    assert proc.returncode == 2
    assert pattern in one_error_line(proc)
    assert not out.exists()


def test_export_refuses_what_is_not_a_result_folder(env: dict[str, str], tmp_path: Path) -> None:
    project = tmp_path / "project"
    proc = run(["qupath", "export", str(tmp_path), "--project", str(project)], env)
    assert proc.returncode == 2
    assert f"{tmp_path}: not an hwsi analyze result folder (no result.json)" in one_error_line(proc)
    assert not project.exists()


def test_invalid_geometry_setting_repairs_or_refuses(env: dict[str, str], tmp_path: Path) -> None:
    source = tmp_path / "bowtie.geojson"
    source.write_text(json.dumps({"type": "Polygon",
                                  "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 20], [0, 0]]]}))
    out = tmp_path / "r.geojson"
    refused = run(["qupath", "regions", str(source), "--out", str(out)],
                  {**env, "HWSI_QUPATH_INVALID_GEOMETRY": "refuse"})
    assert refused.returncode == 2 and "Self-intersection" in one_error_line(refused)
    assert not out.exists()
    repaired = run(["qupath", "regions", str(source), "--out", str(out)], env)
    assert repaired.returncode == 0, repaired.stderr
    assert "repaired invalid Polygon" in repaired.stderr
    assert sum(r.geometry.area for r in read_objects(out)) == pytest.approx(250 / 3)


def test_size_cap_setting_applies(annotations: Path, env: dict[str, str], tmp_path: Path) -> None:
    proc = run(["qupath", "regions", str(annotations), "--out", str(tmp_path / "r.geojson")],
               {**env, "HWSI_QUPATH_MAX_FILE_MB": "0.001"})
    assert proc.returncode == 2 and "HWSI_QUPATH_MAX_FILE_MB" in one_error_line(proc)
