"""`hwsi synth`: seeded synthetic slides with ground truth from the command line."""

from __future__ import annotations

import hashlib
import json

from typer.testing import CliRunner

from omero_hwsi.cli import app


def test_synth_writes_a_reproducible_test_set(tmp_path, isolated_env):
    runner = CliRunner()
    first = runner.invoke(app, ["synth", "--out", str(tmp_path / "a"), "--seed", "3"])
    assert first.exit_code == 0, first.output
    (slide,) = first.stdout.split()
    assert slide.endswith(".svs")
    rows = [json.loads(x) for x in (tmp_path / "a" / "test.jsonl").read_text().splitlines()]
    assert rows and all("T-answer" in r and "metadata" in r for r in rows)
    assert (tmp_path / "a" / "truth").is_dir() and (tmp_path / "a" / "scale_texts.jsonl").is_file()
    again = runner.invoke(app, ["synth", "--out", str(tmp_path / "b"), "--seed", "3"])
    (other,) = again.stdout.split()
    digest = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (slide, other)]
    assert digest[0] == digest[1]
    bad = runner.invoke(app, ["synth", "--out", str(tmp_path / "c"), "--split", "validation"])
    assert bad.exit_code == 2 and "--split must be" in bad.stderr
    wrong = runner.invoke(app, ["synth", "--out", str(tmp_path / "d"), "--mpp", "0.3"])
    assert wrong.exit_code == 2 and "\n" not in wrong.stderr.strip()
