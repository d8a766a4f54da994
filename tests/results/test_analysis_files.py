"""The result files of ``hwsi analyze``: QuPath GeoJSON, reports, overlay and result.json."""

from __future__ import annotations

import html
import json
import math
import re
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import box, shape

from omero_hwsi import __version__
from omero_hwsi.results import analysis_files
from omero_hwsi.results.analysis_files import ANALYSIS_FILES, write_analysis_files
from omero_hwsi.results.evidence import evidence_features, write_evidence_geojson
from omero_hwsi.results.geojson import feature_id
from omero_hwsi.results.overlay import render_overlay
from omero_hwsi.results.report import render_html, render_markdown
from omero_hwsi.results.schema import (
    EVIDENCE_METHODS,
    RESEARCH_USE,
    AnalysisResult,
    EvidenceItem,
    LabelScore,
    TextMatch,
)

SLIDE = (3000.0, 2000.0)  # level-0 width, height
SCALE = 10.0  # level-0 px per thumbnail px
CHECKSUM = "ab" * 32
QUESTION = 'Is there <script>alert("x")</script> carcinoma & necrosis?'
ANSWER = "Yes: <b>invasive</b> carcinoma " + "with necrosis " * 40


def _box(x: float, y: float, w: float, h: float) -> dict:
    return {"type": "Polygon", "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]}


def _octagon(cx: float, cy: float, r: float) -> dict:
    ring = [[cx + r * math.cos(a), cy + r * math.sin(a)] for a in np.linspace(0, 2 * np.pi, 8, endpoint=False)]
    return {"type": "Polygon", "coordinates": [ring + [ring[0]]]}


def make_result(method: str = "occlusion", **changes: object) -> AnalysisResult:
    """Three regions (one crossing the right border, one outside), patches and nuclei."""
    evidence = [
        EvidenceItem("r0", "region", method, 2.5, _box(0, 0, 1024, 1024)),
        EvidenceItem("r1", "region", method, -1.0, _box(1024, 0, 1024, 1024)),
        EvidenceItem("r2", "region", method, 0.5, _box(2048, 0, 1024, 1024)),  # crosses x = 3000
        EvidenceItem("r9", "region", method, 0.1, _box(3072, 0, 1024, 1024)),  # off the slide
        EvidenceItem("r0.p5", "patch", method, 0.8, _box(256, 256, 256, 256), "r0"),
        EvidenceItem("r0.p6", "patch", method, 1.2, _box(512, 256, 256, 256), "r0"),
        EvidenceItem("r2.p3", "patch", method, 0.3, _box(2816, 0, 256, 256), "r2"),
        EvidenceItem("r0.p6.c0", "cell", method, 0.4, _octagon(600, 300, 8), "r0.p6"),
        EvidenceItem("r0.p6.c1", "cell", method, 0.9, _octagon(700, 400, 8), "r0.p6"),
    ]
    values: dict = {
        "slide": {"slide_id": "case-7", "slide_path": "/data/case-7.svs", "checksum": CHECKSUM,
                  "store": "/stores/abc"},
        "task": "vqa", "question": QUESTION, "answer": ANSWER,
        "model": {"path": "/models/hwsi-tiny", "model_type": "mllm_hwsi", "config_sha256": "cd" * 32,
                  "llm": "llama", "fusion_mode": "resampler", "cell_fusion": "ccaf",
                  "prompt_layout": "hwsi", "parameters": 12345},
        "decoding": {"mode": "greedy", "max_new_tokens": 64, "seed": None},
        "created": "2025-05-01T12:00:00+00:00",
        "evidence": evidence,
        "evidence_methods": {method: EVIDENCE_METHODS[method]},
        "evidence_notes": ["nuclei scored in the top 1 patches only"],
        "timings": {"answer_s": 1.25, "evidence_s": 3.5},
    }
    values.update(changes)
    return AnalysisResult(**values)


@pytest.fixture
def thumbnail() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(180, 230, size=(int(SLIDE[1] / SCALE), int(SLIDE[0] / SCALE), 3), dtype=np.uint8)


PROVENANCE = {
    "slide": {"path": "/data/case-7.svs", "sha256": CHECKSUM, "width": 3000, "height": 2000, "mpp": 0.5},
    "grid": {"region_px": 1024, "patch_px": 256},
    "encoders": {"patch": {"id": "hed_texture", "version": "1", "dim": 32}},
    "store": "/stores/abc",
}


def _strict_json(path: Path) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


# -- evidence.geojson ----------------------------------------------------------------------


def test_evidence_features_carry_qupath_fields():
    features = {f["properties"]["name"]: f for f in evidence_features(make_result(), SLIDE)}
    expected = {"r0": ("annotation", "HWSI evidence region"), "r0.p6": ("tile", "HWSI evidence patch"),
                "r0.p6.c1": ("detection", "HWSI evidence nucleus")}
    for hid, (object_type, class_name) in expected.items():
        props = features[hid]["properties"]
        assert props["objectType"] == object_type
        assert props["classification"]["name"] == class_name
        color = props["classification"]["color"]
        assert len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)
        assert set(props["measurements"]) == {"HWSI evidence (occlusion dlogp)", "HWSI evidence rank"}
        assert uuid.UUID(features[hid]["id"]).version == 5
        meta = props["metadata"]
        assert all(isinstance(v, str) for v in meta.values())
        assert meta["HWSI hierarchy id"] == hid and meta["HWSI method"] == "occlusion"
        assert meta["HWSI model"] == "/models/hwsi-tiny" and meta["HWSI model config sha256"] == "cd" * 32
        assert meta["HWSI task"] == "vqa" and meta["HWSI question"].startswith("Is there <script>")
        assert len(meta["HWSI answer"]) <= 200 and meta["HWSI answer"].endswith("\u2026")
    assert features["r0.p6.c1"]["geometry"]["type"] == "Polygon"
    assert len(features["r0.p6.c1"]["geometry"]["coordinates"][0]) == 9  # the octagon, closed


