from __future__ import annotations

import subprocess
import sys

import pytest

from omero_hwsi import errors
from omero_hwsi._deps import require


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (errors.SlideOpenError, 2), (errors.MppError, 2), (errors.NoTissueError, 2),
        (errors.GeoJSONError, 2), (errors.ConfigError, 2),
        (errors.ModelFileNotFoundError, 3), (errors.UnknownEncoderError, 3),
        (errors.MissingExtraError, 3), (errors.CheckpointMismatchError, 3),
        (errors.OmeroConnectionError, 4), (errors.JobNotFoundError, 5),
    ],
)
def test_each_error_family_has_its_exit_code(cls, code):
    assert cls("x").exit_code == code
    assert issubclass(cls, errors.HwsiError)


def test_messages_are_one_line():
    err = errors.SlideReadError("a.svs: cannot read\n  because\tof this")
    assert str(err) == "a.svs: cannot read because of this"


def test_not_found_is_also_a_builtin():
    assert issubclass(errors.SlideNotFoundError, FileNotFoundError)


def test_missing_extra_names_the_extra():
    with pytest.raises(errors.MissingExtraError, match=r"omero-hwsi\[worker\]"):
        require("no_such_module_hwsi", extra="worker", purpose="training")


def test_core_modules_import_without_torch():
    code = (
        "import sys\n"
        "import omero_hwsi.cli, omero_hwsi.settings, omero_hwsi.slide.local, omero_hwsi.slide.hierarchy\n"
        "import omero_hwsi.slide.nuclei, omero_hwsi.results.tiles, omero_hwsi.synthetic.svs\n"
        "import omero_hwsi.features.extract, omero_hwsi.features.store, qupath_bridge\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_key_error_subclasses_print_unquoted():
    assert str(errors.UnknownEncoderError("unknown encoder 'x'")) == "unknown encoder 'x'"
