"""``hwsi jobs`` without workers: submission, identity, listing, cancel, retry, prune."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import textwrap
import time
import uuid
from typing import get_args

import pytest
from jobs_support import hwsi
from sqlalchemy import create_engine, text

from omero_hwsi.jobs.client import CSV_COLUMNS, EVIDENCE_DEPTHS, EVIDENCE_METHODS, TASKS
from omero_hwsi.jobs.keys import JOB_NAMESPACE
from omero_hwsi.jobs.ledger import Ledger
from omero_hwsi.settings import load_settings

SUBMIT = ["-q", "Is there tumour?", "--evidence", "region", "--max-new-tokens", "4"]


def _broker_messages(data_dir) -> int:
    engine = create_engine(f"sqlite:///{data_dir / 'broker.sqlite'}")
    with engine.connect() as connection:
        count = connection.execute(text("SELECT count(*) FROM kombu_message")).scalar_one()
    engine.dispose()
    return int(count)


def test_submitting_twice_prints_the_same_job_id_and_queues_once(fixture_slide, jobs_env,
                                                                 isolated_env):
    slide = fixture_slide("CMU-1-Small-Region.svs")
    first = hwsi("jobs", "submit", str(slide), *SUBMIT)
    assert first.exit_code == 0, first.output
    (job_id,) = first.stdout.split()
    assert str(uuid.UUID(job_id)) == job_id and "queued as job" in first.stderr
    again = hwsi("jobs", "submit", str(slide), *SUBMIT, "--user", "someone-else")
    assert again.exit_code == 0, again.output
    assert again.stdout.split() == [job_id] and "already submitted" in again.stderr
    other = hwsi("jobs", "submit", str(slide), *SUBMIT[:-1], "8")  # another parameter
    assert other.stdout.split() != [job_id]
    assert _broker_messages(isolated_env) == 2
    job = Ledger(load_settings().ledger_url).find(job_id)
    # Any client can compute the id from the key; the key holds no path and no user.
    assert job_id == str(uuid.uuid5(JOB_NAMESPACE, job.key))
    key = json.loads(job.key)
    assert key["input"]["sha256"] == job.params["slide_sha256"] and "user" not in key
    assert str(slide) not in job.key
    assert job.out_dir == str(isolated_env / "results" / job_id) and job.user != "someone-else"


def test_list_csv_has_the_documented_columns_and_filters(fixture_slide, jobs_env, isolated_env):
    slide = fixture_slide("CMU-1-Small-Region.svs")
    ids = [hwsi("jobs", "submit", str(slide), *SUBMIT, "--user", user, "--task", task).stdout.strip()
           for user, task in (("ana", "vqa"), ("bo", "report"))]
    listed = hwsi("jobs", "list", "--format", "csv")
    assert listed.exit_code == 0, listed.output
    rows = list(csv.reader(io.StringIO(listed.stdout)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert rows[0] == ["job_id", "state", "stage", "progress", "task", "input", "user", "model",
                       "created", "updated", "error"]
    assert [r[0] for r in rows[1:]] == ids
    assert [(r[1], r[2], r[4], r[5], r[6]) for r in rows[1:]] == [
        ("queued", "prepare", "vqa", str(slide.resolve()), "ana"),
        ("queued", "prepare", "report", str(slide.resolve()), "bo")]
    assert all(r[7].startswith("demo@") for r in rows[1:])
    only_bo = list(csv.reader(io.StringIO(hwsi("jobs", "list", "--format", "csv", "--user",
                                               "bo").stdout)))
    assert [r[0] for r in only_bo[1:]] == ids[1:]
    none = hwsi("jobs", "list", "--format", "csv", "--state", "succeeded", "--since", "1h")
    assert none.stdout.strip().splitlines() == [",".join(CSV_COLUMNS)]
    as_json = json.loads(hwsi("jobs", "list", "--format", "json").stdout)
    assert [j["id"] for j in as_json] == ids
    bad = hwsi("jobs", "list", "--state", "done")
    assert bad.exit_code == 2 and "--state must be one of" in bad.stderr


def test_cancel_and_retry_of_a_queued_job_are_logged_with_the_user(fixture_slide, jobs_env):
    job_id = hwsi("jobs", "submit", str(fixture_slide("CMU-1-Small-Region.svs")),
                  *SUBMIT).stdout.strip()
    cancelled = hwsi("jobs", "cancel", job_id[:8], "--user", "lab-manager")
    assert cancelled.exit_code == 0 and cancelled.stdout.strip() == job_id
    status = json.loads(hwsi("jobs", "status", job_id, "--json").stdout)
    assert status["state"] == "cancelled"
    retried = hwsi("jobs", "retry", job_id, "--user", "lab-manager")
    assert retried.exit_code == 0, retried.output
    log = hwsi("jobs", "log", job_id).stdout.splitlines()
    assert [line.split("\t")[1] for line in log] == ["queued", "cancelled", "queued"]
    assert "cancelled by lab-manager" in log[1] and "retry requested by lab-manager" in log[2]
    again = hwsi("jobs", "retry", job_id)
    assert again.exit_code == 5 and "only an ended job can be retried" in again.stderr
    missing = hwsi("jobs", "status", "00000000-0000-0000-0000-000000000000")
    assert missing.exit_code == 5 and "no job" in missing.stderr


_SUBMIT_AT = textwrap.dedent("""
    import sys, time
    time.sleep(max(0.0, float(sys.argv[1]) - time.time()))  # every process starts at once
    sys.argv = ["hwsi", "jobs", "submit", *sys.argv[2:]]
    from omero_hwsi.cli import main
    main()