def test_scores_and_ranks_per_level():
    features = {f["properties"]["name"]: f["properties"]["measurements"]
                for f in evidence_features(make_result(), SLIDE)}
    assert features["r0"] == {"HWSI evidence (occlusion dlogp)": 2.5, "HWSI evidence rank": 1.0}
    assert features["r1"]["HWSI evidence rank"] == 4.0  # r9 (0.1) ranks 3rd though dropped
    assert features["r0.p6"]["HWSI evidence rank"] == 1.0
    assert features["r0.p5"]["HWSI evidence rank"] == 2.0
    assert features["r0.p6.c1"]["HWSI evidence rank"] == 1.0


@pytest.mark.parametrize(("method", "name"), [("grad_x_input", "HWSI evidence (grad x input)"),
                                              ("attention", "HWSI evidence (attention)")])
def test_measurement_is_named_after_the_method(method, name):
    features = evidence_features(make_result(method), SLIDE)
    assert all(name in f["properties"]["measurements"] for f in features)


def test_geometry_is_clipped_to_the_slide():
    features = {f["properties"]["name"]: f for f in evidence_features(make_result(), SLIDE)}
    assert "r9" not in features  # entirely outside the slide: nothing to draw
    for feature in features.values():
        minx, miny, maxx, maxy = shape(feature["geometry"]).bounds
        assert 0 <= minx and 0 <= miny and maxx <= SLIDE[0] and maxy <= SLIDE[1]
    assert shape(features["r2"]["geometry"]).equals(box(2048, 0, 3000, 1024))
    assert shape(features["r2.p3"]["geometry"]).equals(box(2816, 0, 3000, 256))


def test_written_geojson_is_a_valid_feature_collection(tmp_path):
    path = tmp_path / "evidence.geojson"
    assert write_evidence_geojson(make_result(), SLIDE, path) == 8
    doc = _strict_json(path)
    assert doc["type"] == "FeatureCollection"
    assert [f["properties"]["objectType"] for f in doc["features"]] == ["annotation"] * 3 + ["tile"] * 3 + ["detection"] * 2
    for feature in doc["features"]:
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] in ("Polygon", "MultiPolygon")
        geometry = shape(feature["geometry"])
        assert geometry.is_valid and geometry.area > 0
        assert all(isinstance(v, int | float) for v in feature["properties"]["measurements"].values())


