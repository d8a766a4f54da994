"""TrainConfig from TOML: defaults per stage, one-line errors naming the key, docs in step."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from omero_hwsi.errors import ConfigError
from omero_hwsi.training.config import TrainConfig, load_train_config

DOCS = Path(__file__).parents[2] / "docs" / "training.md"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "train.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


STAGE2 = 'stage = 2\nmodel = "stage1/final"\ntrain = "train.json"\nfeature_dir = "/data/features"\n'


def test_every_key_is_documented_and_every_documented_key_exists():
    table = DOCS.read_text(encoding="utf-8").split("## Keys", 1)[1]
    documented = re.findall(r"^\| `([a-z_]+)` \|", table, re.M)
    assert sorted(documented) == sorted(f.name for f in dataclasses.fields(TrainConfig))


def test_relative_paths_are_taken_from_the_file_and_stage_defaults_apply(tmp_path):
    config = load_train_config(write(tmp_path, STAGE2))
    assert config.model == tmp_path / "conf" / "stage1" / "final"
    assert config.feature_dir == Path("/data/features")
    assert config.loss_weights == (0.7, 2.0, 0.25)
    assert config.uses_contrastive and not config.uses_lora
    stage3 = load_train_config(write(tmp_path, STAGE2.replace("stage = 2", "stage = 3")))
    assert stage3.loss_weights == (0.7, 0.2, 0.07) and stage3.uses_lora
    assert stage3.lora_r == 128 and stage3.lora_alpha == 256 and stage3.merge_lora


def test_stage_one_has_no_lm_term_and_stage_zero_only_lm(tmp_path):
    one = load_train_config(write(tmp_path, STAGE2.replace("stage = 2", "stage = 1") + "lm_weight = 3.0\n"))
    assert one.loss_weights == (0.0, 2.0, 0.25)
    zero = load_train_config(write(tmp_path, 'stage = 0\nmodel = "m"\ncorpus = "c.txt"\n'))
    assert zero.loss_weights == (1.0, 0.0, 0.0) and not zero.uses_contrastive


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        ("learning_rate = 0.1\n", "unknown key.*learning_rate"),
        ("lr = -1.0\n", "lr: must be > 0"),
        ('lr = "fast"\n', "lr: 'fast' is not a valid float"),
        ("batch_size = 2.5\n", "batch_size: 2.5 is not a valid int"),
        ("lora = 1\n", "lora: 1 is not a valid bool"),
        ('schedule = "step"\n', "schedule: must be one of cosine, linear, constant"),
        ('precision = "fp16"\n', "precision: must be one of auto, fp32, bf16"),
        ("batch_size = 1\n", "batch_size: 1 leaves the contrastive loss without in-batch negatives"),
        ("val_fraction = 1.0\n", r"val_fraction: must be in \[0, 1\)"),
        ("lora_targets = [1]\n", "lora_targets: .* is not a list of strings"),
        ('model_config = "c.json"\n', "model and model_config: give one"),
    ],
)
def test_bad_keys_and_values_are_one_line_config_errors(tmp_path, extra, pattern):
    path = write(tmp_path, STAGE2 + extra)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_train_config(path)
    assert "\n" not in str(info.value) and info.value.exit_code == 2
    assert str(info.value).startswith(str(path))


def test_batch_of_one_is_fine_without_a_contrastive_term(tmp_path):
    config = load_train_config(write(tmp_path, STAGE2 + "batch_size = 1\ncontrastive_weight = 0.0\n"))
    assert config.batch_size == 1 and not config.uses_contrastive


@pytest.mark.parametrize(
    ("text", "stage", "pattern"),
    [
        (STAGE2, 3, r"stage = 2 does not match --stage 3"),
        (STAGE2.replace("stage = 2\n", ""), None, "stage: missing"),
        ('stage = 0\nmodel = "m"\n', None, "corpus: missing"),
        ('stage = 2\nmodel = "m"\nfeature_dir = "f"\n', None, "train: missing"),
        ('stage = 2\nmodel_config = "c.json"\ntokenizer = "t"\ntrain = "t"\nfeature_dir = "f"\n', None,
         "model_config: stage 2 must start from the previous stage's folder"),
        ('stage = 1\nmodel_config = "c.json"\ntrain = "t"\nfeature_dir = "f"\n', None, "tokenizer: missing"),
    ],
)
def test_stage_needs_and_stage_agreement(tmp_path, text, stage, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_train_config(write(tmp_path, text), stage=stage)


def test_stage_from_the_command_line_and_overrides(tmp_path):
    path = write(tmp_path, STAGE2.replace("stage = 2\n", ""))
    config = load_train_config(path, stage=2, output_dir=tmp_path / "elsewhere")
    assert config.stage == 2 and config.output_dir == tmp_path / "elsewhere"
    assert config.to_dict()["lora_targets"][0] == "q_proj"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_train_config(tmp_path / "none.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_train_config(write(tmp_path, "stage = = 2"))
