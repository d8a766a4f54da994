#!/usr/bin/env python
"""HWSI > Job Status: the state and progress of your recent MLLM-HWSI jobs.

Read from the job ledger (the source of truth for every job), newest first: job id, state,
stage and its progress, the image, the last update and, for failed jobs, the one-line error.
"""

from omero import scripts
from omero.gateway import BlitzGateway
from omero.rtypes import rstring

STATES = ["any", "queued", "running", "succeeded", "failed", "cancelled", "dead_letter"]


def main():
    client = scripts.client(
        "Job_Status.py",
        "State and progress of your recent HWSI analyses, newest first.",
        scripts.String("Since", optional=False, grouping="1", default="7d",
                       description="How far back: a duration (2h, 7d, 4w) or a date "
                                   "(2025-03-01)"),
        scripts.String("State", optional=False, grouping="2", default="any",
                       values=[rstring(s) for s in STATES],
                       description="Only jobs in this state"),
        version="0.1.0",
        authors=["omero-hwsi developers"],
        institutions=["omero-hwsi"],
        contact="https://github.com/omero-hwsi/omero-hwsi",
    )
    try:
        from omero_hwsi.omero.script_actions import job_status, script_error
        from omero_hwsi.settings import load_settings

        conn = BlitzGateway(client_obj=client)
        try:
            outcome = job_status(conn, client.getInputs(unwrap=True), settings=load_settings())
        except Exception as err:  # the Activities panel shows one line, not a traceback
            client.setOutput("Message", rstring(script_error(err)))
            return
        client.setOutput("Message", rstring(outcome.message))
    finally:
        client.closeSession()


if __name__ == "__main__":
    main()
