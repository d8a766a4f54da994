from __future__ import annotations

import copy

import pytest

from omero_hwsi.errors import FeatureStoreError
from omero_hwsi.model.compat import check_features, feature_signature

MANIFEST = {
    "encoders": {
        "patch": {"id": "hed_texture", "version": "1", "dim": 32, "name": "hed_texture"},
        "region": {"id": "layout", "version": "1", "dim": 64, "name": "layout"},
        "nucleus": {"id": "classical", "version": "1", "dim": 11, "descriptor_names": []},
        "wsi": {"id": "mean_of_regions", "version": "1", "dim": 64},
    },
    "grid": {"target_mpp": 0.5, "region_px": 4096, "patch_px": 256, "min_tissue_fraction": 0.25,
             "level0_per_px": 1.0, "rows": 1, "cols": 1},
}


def test_a_store_made_the_same_way_fits():
    check_features(feature_signature(MANIFEST), MANIFEST, store="s")
    check_features(None, MANIFEST, store="s")


@pytest.mark.parametrize(
    ("path", "value", "pattern"),
    [
        (("encoders", "patch", "id"), "conch_v1", "patch hed_texture v1.*patch conch_v1 v1"),
        (("encoders", "nucleus", "version"), "2", "nucleus classical v1.*nucleus classical v2"),
        (("grid", "target_mpp"), 0.25, "at 0.5 um/px.*at 0.25 um/px"),
    ],
)
def test_a_store_made_differently_is_refused_naming_both(path, value, pattern):
    other = copy.deepcopy(MANIFEST)
    node = other
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(FeatureStoreError, match=pattern) as info:
        check_features(feature_signature(MANIFEST), other, store="/stores/abc")
    assert str(info.value).startswith("/stores/abc: the model expects")


def test_parameters_that_do_not_change_features_are_ignored():
    other = copy.deepcopy(MANIFEST)
    other["grid"]["rows"] = 7
    other["encoders"]["patch"]["name"] = "alias"
    check_features(feature_signature(MANIFEST), other, store="s")


def test_real_store_signature(fixture_slide, tmp_path):
    from omero_hwsi.features.extract import ExtractionConfig, extract_slide
    from omero_hwsi.features.store import load_features

    result = extract_slide(fixture_slide("CMU-1-Small-Region.svs"), tmp_path,
                           config=ExtractionConfig(workers=0, segmenter=None))
    features = load_features(result.path)
    signature = feature_signature(features.provenance)
    assert signature["patch"] == {"id": "hed_texture", "version": "1", "dim": 32}
    assert signature["grid"] == {"target_mpp": 0.5, "region_px": 4096, "patch_px": 256}

    from omero_hwsi.model.processing_hwsi import visual_inputs

    assert visual_inputs(features, expected=signature)["region"].shape == (1, 64)
    other = copy.deepcopy(signature)
    other["region"]["id"] = "hipt_4k"
    with pytest.raises(FeatureStoreError, match="hipt_4k"):
        visual_inputs(features, expected=other)