def test_feature_ids_are_deterministic_and_distinct():
    result = make_result()
    first = [f["id"] for f in evidence_features(result, SLIDE)]
    assert first == [f["id"] for f in evidence_features(result, SLIDE)]
    assert len(set(first)) == len(first)
    assert feature_id(CHECKSUM, result.created, "occlusion", "r0") in first
    assert feature_id(CHECKSUM, "r0") not in first  # never replaces the hwsi tiles region object
    later = replace(result, created="2025-06-01T00:00:00+00:00")
    assert not set(first) & {f["id"] for f in evidence_features(later, SLIDE)}


def test_nan_score_is_written_as_qupath_nan(tmp_path):
    result = make_result()
    result = replace(result, evidence=[replace(result.evidence[0], score=float("nan"))])
    write_evidence_geojson(result, SLIDE, tmp_path / "e.geojson")
    doc = _strict_json(tmp_path / "e.geojson")
    assert doc["features"][0]["properties"]["measurements"]["HWSI evidence (occlusion dlogp)"] == "NaN"


# -- reports ---------------------------------------------------------------------------------


@pytest.mark.parametrize("render", ["markdown", "html"])
def test_report_states_provenance_and_research_use(render):
    result = make_result()
    text = render_markdown(result) if render == "markdown" else render_html(result, b"\x89PNG")
    for needle in ("/models/hwsi-tiny", "cd" * 32, "llama", "resampler", CHECKSUM, "case-7",
                   __version__, "greedy", "max_new_tokens", "answer_s",
                   "nuclei scored in the top 1 patches only", "r0.p6.c1"):
        assert needle in text, needle
    assert (RESEARCH_USE if render == "markdown" else html.escape(RESEARCH_USE)) in text
    assert "drop in the teacher-forced log-likelihood" in text  # how occlusion was computed


@pytest.mark.parametrize("render", ["markdown", "html"])
def test_report_escapes_question_and_answer(render):
    result = make_result()
    text = render_markdown(result) if render == "markdown" else render_html(result, b"\x89PNG")
    assert "<script>" not in text and "<b>invasive" not in text
    quote = '"' if render == "markdown" else "&quot;"
    assert f"&lt;script&gt;alert({quote}x{quote})&lt;/script&gt; carcinoma &amp; necrosis" in text
    assert "&lt;b&gt;invasive&lt;/b&gt;" in text


def test_markdown_tables_rank_the_top_evidence():
    text = render_markdown(make_result())
    assert "| r0 | 2.5 | 1 | occlusion | - |" in text
    assert "| r0.p6 | 1.2 | 1 | occlusion | r0 |" in text
    assert "![Evidence overlay](overlay.png)" in text


def test_report_lists_label_probabilities_for_classify():
    labels = [LabelScore("invasive carcinoma", -1.2, 0.75), LabelScore("normal", -2.3, 0.25)]
    result = make_result(task="classify", answer="invasive carcinoma", labels=labels)
    text = render_markdown(result)
    assert "| invasive carcinoma | 0.75 | -1.2 |" in text and "| normal | 0.25 | -2.3 |" in text


def test_report_lists_text_similarities_for_retrieve():
    matches = [TextMatch("necrosis", 0.42), TextMatch("normal breast", -0.1)]
    result = make_result(task="retrieve", answer="necrosis", matches=matches, evidence=[],
                         evidence_methods={})
    text = render_markdown(result)
    assert "| necrosis | 0.42 |" in text and "| normal breast | -0.1 |" in text
    assert "none: no evidence was computed" in text and "overlay.png" not in text


def test_html_report_is_self_contained():
    png = b"\x89PNG\r\n\x1a\nfake"
    text = render_html(make_result(), png)
    assert "http://" not in text and "https://" not in text
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")
    assert "<link" not in text and "url(" not in text and "@import" not in text


# -- overlay ----------------------------------------------------------------------------------


def test_overlay_keeps_the_thumbnail_size_and_tints_by_sign(thumbnail):
    image = render_overlay(thumbnail, SCALE, make_result())
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert image.size == (thumbnail.shape[1], thumbnail.shape[0])
    pixels = np.asarray(image).astype(int)
    r, g, b = pixels[10, 90]  # inside r0 (score +2.5, the strongest): red
    assert r > b + 60
    r, g, b = pixels[10, 190]  # inside r1 (score -1.0): blue
    assert b > r + 30
    assert (pixels[150, 150] == thumbnail[150, 150]).all()  # below the regions: untouched


