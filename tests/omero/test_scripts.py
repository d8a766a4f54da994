"""The OMERO server scripts: every one parses with omero-py, and none loads heavy modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("omero.scripts", reason="the omero extra (make setup-omero)")

SCRIPTS = sorted((Path(__file__).parents[2] / "scripts" / "omero").rglob("*.py"))


def test_the_three_hwsi_scripts_exist_in_the_menu_folder():
    assert {p.name for p in SCRIPTS if p.parent.name == "HWSI"} >= {
        "Run_Analysis.py", "Job_Status.py", "Report_Index.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_parses_with_omero_scripts_parse_file(script):
    import omero.scripts

    params = omero.scripts.parse_file(str(script))
    assert params.name == script.name
    assert params.description
    assert "__file__" not in script.read_text()  # the server runs the text, not the file


def test_run_analysis_declares_the_selection_and_the_analysis_options():
    import omero.scripts

    params = omero.scripts.parse_file(str(SCRIPTS[0].parent / "Run_Analysis.py"))
    inputs = params.inputs
    assert set(inputs) == {"Data_Type", "IDs", "Task", "Question", "Labels", "Evidence_Depth",
                           "Write_ROIs", "Restrict_To_ROIs"}
    values = {name: [v.getValue() for v in (inputs[name].values.getValue() or [])]
              for name in ("Data_Type", "Task", "Evidence_Depth")}
    assert values == {"Data_Type": ["Image", "Dataset", "Project"],
                      "Task": ["report", "vqa", "caption", "classify"],
                      "Evidence_Depth": ["region", "patch", "cell", "none"]}
    assert not inputs["IDs"].optional and inputs["Question"].optional


def test_report_index_offers_project_or_dataset_and_the_whole_group():
    import omero.scripts

    params = omero.scripts.parse_file(str(SCRIPTS[0].parent / "Report_Index.py"))
    assert set(params.inputs) == {"Data_Type", "IDs", "Whole_Group"}
    assert [v.getValue() for v in params.inputs["Data_Type"].values.getValue()] == \
        ["Project", "Dataset"]


def test_what_the_scripts_import_loads_neither_torch_nor_the_model():
    code = ("import sys, omero.scripts, omero.gateway\n"
            "import omero_hwsi.omero.script_actions, omero_hwsi.omero.scripting\n"
            "import omero_hwsi.settings\n"
            "heavy = [m for m in ('torch', 'transformers', 'omero_hwsi.model', "
            "'omero_hwsi.inference', 'openslide', 'zarr') if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ""
