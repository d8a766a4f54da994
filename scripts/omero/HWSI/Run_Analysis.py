#!/usr/bin/env python
"""HWSI > Run Analysis: queue MLLM-HWSI analyses of the selected slides on the GPU workers.

The script only validates the form, resolves the selection to slide pyramids, records one job
per image and returns at once with the job ids. Workers run each analysis and write the results
back onto the image as the user who ran this script: evidence regions as ROIs, the evidence
GeoJSON, a report (Markdown and HTML) and provenance key-values. Research use only.

Install: the OMERO server's Python needs ``pip install 'omero-hwsi[jobs]'`` and the same
settings as the workers (``HWSI_CONFIG`` or ``/etc/omero-hwsi.toml``); see docs/omero.md.
"""

from omero import scripts
from omero.rtypes import rlong, rstring

from omero_hwsi.omero.scripting import SCRIPT_INFO, run_script

TASKS = ["report", "vqa", "caption", "classify"]
DEPTHS = ["region", "patch", "cell", "none"]


def main():
    client = scripts.client(
        "Run_Analysis.py",
        "Analyse whole-slide images with MLLM-HWSI on the GPU workers: an answer or report "
        "grounded in the regions, patches and cells behind it. Returns at once; results appear "
        "on each image when its job ends (HWSI > Job Status). Research use only.",
        scripts.String("Data_Type", optional=False, grouping="1", default="Image",
                       values=[rstring("Image"), rstring("Dataset"), rstring("Project")],
                       description="What the IDs are"),
        scripts.List("IDs", optional=False, grouping="2",
                     description="Images, datasets or projects to analyse").ofType(rlong(0)),
        scripts.String("Task", optional=False, grouping="3", default="report",
                       values=[rstring(t) for t in TASKS],
                       description="report, vqa (needs a Question), caption, classify (needs "
                                   "Labels)"),
        scripts.String("Question", optional=True, grouping="4",
                       description="The question for vqa (optional prompt for the others)"),
        scripts.String("Labels", optional=True, grouping="5",
                       description="Comma-separated candidate labels for classify"),
        scripts.String("Evidence_Depth", optional=False, grouping="6", default="region",
                       values=[rstring(d) for d in DEPTHS],
                       description="How deep the evidence goes: regions, then patches of the "
                                   "top regions, then nuclei of the top patches"),
        scripts.Bool("Write_ROIs", optional=False, grouping="7", default=True,
                     description="Write the evidence regions as ROIs"),
        scripts.Bool("Restrict_To_ROIs", optional=False, grouping="8", default=False,
                     description="Analyse only inside the image's existing ROIs"),
        **SCRIPT_INFO,
    )
    run_script(client, "run_analysis")


if __name__ == "__main__":
    main()
