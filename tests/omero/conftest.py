"""OMERO test fixtures: settings with an embedded ledger and broker, one real analysis result.

The write-back and stage tests need a real result folder (``result.json``, ``evidence.geojson``,
the reports): :func:`analysis_result` runs the embedded demo model once per session on the
fixture slide, so the write-back works on what the pipeline really writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from omero_hwsi.settings import Settings, load_settings

CMU = "CMU-1-Small-Region.svs"
WEB_URL = "https://omero.lab/"


@pytest.fixture
def omero_settings(isolated_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                   ) -> Settings:
    """Settings in tmp: the embedded SQLite ledger and broker, an OMERO.web address, a service
    account whose password file holds a recognisable secret (tests check it leaks nowhere)."""
    password = tmp_path / "omero.password"
    password.write_text("s3cret-pw\n")
    for name, value in {"HWSI_EXTRACT_WORKERS": "0", "HWSI_OMERO_WEB_URL": WEB_URL,
                        "HWSI_OMERO_HOST": "omero.lab", "HWSI_OMERO_USER": "hwsi-service",
                        "HWSI_OMERO_PASSWORD_FILE": str(password)}.items():
        monkeypatch.setenv(name, value)
    return load_settings()


@pytest.fixture(scope="session")
def demo_pipeline() -> Any:
    """The embedded demo model, loaded once per session."""
    from omero_hwsi.inference import HwsiPipeline
    from omero_hwsi.plan import default_model

    return HwsiPipeline.from_pretrained(default_model())


@pytest.fixture(scope="session")
def analysis_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings of the session's analyses (a data folder of their own, in-process extraction)."""
    root = tmp_path_factory.mktemp("omero-analysis")
    (root / "none.toml").write_text("")
    return load_settings({"HWSI_DATA_DIR": str(root / "data"),
                          "HWSI_CONFIG": str(root / "none.toml"), "HWSI_EXTRACT_WORKERS": "0"})


@pytest.fixture(scope="session")
def analysis_result(fixture_slide: Any, demo_pipeline: Any, analysis_settings: Settings,
                    tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The result folder of a real report analysis (region evidence) of the fixture slide."""
    from omero_hwsi.analysis import AnalysisRequest, analyze_slide

    out = tmp_path_factory.mktemp("omero-result")
    analyze_slide(fixture_slide(CMU), out, pipeline=demo_pipeline, settings=analysis_settings,
                  request=AnalysisRequest(task="report", evidence="region"))
    return out
