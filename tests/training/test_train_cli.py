"""``hwsi train`` through typer's CliRunner: the final folder on stdout, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from toy_training import ANSWERS, write_model_config
from typer.testing import CliRunner

from omero_hwsi.cli import app
from omero_hwsi.model import HwsiForConditionalGeneration


@pytest.fixture
def runner(isolated_env: Path) -> CliRunner:
    return CliRunner()


def stage0_config(tmp_path: Path, extra: str = "") -> Path:
    config_json, tokenizer = write_model_config(tmp_path / "new")
    (tmp_path / "corpus.txt").write_text("\n".join(ANSWERS * 3), encoding="utf-8")
    path = tmp_path / "new" / "stage0.toml"  # relative paths are taken from the file's folder
    path.write_text(
        f'stage = 0\nmodel_config = "{config_json.name}"\ntokenizer = "{tokenizer.name}"\n'
        'corpus = "../corpus.txt"\nbatch_size = 2\nmax_length = 16\nmax_steps = 2\n'
        'warmup_steps = 0\nsave_every = 1\nval_fraction = 0.2\n' + extra, encoding="utf-8")
    return path


def test_train_prints_the_final_folder(runner, tmp_path):
    config = stage0_config(tmp_path)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--stage", "0", "--config", str(config), "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    final = Path(result.stdout.strip().splitlines()[-1])
    assert final == out / "final" and (final / "training_summary.json").is_file()
    assert HwsiForConditionalGeneration.from_pretrained(final) is not None
    assert (out / "checkpoint-1").is_dir() and (out / "metrics.jsonl").is_file()
    again = runner.invoke(app, ["train", "--config", str(config), "--output-dir", str(out), "--resume"])
    assert again.exit_code == 2 and "already holds a finished run" in again.stderr


@pytest.mark.parametrize(
    ("extra", "args", "message"),
    [
        ("warmup = 3\n", [], "unknown key(s) warmup"),
        ("", ["--stage", "2"], "stage = 0 does not match --stage 2"),
        ('schedule = "exp"\n', [], "schedule: must be one of"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(runner, tmp_path, extra, args, message):
    config = stage0_config(tmp_path, extra)
    result = runner.invoke(app, ["train", "--config", str(config), "--output-dir",
                                 str(tmp_path / "run"), *args])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "run").exists()
