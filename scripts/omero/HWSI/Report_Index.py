#!/usr/bin/env python
"""HWSI > Report Index: a CSV of every HWSI analysis in a project, dataset or the whole group.

For lab managers: one row per analysis with the image, its state, task, model, date,
requesting user, short answer, job id and a link to the image in OMERO.web. Completed analyses
come from the provenance key-values on the images; jobs not yet written back from the job
ledger. The CSV is attached to the selected project or dataset.
"""

import tempfile
from pathlib import Path

from omero import scripts
from omero.gateway import BlitzGateway
from omero.rtypes import rlong, robject, rstring


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
        version="0.1.0",
        authors=["omero-hwsi developers"],
        institutions=["omero-hwsi"],
        contact="https://github.com/omero-hwsi/omero-hwsi",
    )
    try:
        from omero_hwsi.omero.script_actions import attach_index, report_index, script_error
        from omero_hwsi.settings import load_settings

        conn = BlitzGateway(client_obj=client)
        inputs = client.getInputs(unwrap=True)
        try:
            index = report_index(conn, inputs, settings=load_settings())
            ids = inputs.get("IDs") or []
            target = None if inputs.get("Whole_Group") or not ids else (
                inputs["Data_Type"], int(ids[0]))
            with tempfile.TemporaryDirectory() as folder:
                annotation = attach_index(conn, index, target=target, folder=Path(folder))
        except Exception as err:  # the Activities panel shows one line, not a traceback
            client.setOutput("Message", rstring(script_error(err)))
            return
        client.setOutput("Message", rstring(index.message))
        client.setOutput("File_Annotation", robject(annotation._obj))
    finally:
        client.closeSession()


if __name__ == "__main__":
    main()
