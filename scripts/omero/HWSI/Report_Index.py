#!/usr/bin/env python
"""HWSI > Report Index: a CSV of every HWSI analysis in a project, dataset or the whole group.

For lab managers: one row per analysis with the image, its state, task, model, date,
requesting user, short answer, job id and a link to the image in OMERO.web. Completed analyses
come from the provenance key-values on the images; jobs not yet written back from the job
ledger. The CSV is attached to the selected project or dataset.
"""

from omero import scripts
from omero.rtypes import rlong, rstring

from omero_hwsi.omero.scripting import SCRIPT_INFO, run_script


def main():
    client = scripts.client(
        "Report_Index.py",
        "A CSV index of every HWSI analysis (image, state, model, date, requesting user, link), "
        "attached to the selected project or dataset.",
        scripts.String("Data_Type", optional=False, grouping="1", default="Project",
                       values=[rstring("Project"), rstring("Dataset")],
                       description="What the IDs are"),
        scripts.List("IDs", optional=True, grouping="2",
                     description="Projects or datasets to index").ofType(rlong(0)),
        scripts.Bool("Whole_Group", optional=False, grouping="3", default=False,
                     description="Index every analysed image of the current group instead"),
        **SCRIPT_INFO,
    )
    run_script(client, "report_index_script")


if __name__ == "__main__":
    main()
