"""The code itself: lint-clean and type-checked under mypy --strict (the core's contract)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_package_type_checks_strictly():
    proc = subprocess.run([sys.executable, "-m", "mypy", "omero_hwsi", "qupath_bridge"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_code_is_lint_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "omero_hwsi", "qupath_bridge",
                           "tests", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
