from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from omero_hwsi.errors import ConfigError
from omero_hwsi.settings import Settings, env_var, load_settings

DOCS = Path(__file__).parent.parent / "docs" / "configuration.md"


def test_defaults_put_features_and_models_under_the_data_dir(tmp_path):
    s = load_settings({"HWSI_DATA_DIR": str(tmp_path)})
    assert s.data_dir == tmp_path
    assert s.features_path == tmp_path / "features"
    assert s.models_path == tmp_path / "models"
    assert (s.target_mpp, s.region_px, s.patch_px) == (0.5, 4096, 256)


def test_empty_environment_value_counts_as_unset(tmp_path):
    s = load_settings({"HWSI_DATA_DIR": str(tmp_path), "HWSI_TARGET_MPP": "  ", "HWSI_FEATURE_DIR": ""})
    assert s.target_mpp == 0.5
    assert s.features_path == tmp_path / "features"


def test_environment_beats_toml_and_toml_paths_are_relative_to_the_file(tmp_path):
    config = tmp_path / "conf" / "hwsi.toml"
    config.parent.mkdir()
    config.write_text('data_dir = "data"\ntarget_mpp = 0.25\nextract_workers = 1\n')
    s = load_settings({"HWSI_CONFIG": str(config), "HWSI_TARGET_MPP": "1.0"})
    assert s.config == config
    assert s.data_dir == tmp_path / "conf" / "data"
    assert s.target_mpp == 1.0
    assert s.extract_workers == 1


def test_unknown_toml_key_is_refused_with_its_name(tmp_path):
    config = tmp_path / "hwsi.toml"
    config.write_text("target_mmp = 0.5\n")
    with pytest.raises(ConfigError, match="target_mmp"):
        load_settings({"HWSI_CONFIG": str(config)})


def test_missing_config_file_named_in_the_error(tmp_path):
    with pytest.raises(ConfigError, match="nothere.toml"):
        load_settings({"HWSI_CONFIG": str(tmp_path / "nothere.toml")})


@pytest.mark.parametrize(
    ("var", "value", "pattern"),
    [
        ("HWSI_TARGET_MPP", "fast", "HWSI_TARGET_MPP"),
        ("HWSI_TARGET_MPP", "-1", "target_mpp"),
        ("HWSI_PATCH_PX", "300", "must divide"),
        ("HWSI_EXTRACT_WORKERS", "1.5", "HWSI_EXTRACT_WORKERS"),
        ("HWSI_PATCHES_PER_REGION", "64", "patches_per_region"),
        ("HWSI_LOG_LEVEL", "LOUD", "log_level"),
    ],
)
def test_bad_values_give_one_line_config_errors(tmp_path, var, value, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        load_settings({"HWSI_DATA_DIR": str(tmp_path), var: value})
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_settings_are_frozen(tmp_path):
    s = load_settings({"HWSI_DATA_DIR": str(tmp_path)})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.target_mpp = 1.0  # type: ignore[misc]


def test_every_setting_is_documented():
    text = DOCS.read_text(encoding="utf-8")
    documented = set(re.findall(r"`(HWSI_[A-Z_]+)`", text))
    expected = {env_var(f.name) for f in dataclasses.fields(Settings)}
    assert expected <= documented, f"undocumented: {sorted(expected - documented)}"
