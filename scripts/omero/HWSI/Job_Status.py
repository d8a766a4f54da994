#!/usr/bin/env python
"""HWSI > Job Status: the state and progress of your recent MLLM-HWSI jobs.

Read from the job ledger (the source of truth for every job), newest first: job id, state,
stage and its progress, the image, the last update and, for failed jobs, the one-line error.
"""

from omero import scripts
from omero.rtypes import rstring

from omero_hwsi.omero.scripting import SCRIPT_INFO, run_script

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
        **SCRIPT_INFO,
    )
    run_script(client, "job_status")


if __name__ == "__main__":
    main()
