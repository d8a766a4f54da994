"""Jobs through real ``hwsi worker`` processes: embedded default, and Redis + PostgreSQL.

Two workers split the queues (``cpu,io`` and ``gpu``), as a CPU node and a GPU node would; the
model is the embedded demo model, the slides the CMU fixture and a synthetic slide, plus the
truncated ``broken.svs``, whose job must fail with its one-line error while the others succeed.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from jobs_support import hwsi, wait_for

from omero_hwsi.jobs.ledger import TERMINAL_STATES, Ledger
from omero_hwsi.results.analysis_files import ANALYSIS_FILES
from omero_hwsi.settings import load_settings

SUBMIT = ["-q", "Is there tumour?", "--evidence", "region", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def synthetic(synthetic_slide) -> Path:
    return synthetic_slide(width=2048, height=2048, mpp=0.5, seed=3)


def _ended(ledger: Ledger, ids: list[str]) -> bool:
    return all(ledger.find(job_id).state in TERMINAL_STATES for job_id in ids)


def _run_batch(slides: list[Path], env: dict[str, str], workers, *, timeout: float) -> None:
    settings = load_settings()
    ledger = Ledger(settings.ledger_url)
    # A job cancelled while queued: its message reaches a worker, which drops it.
    cancelled = hwsi("jobs", "submit", str(slides[0]), "-q", "Cancel me?", "--evidence", "none",
                     "--user", "ana").stdout.strip()
    assert hwsi("jobs", "cancel", cancelled).exit_code == 0
    submitted = hwsi("jobs", "submit", *map(str, slides), *SUBMIT, "--user", "ana")
    assert submitted.exit_code == 0, submitted.output
    ids = submitted.stdout.split()
    assert len(ids) == len(slides)

    workers.start(env, queues="cpu,io", name="cpunode")
    workers.start(env, queues="gpu", name="gpunode")
    wait_for(lambda: _ended(ledger, [*ids, cancelled]), timeout=timeout, what="the batch to end")

    jobs = {job_id: ledger.find(job_id) for job_id in ids}
    by_input = {Path(job.input).name: job for job in jobs.values()}
    broken = by_input.pop("broken.svs")
    assert broken.state == "failed" and broken.stage == "prepare"
    assert broken.error is not None and "\n" not in broken.error
    assert broken.error.startswith("broken.svs: unsupported or corrupt slide format")
    assert ledger.outputs(broken.id) == [] and not Path(broken.out_dir).exists()
    for job in by_input.values():
        assert (job.state, job.attempts, job.progress) == ("succeeded", 1, 1.0), job
        outputs = ledger.outputs(job.id)
        assert sorted(o.path for o in outputs) == sorted(
            str(Path(job.out_dir) / name) for name in ANALYSIS_FILES)
        assert Path(job.out_dir) == settings.data_dir / "results" / job.id
        document = json.loads((Path(job.out_dir) / "result.json").read_text())
        assert document["answer"] and document["provenance"]["job_id"] == job.id
        assert document["timings"]["total_s"] > 0
        ran_on = {e.stage: e.worker for e in ledger.events(job.id) if "started" in e.message}
        assert ran_on["prepare"].startswith("cpunode@") and ran_on["write"].startswith("cpunode@")
        assert ran_on["features"].startswith("cpunode@")  # built-in encoders: the cpu queue
        assert ran_on["infer"].startswith("gpunode@")
        assert {e.user for e in ledger.events(job.id)} == {"ana"}
    dropped = ledger.find(cancelled)
    assert dropped.state == "cancelled" and dropped.attempts == 0
    assert any("dropped: the job was cancelled" in e.message for e in ledger.events(cancelled))
    # Submitting the same batch again returns the same jobs and runs nothing.
    again = hwsi("jobs", "submit", *map(str, slides), *SUBMIT, "--user", "ana")
    assert again.stdout.split() == ids
    assert {ledger.find(i).state for i in ids} == {"succeeded", "failed"}


@pytest.mark.slow
def test_batch_on_the_embedded_default_completes_through_all_queues(
        fixture_slide, synthetic, jobs_env, workers):
    slides = [fixture_slide("CMU-1-Small-Region.svs"), synthetic, fixture_slide("broken.svs")]
    _run_batch(slides, jobs_env, workers, timeout=420)
    assert "sqla+sqlite" in load_settings().broker


@pytest.mark.slow
def test_batch_on_redis_and_postgresql_completes_through_all_queues(
        fixture_slide, synthetic, jobs_env, workers, redis_url, pg_database, monkeypatch):
    database = pg_database()
    monkeypatch.setenv("HWSI_BROKER_URL", redis_url)
    monkeypatch.setenv("HWSI_DATABASE_URL", database)
    env = {**jobs_env, "HWSI_BROKER_URL": redis_url, "HWSI_DATABASE_URL": database}
    slides = [fixture_slide("CMU-1-Small-Region.svs"), synthetic, fixture_slide("broken.svs")]
    _run_batch(slides, env, workers, timeout=420)
    assert load_settings().ledger_url.startswith("postgresql")


@pytest.mark.slow
def test_cancel_stops_a_running_job_at_its_next_progress_call(synthetic_slide, jobs_env,
                                                              workers):
    slide = synthetic_slide(width=6144, height=6144, mpp=0.5, seed=5)  # 36 regions to extract
    job_id = hwsi("jobs", "submit", str(slide), *SUBMIT).stdout.strip()
    ledger = Ledger(load_settings().ledger_url)
    workers.start(jobs_env, queues="cpu,gpu,io", name="node")
    wait_for(lambda: (lambda j: j.state == "running" and j.stage == "features"
                      and j.progress > 0)(ledger.find(job_id)),
             timeout=300, what="features extraction to be under way", every=0.2)
    assert hwsi("jobs", "cancel", job_id).exit_code == 0
    wait_for(lambda: any("features stopped: the job was cancelled" in e.message
                         for e in ledger.events(job_id)), timeout=60, what="the task to stop")
    job = ledger.find(job_id)
    assert job.state == "cancelled" and job.stage == "features" and job.progress < 1
    assert ledger.outputs(job_id) == [] and not Path(job.out_dir).exists()


@pytest.mark.slow
def test_cancel_revokes_the_running_task_where_the_broker_broadcasts(
        fixture_slide, jobs_env, workers, redis_url, monkeypatch):
    monkeypatch.setenv("HWSI_BROKER_URL", redis_url)
    # A long stale time: the task below stays "alive" and the worker drops its duplicate.
    env = {**jobs_env, "HWSI_BROKER_URL": redis_url, "HWSI_STALE_SECONDS": "600"}
    monkeypatch.setenv("HWSI_STALE_SECONDS", "600")
    job_id = hwsi("jobs", "submit", str(fixture_slide("CMU-1-Small-Region.svs")),
                  *SUBMIT).stdout.strip()
    ledger = Ledger(load_settings().ledger_url)
    runner = f"revoke-me-{uuid.uuid4()}"
    assert ledger.claim(job_id, "prepare", runner=runner, worker="elsewhere@node", retries=2,
                        stale_seconds=600).outcome == "run"
    workers.start(env, queues="cpu,gpu,io", name="node")
    log = workers.root / "worker-node.log"
    wait_for(lambda: "node@" in log.read_text() and " ready." in log.read_text(), timeout=120,
             what="the worker to be ready")
    cancelled = hwsi("jobs", "cancel", job_id)
    assert cancelled.exit_code == 0, cancelled.output
    assert ledger.find(job_id).state == "cancelled"
    # terminate=False: the worker only flags the id, so a redelivered copy is discarded.
    wait_for(lambda: f"Tasks flagged as revoked: {runner}" in log.read_text(), timeout=60,
             what="the worker to receive the revoke broadcast")


@pytest.mark.slow
def test_the_reconciler_restarts_a_job_whose_task_died(fixture_slide, jobs_env, workers,
                                                       isolated_env, monkeypatch):
    from sqlalchemy import create_engine, text

    job_id = hwsi("jobs", "submit", str(fixture_slide("CMU-1-Small-Region.svs")),
                  *SUBMIT).stdout.strip()
    ledger = Ledger(load_settings().ledger_url)
    # A task took the job and died with its whole worker: the embedded transport forgets a
    # message its killed consumer held, so the ledger is all that is left.
    assert ledger.claim(job_id, "prepare", runner="dead-task", worker="gone@node", retries=2,
                        stale_seconds=60).outcome == "run"
    broker = create_engine(f"sqlite:///{isolated_env / 'broker.sqlite'}")
    with broker.begin() as connection:
        connection.execute(text("DELETE FROM kombu_message"))
    broker.dispose()
    env = {**jobs_env, "HWSI_STALE_SECONDS": "3", "HWSI_RECONCILE_SECONDS": "1"}
    workers.start(env, queues="cpu,gpu,io", name="node")
    wait_for(lambda: ledger.find(job_id).state in TERMINAL_STATES, timeout=300,
             what="the job to end")
    job = ledger.find(job_id)
    assert (job.state, job.attempts) == ("succeeded", 2)
    messages = [e.message for e in ledger.events(job_id)]
    assert any(m.startswith("re-enqueued prepare by the reconciler") for m in messages)
    assert any(m.startswith("prepare restarted (its heartbeat is stale") for m in messages)
    assert len(ledger.outputs(job_id)) == len(ANALYSIS_FILES)