""")


@pytest.mark.slow
def test_commands_starting_together_create_the_ledger_and_broker_safely(fixture_slide, jobs_env,
                                                                        isolated_env):
    slide = str(fixture_slide("CMU-1-Small-Region.svs"))
    start = str(time.time() + 5.0)  # after every interpreter has started
    procs = [subprocess.Popen([sys.executable, "-c", _SUBMIT_AT, start, slide, "-q", f"Q{i}?"],
                              env=jobs_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(4)]
    results = [proc.communicate(timeout=180) for proc in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-1500:] for _, err in results]
    ids = {out.strip() for out, _ in results}
    assert len(ids) == 4
    assert {j.id for j in Ledger(load_settings().ledger_url).list_jobs()} == ids
    assert _broker_messages(isolated_env) == 4


def test_submit_refuses_bad_input_before_recording_anything(fixture_slide, jobs_env, tmp_path):
    slide = str(fixture_slide("CMU-1-Small-Region.svs"))
    for args, pattern in (([str(tmp_path / "nope.svs")], "not found"),
                          ([slide, "--evidence", "all"], "--evidence must be one of"),
                          ([slide, "--task", "segment"], "--task must be one of"),
                          ([slide, "--write-back"], "only for QuPath project sources")):
        result = hwsi("jobs", "submit", *args)
        assert result.exit_code == 2 and pattern in result.stderr, result.output
        assert result.stdout == ""
    no_model = hwsi("jobs", "submit", slide, "--model", str(tmp_path))
    assert no_model.exit_code == 3 and "not a model folder" in no_model.stderr
    assert hwsi("jobs", "list", "--format", "csv").stdout.strip() == ",".join(CSV_COLUMNS)


def test_prune_deletes_only_old_ended_jobs(fixture_slide, jobs_env):
    job_id = hwsi("jobs", "submit", str(fixture_slide("CMU-1-Small-Region.svs")),
                  *SUBMIT).stdout.strip()
    hwsi("jobs", "cancel", job_id)
    assert hwsi("jobs", "prune", "--older-than", "1d").stdout.strip() == "0"
    assert hwsi("jobs", "prune", "--older-than", "0s").stdout.strip() == "1"
    assert hwsi("jobs", "status", job_id).exit_code == 5
    assert hwsi("jobs", "prune", "--older-than", "soon").exit_code == 2


def test_client_and_cli_import_without_torch():
    code = ("import sys\n"
            "import omero_hwsi.jobs.client, omero_hwsi.jobs.app, omero_hwsi.jobs.tasks\n"
            "import omero_hwsi.cli, omero_hwsi.analysis\n"
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_client_vocabularies_match_the_pipeline():
    from omero_hwsi.inference.evidence import EvidenceDepth
    from omero_hwsi.inference.pipeline import Task
    from omero_hwsi.results.schema import EvidenceMethod

    assert set(TASKS) == set(get_args(Task))
    assert set(EVIDENCE_DEPTHS) == set(get_args(EvidenceDepth))
    assert set(EVIDENCE_METHODS) == set(get_args(EvidenceMethod))