def test_overlay_refuses_a_bad_thumbnail():
    with pytest.raises(ValueError, match="RGB"):
        render_overlay(np.zeros((10, 10), dtype=np.uint8), SCALE, make_result())


# -- the five files ---------------------------------------------------------------------------


def test_write_analysis_files_writes_the_five_files(tmp_path, thumbnail):
    out = tmp_path / "analysis"
    written = write_analysis_files(make_result(), out, thumbnail=thumbnail, level0_per_px=SCALE,
                                   slide_size=SLIDE, provenance=PROVENANCE)
    assert written == [out / name for name in ANALYSIS_FILES]
    assert sorted(p.name for p in out.iterdir()) == sorted(ANALYSIS_FILES)  # no staging left
    with Image.open(out / "overlay.png") as image:
        assert image.size == (thumbnail.shape[1], thumbnail.shape[0])
    assert len(_strict_json(out / "evidence.geojson")["features"]) == 8
    assert "![Evidence overlay](overlay.png)" in (out / "report.md").read_text(encoding="utf-8")
    html_text = (out / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html_text


def test_result_json_round_trips(tmp_path, thumbnail):
    result = make_result()
    write_analysis_files(result, tmp_path, thumbnail=thumbnail, level0_per_px=SCALE,
                         slide_size=SLIDE, provenance=PROVENANCE)
    doc = _strict_json(tmp_path / "result.json")
    assert doc["schema_version"] == 1
    assert doc["provenance"] == PROVENANCE
    for key in ("task", "question", "answer", "evidence", "model", "provenance", "timings"):
        assert key in doc
    assert isinstance(doc["evidence"], list) and doc["evidence"][0]["id"] == "r0"
    rest = {k: v for k, v in doc.items() if k not in ("schema_version", "provenance")}
    assert AnalysisResult.from_dict(rest) == result


def test_rerun_replaces_the_files(tmp_path, thumbnail):
    kwargs = {"thumbnail": thumbnail, "level0_per_px": SCALE, "slide_size": SLIDE, "provenance": PROVENANCE}
    write_analysis_files(make_result(), tmp_path, **kwargs)
    write_analysis_files(make_result(answer="No."), tmp_path, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(ANALYSIS_FILES)
    assert _strict_json(tmp_path / "result.json")["answer"] == "No."


def test_failure_midway_leaves_nothing(tmp_path, thumbnail, monkeypatch):
    def broken(*args: object, **kwargs: object) -> str:
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(analysis_files, "render_html", broken)
    kwargs = {"thumbnail": thumbnail, "level0_per_px": SCALE, "slide_size": SLIDE, "provenance": PROVENANCE}
    out = tmp_path / "new"
    with pytest.raises(RuntimeError, match="renderer crashed"):
        write_analysis_files(make_result(), out, **kwargs)
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="renderer crashed"):
        write_analysis_files(make_result(), existing, **kwargs)
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(("change", "message"), [
    ({"slide_size": (0.0, 2000.0)}, "slide size"),
    ({"level0_per_px": 0.0}, "level0_per_px"),
    ({"thumbnail": np.zeros((4, 4, 4), dtype=np.uint8)}, "RGB"),
])
def test_bad_arguments_write_nothing(tmp_path, thumbnail, change, message):
    kwargs = {"thumbnail": thumbnail, "level0_per_px": SCALE, "slide_size": SLIDE,
              "provenance": PROVENANCE, **change}
    with pytest.raises(ValueError, match=message):
        write_analysis_files(make_result(), tmp_path / "out", **kwargs)
    assert not any(tmp_path.iterdir())


def test_non_finite_numbers_keep_result_json_strict(tmp_path, thumbnail):
    result = make_result(timings={"answer_s": float("inf")})
    write_analysis_files(result, tmp_path, thumbnail=thumbnail, level0_per_px=SCALE,
                         slide_size=SLIDE, provenance=PROVENANCE)
    assert _strict_json(tmp_path / "result.json")["timings"] == {"answer_s": None}


def test_result_writers_import_without_torch():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # as on an install without the worker extra\n"
        "import omero_hwsi.results.analysis_files, omero_hwsi.results.evidence\n"
        "import omero_hwsi.results.overlay, omero_hwsi.results.report\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
