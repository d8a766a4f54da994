"""A small multi-region feature store for the inference tests."""

from __future__ import annotations

import pytest
from tiny import SMALL_GRID

from omero_hwsi.features.extract import ExtractionConfig, extract_slide
from omero_hwsi.features.store import SlideFeatures, load_features


@pytest.fixture(scope="session")
def small_store(fixture_slide, tmp_path_factory) -> SlideFeatures:
    result = extract_slide(fixture_slide("CMU-1-Small-Region.svs"), tmp_path_factory.mktemp("fs"),
                           grid=SMALL_GRID, config=ExtractionConfig(workers=0, n_candidates=8, k=4))
    return load_features(result.path)
