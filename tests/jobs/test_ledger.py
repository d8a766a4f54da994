"""The job ledger on real databases: migrations, concurrent first use, the claim protocol."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from omero_hwsi.jobs._db import HEAD_REVISION, head_revision, normalize_url
from omero_hwsi.jobs.ledger import Ledger, Output, utcnow


def _insert(ledger: Ledger, job_id: str = "job-1") -> None:
    ledger.insert(job_id=job_id, key="{}", task="vqa", input="/slides/a.svs", input_sha256="0" * 64,
                  user="ana", model="demo@000000000000", params={}, out_dir="/results/a")


def test_models_match_the_migrations_and_the_head_constant(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from omero_hwsi.jobs.ledger import Base

    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    with ledger.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    assert HEAD_REVISION == head_revision()


_FIRST_USE = textwrap.dedent("""
    import sys, time
    from omero_hwsi.jobs.ledger import Ledger
    url, n, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    time.sleep(max(0.0, start - time.time()))  # every process opens the new ledger at once
    ledger = Ledger(url)
    ledger.insert(job_id=f"job-{n}", key="{}", task="vqa", input="x", input_sha256="0" * 64,
                  user="u", model="m", params={}, out_dir="/o")
    print(len(ledger.list_jobs()))
""")


def _open_concurrently(url: str, n: int = 5) -> list[subprocess.CompletedProcess[str]]:
    start = str(time.time() + 4.0)  # after every interpreter has started
    procs = [subprocess.Popen([sys.executable, "-c", _FIRST_USE, url, str(i), start],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def _assert_migrated_once(url: str, jobs: int) -> None:
    engine = create_engine(normalize_url(url))
    with engine.connect() as connection:
        versions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
        count = connection.execute(text("SELECT count(*) FROM jobs")).scalar_one()
    engine.dispose()
    assert versions == [(HEAD_REVISION,)]
    assert count == jobs


@pytest.mark.slow
def test_sqlite_ledger_is_created_safely_by_processes_starting_together(tmp_path):
    url = f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite'}"
    results = _open_concurrently(url)
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
    _assert_migrated_once(url, jobs=5)


@pytest.mark.slow
def test_postgresql_ledger_is_created_safely_by_processes_starting_together(pg_database):
    url = pg_database()
    results = _open_concurrently(url)
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
    _assert_migrated_once(url, jobs=5)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path) -> Ledger:
    if request.param == "sqlite":
        return Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    ledger = Ledger(request.getfixturevalue("pg_url"))  # the session's private database
    with ledger.engine.begin() as connection:
        connection.execute(text("TRUNCATE jobs, events, outputs"))
    return ledger


def test_submitting_an_existing_job_returns_it_unchanged(ledger):
    _insert(ledger)
    job, created = ledger.insert(job_id="job-1", key="{}", task="report", input="/other.svs",
                                 input_sha256="1" * 64, user="bo", model="m", params={},
                                 out_dir="/elsewhere")
    assert not created and job.user == "ana" and job.out_dir == "/results/a"
    assert len(ledger.list_jobs()) == 1
    assert [e.message for e in ledger.events("job-1")] == [
        "submitted: vqa on /slides/a.svs with demo@000000000000"]


def test_a_duplicate_delivery_is_dropped_while_its_task_lives(ledger):
    _insert(ledger)
    first = ledger.claim("job-1", "prepare", runner="t1", worker="w1", retries=2, stale_seconds=60)
    assert first.outcome == "run" and first.job is not None and first.job.attempts == 1
    duplicate = ledger.claim("job-1", "prepare", runner="t2", worker="w2", retries=2,
                             stale_seconds=60)
    assert duplicate.outcome == "skip" and "duplicate" in duplicate.reason
    stale_message = ledger.claim("job-1", "infer", runner="t3", worker="w2", retries=2,
                                 stale_seconds=60)
    assert stale_message.outcome == "skip" and "stale" in stale_message.reason
    assert ledger.find("job-1").attempts == 1


def test_a_task_that_keeps_dying_ends_in_dead_letter_after_the_retry_cap(ledger):
    _insert(ledger)
    outcomes = [ledger.claim("job-1", "prepare", runner="t1", worker="w", retries=2,
                             stale_seconds=60).outcome for _ in range(4)]
    # The same message comes back after its process died (task_reject_on_worker_lost).
    assert outcomes == ["run", "run", "run", "dead_letter"]
    job = ledger.find("job-1")
    assert job.state == "dead_letter" and job.attempts == 4
    assert "HWSI_TASK_RETRIES=2" in (job.error or "") and "\n" not in (job.error or "")
    assert ledger.claim("job-1", "prepare", runner="t1", worker="w", retries=2,
                        stale_seconds=60).outcome == "skip"


def test_a_stale_task_is_taken_over_and_the_restart_counted(ledger):
    _insert(ledger)
    ledger.claim("job-1", "prepare", runner="t1", worker="w1", retries=2, stale_seconds=60)
    takeover = ledger.claim("job-1", "prepare", runner="t2", worker="w2", retries=2,
                            stale_seconds=0.0)
    assert takeover.outcome == "run" and takeover.job is not None and takeover.job.attempts == 2
    # The earlier task, if it still runs, learns at its next progress call that it lost the job.
    assert ledger.progress("job-1", runner="t1", fraction=0.5) == "superseded"
    assert ledger.progress("job-1", runner="t2", fraction=0.5) == "ok"
    assert ledger.heartbeat("job-1", runner="t1") == "superseded"
    assert ledger.heartbeat("job-1", runner="t2") == "ok"


def test_the_heartbeat_of_a_cancelled_job_says_cancelled_not_superseded(ledger):
    # The heartbeat thread is often first to notice a cancellation; the task must report it so.
    _insert(ledger)
    ledger.claim("job-1", "prepare", runner="t1", worker="w1", retries=2, stale_seconds=60)
    assert ledger.heartbeat("job-1", runner="t1") == "ok"
    ledger.cancel("job-1", user="alice")
    assert ledger.heartbeat("job-1", runner="t1") == "cancelled"
    assert ledger.progress("job-1", runner="t1", fraction=0.5) == "cancelled"


def test_stages_advance_and_outputs_are_registered_once(ledger):
    _insert(ledger)
    for stage, following in (("prepare", "features"), ("features", "infer"), ("infer", "write")):
        assert ledger.claim("job-1", stage, runner=f"t-{stage}", worker="w", retries=2,
                            stale_seconds=60).outcome == "run"
        assert ledger.finish_stage("job-1", runner=f"t-{stage}", worker="w", next_stage=following,
                                   artifacts={stage: True}, message=f"{stage} done")
    assert ledger.artifacts("job-1") == {"prepare": True, "features": True, "infer": True}
    ledger.claim("job-1", "write", runner="t-write", worker="w", retries=2, stale_seconds=60)
    now = utcnow()
    files = [Output("job-1", f"/results/a/{n}", "json", "0" * 64, 1, now) for n in ("a", "b", "a")]
    assert ledger.succeed("job-1", runner="t-write", worker="w", outputs=files, message="done")
    assert not ledger.succeed("job-1", runner="t-write", worker="w", outputs=files, message="again")
    assert [o.path for o in ledger.outputs("job-1")] == ["/results/a/a", "/results/a/b"]
    job = ledger.find("job-1")
    assert (job.state, job.progress, job.attempts) == ("succeeded", 1.0, 1)


def test_cancel_reaches_a_running_task_at_its_next_progress_call(ledger):
    _insert(ledger)
    ledger.claim("job-1", "prepare", runner="t1", worker="w", retries=2, stale_seconds=60)
    job, changed = ledger.cancel("job-1", user="lab-manager")
    assert changed and job.state == "cancelled"
    assert ledger.progress("job-1", runner="t1", fraction=0.2) == "cancelled"
    assert not ledger.finish_stage("job-1", runner="t1", worker="w", next_stage="features",
                                   artifacts={}, message="x")
    assert ledger.events("job-1")[-1].user == "lab-manager"
    assert ledger.cancel("job-1", user="lab-manager")[1] is False


def test_lost_jobs_are_requeued_by_one_reconciler_only(ledger):
    _insert(ledger)
    ledger.claim("job-1", "prepare", runner="t1", worker="w", retries=2, stale_seconds=60)
    assert ledger.lost(stale_seconds=3600, requeue_seconds=3600) == []
    assert ledger.lost(stale_seconds=0, requeue_seconds=3600) == [("job-1", "prepare")]
    time.sleep(0.6)  # the heartbeat is now older than the stale limit below
    wins = [ledger.mark_requeued("job-1", "prepare", worker=f"w{i}", stale_seconds=0.5,
                                 requeue_seconds=3600) for i in range(3)]
    assert wins == [True, False, False]


def test_prune_deletes_ended_jobs_with_their_events(ledger, tmp_path: Path):
    _insert(ledger, "job-1")
    _insert(ledger, "job-2")
    ledger.cancel("job-1", user="u")
    assert ledger.prune(utcnow()) == 1
    assert [j.id for j in ledger.list_jobs()] == ["job-2"]
    assert ledger.events("job-1") == []
