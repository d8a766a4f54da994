from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HWSI = [sys.executable, "-m", "omero_hwsi.cli"]


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HWSI, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture
def env(isolated_env: Path) -> dict[str, str]:
    return {**os.environ, "HWSI_EXTRACT_WORKERS": "0", "COLUMNS": "200"}


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_info_prints_levels_and_json(fixture_slide, env):
    proc = run(["info", str(fixture_slide("CMU-1-Small-Region.svs"))], env)
    assert proc.returncode == 0, proc.stderr
    assert "2220 x 2967 px" in proc.stdout and "aperio" in proc.stdout and "0.499" in proc.stdout
    data = json.loads(run(["info", str(fixture_slide("boxes.tiff")), "--mpp", "0.5", "--json"], env).stdout)
    assert data["mpp"] == 0.5 and data["mpp_source"] == "override" and data["level_count"] == 4


def test_info_works_on_a_tiny_slide(fixture_slide, env):
    proc = run(["info", str(fixture_slide("small.svs"))], env)
    assert proc.returncode == 0 and "16 x 16 px" in proc.stdout


@pytest.mark.parametrize(
    ("command", "name", "extra", "code", "pattern"),
    [
        ("info", "missing.svs", [], 2, "no such file"),
        ("info", "boxes.tiff", [], 2, "implausible.*--mpp"),
        ("info", "unopenable.tiff", [], 2, "unsupported"),
        ("info", "broken.svs", [], 2, "unsupported"),
        ("info", "unreadable.svs", [], 2, "cannot read"),
        ("info", "CMU-1-Small-Region.svs", ["--mpp", "-1"], 2, "positive"),
        ("info", "CMU-1-Small-Region.svs", ["--mpp", "0"], 2, "positive"),
        ("tiles", "small.svs", [], 2, "smaller than one patch"),
        ("tiles", "boxes.tiff", ["--mpp", "0.5"], 2, "smaller than one patch"),
        ("tiles", "boxes.tiff", [], 2, "implausible"),
        ("extract", "unreadable.svs", [], 2, "cannot read"),
        ("extract", "small.svs", [], 2, "smaller than one patch"),
        ("extract", "unopenable.tiff", [], 2, "unsupported"),
        ("extract", "missing.svs", [], 2, "no such file"),
    ],
)
def test_bad_input_is_one_line_nonzero_and_writes_nothing(
    fixture_slide, env, tmp_path, command, name, extra, code, pattern
):
    import re

    slide = fixture_slide(name) if name != "missing.svs" else tmp_path / "missing.svs"
    out = tmp_path / "out"
    args = [command, str(slide), *extra]
    if command in ("tiles", "extract"):
        args += ["--out", str(out)]
    proc = run(args, env)
    assert proc.returncode == code
    assert re.search(pattern, one_error_line(proc))
    assert not out.exists() or not any(out.iterdir())
    features = Path(env["HWSI_DATA_DIR"]) / "features"
    assert not features.exists() or not [p for p in features.iterdir() if not p.name.startswith(".")]


def test_not_a_slide_is_refused(env, tmp_path):
    text = tmp_path / "report.txt"
    text.write_text("not a slide")
    proc = run(["extract", str(text), "--out", str(tmp_path / "o")], env)
    assert proc.returncode == 2 and "report.txt" in one_error_line(proc)


def test_blank_slide_has_no_tissue(synthetic_slide, env, tmp_path):
    proc = run(["tiles", str(synthetic_slide(width=3000, height=3000, content="blank")),
                "--out", str(tmp_path / "t")], env)
    assert proc.returncode == 2 and "no tissue" in one_error_line(proc)
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())


def test_bad_setting_is_a_one_line_error(fixture_slide, env):
    proc = run(["info", str(fixture_slide("small.svs"))], {**env, "HWSI_TARGET_MPP": "fast"})
    assert proc.returncode == 2 and "HWSI_TARGET_MPP" in one_error_line(proc)


def test_tiles_writes_clipped_qupath_geojson(fixture_slide, env, tmp_path):
    out = tmp_path / "tiles"
    proc = run(["tiles", str(fixture_slide("CMU-1-Small-Region.svs")), "--out", str(out)], env)
    assert proc.returncode == 0, proc.stderr
    written = [Path(p).name for p in proc.stdout.split()]
    assert written == ["tissue.geojson", "regions.geojson", "patches.geojson", "nuclei.geojson",
                       "thumbnail.png"]
    for name in written[:4]:
        doc = json.loads((out / name).read_text())
        assert doc["type"] == "FeatureCollection" and doc["features"]
        for feature in doc["features"]:
            xs, ys = _coords(feature["geometry"])
            assert min(xs) >= 0 and max(xs) <= 2220 and min(ys) >= 0 and max(ys) <= 2967
            assert feature["properties"]["objectType"] in {"annotation", "tile", "detection"}
    (region,) = json.loads((out / "regions.geojson").read_text())["features"]
    assert region["properties"]["name"] == "r0"
    assert region["properties"]["box"] == [0, 0, 4096, 4096]  # padded box kept as a property
    patches = json.loads((out / "patches.geojson").read_text())["features"]
    selected = [f for f in patches if f["properties"]["classification"]["name"] == "Selected patch"]
    assert len(selected) == 16
    nuclei = json.loads((out / "nuclei.geojson").read_text())["features"]
    selected_ids = {f["properties"]["name"] for f in selected}
    assert {n["properties"]["name"].rsplit(".", 1)[0] for n in nuclei} <= selected_ids
    assert "area_um2" in nuclei[0]["properties"]["measurements"]

    from PIL import Image

    assert Image.open(out / "thumbnail.png").size[0] > 100

    again = run(["tiles", str(fixture_slide("CMU-1-Small-Region.svs")), "--out", str(out)], env)
    assert again.returncode == 0
    assert json.loads((out / "nuclei.geojson").read_text()) == {"type": "FeatureCollection",
                                                                 "features": nuclei}


def test_extract_several_slides_and_folders(fixture_slide, env, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(fixture_slide("CMU-1-Small-Region.svs"), folder / "a.svs")
    (folder / "README.txt").write_text("not a slide: skipped in folders")
    out = tmp_path / "features"
    proc = run(["extract", str(folder), str(fixture_slide("CMU-1-Small-Region.svs")),
                "--out", str(out)], env)
    assert proc.returncode == 0, proc.stderr
    paths = proc.stdout.split()
    assert len(paths) == 2 and paths[0] == paths[1]  # same content -> same store
    assert (Path(paths[0]) / "manifest.json").is_file()
    assert "already complete" in proc.stderr


def test_extract_defaults_to_the_feature_dir(fixture_slide, env):
    proc = run(["extract", str(fixture_slide("CMU-1-Small-Region.svs"))], env)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).parent == Path(env["HWSI_DATA_DIR"]) / "features"


def _coords(geometry: dict) -> tuple[list[float], list[float]]:
    flat: list[list[float]] = []

    def walk(c):
        if isinstance(c[0], (int, float)):
            flat.append(c)
        else:
            for x in c:
                walk(x)

    walk(geometry["coordinates"])
    return [p[0] for p in flat], [p[1] for p in flat]
