"""`hwsi analyze`: one command from slide to result files, with the model's grid and encoders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import SMALL_GRID, save_tiny, tiny_model
from typer.testing import CliRunner

from omero_hwsi.cli import app
from omero_hwsi.features.extract import ExtractionConfig, extract_slide
from omero_hwsi.features.store import load_features
from omero_hwsi.model.compat import feature_signature

FILES = {"result.json", "evidence.geojson", "report.md", "report.html", "overlay.png"}


@pytest.fixture(scope="module")
def model_dir(fixture_slide, tmp_path_factory) -> Path:
    """A tiny model that records the built-in encoders on the 1024/256 px grid."""
    store = extract_slide(fixture_slide("CMU-1-Small-Region.svs"), tmp_path_factory.mktemp("fs"),
                          grid=SMALL_GRID, config=ExtractionConfig(workers=0, n_candidates=8, k=4))
    expected = feature_signature(load_features(store.path).provenance)
    return save_tiny(tmp_path_factory.mktemp("model"), *tiny_model(expected_features=expected))


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_analyze_writes_every_result_file_on_the_models_grid(fixture_slide, model_dir, tmp_path,
                                                            isolated_env, monkeypatch):
    monkeypatch.setenv("HWSI_EXTRACT_WORKERS", "0")
    monkeypatch.setenv("HWSI_CANDIDATES_PER_REGION", "8")
    monkeypatch.setenv("HWSI_PATCHES_PER_REGION", "4")
    slide = fixture_slide("CMU-1-Small-Region.svs")
    out = tmp_path / "out"
    result = _run("analyze", str(slide), "--model", str(model_dir), "--out", str(out),
                  "-q", "Is there tumour?", "--max-new-tokens", "4", "--evidence", "patch")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert {p.name for p in out.iterdir()} == FILES
    doc = json.loads((out / "result.json").read_text())
    for key in ("schema_version", "task", "question", "answer", "evidence", "model", "provenance",
                "timings"):
        assert key in doc
    assert doc["provenance"]["grid"]["region_px"] == 1024  # the model's grid, not the default
    assert {e["level"] for e in doc["evidence"]} == {"region", "patch"}
    assert doc["timings"]["total_s"] > 0
    # A second run reuses the feature store.
    again = _run("analyze", str(slide), "--model", str(model_dir), "--out", str(tmp_path / "b"),
                 "-q", "Is there tumour?", "--max-new-tokens", "4", "--evidence", "region")
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "b" / "result.json").read_text())["provenance"]["features_reused"]


def test_regions_file_limits_the_analysis(fixture_slide, model_dir, tmp_path, isolated_env, monkeypatch):
    monkeypatch.setenv("HWSI_EXTRACT_WORKERS", "0")
    slide = fixture_slide("CMU-1-Small-Region.svs")
    regions = tmp_path / "regions.geojson"
    area = {"type": "Polygon", "coordinates": [[[100, 100], [900, 100], [900, 900], [100, 900],
                                                [100, 100]]]}
    regions.write_text(json.dumps({"type": "Feature", "geometry": area, "properties": {}}))
    out = tmp_path / "out"
    result = _run("analyze", str(slide), "--model", str(model_dir), "--out", str(out),
                  "--task", "classify", "--labels", "tumour,normal", "--regions", str(regions),
                  "--evidence", "region")
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "result.json").read_text())
    assert doc["answer"] in ("tumour", "normal") and len(doc["labels"]) == 2
    assert [e["id"] for e in doc["evidence"]] == ["r0"]  # only the region the area touches


def test_bad_requests_fail_before_writing(fixture_slide, model_dir, tmp_path, isolated_env):
    slide = fixture_slide("CMU-1-Small-Region.svs")
    copy = tmp_path / "other" / slide.name
    copy.parent.mkdir()
    copy.write_bytes(slide.read_bytes())
    out = tmp_path / "out"
    clash = _run("analyze", str(slide), str(copy), "--model", str(model_dir), "--out", str(out),
                 "-q", "Q?")
    assert clash.exit_code == 2 and "share the name" in clash.stderr and not out.exists()
    bad = _run("analyze", str(slide), "--model", str(model_dir), "--out", str(out), "--evidence", "all")
    assert bad.exit_code == 2 and "--evidence must be one of" in bad.stderr
    missing = _run("analyze", str(tmp_path / "nope.svs"), "--model", str(model_dir), "--out", str(out))
    assert missing.exit_code == 2 and "not found" in missing.stderr
    regions = tmp_path / "r.geojson"
    regions.write_text("[]")
    empty = _run("analyze", str(slide), "--model", str(model_dir), "--out", str(out), "-q", "Q?",
                 "--regions", str(regions))
    assert empty.exit_code == 2 and "no polygon" in empty.stderr and not out.exists()
