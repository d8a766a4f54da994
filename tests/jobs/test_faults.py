"""Failure behaviour through real workers and services: kills, a poison slide, a lost broker.

Every test runs ``hwsi worker`` processes (prefork pool) against real services, with the ledger
in a private PostgreSQL database: a pool process and whole workers are killed with SIGKILL, a
task kills its own process on every attempt, a private Redis is killed and restarted without
its data. Each checks the contract of docs/workers.md: the job still ends ``succeeded`` with
its outputs registered once and the restart counted, or, for the poison, ends in
``dead_letter`` once ``HWSI_TASK_RETRIES`` restarts are spent. The corrupt slide that fails its
job in one line beside succeeding jobs, duplicate submission and cancellation are covered in
test_workers.py and test_client.py.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from jobs_support import hwsi, pool_processes, wait_for

from omero_hwsi.jobs.ledger import TERMINAL_STATES, Job, Ledger, utcnow
from omero_hwsi.results.analysis_files import ANALYSIS_FILES

SUBMIT = ["-q", "Is there tumour?", "--evidence", "region", "--max-new-tokens", "4"]
POISON_WORKER = Path(__file__).with_name("poison_worker.py")
CAME_BACK = "restarted (its message came back; the earlier task died)"


@pytest.fixture(scope="module")
def big_synthetic(synthetic_slide) -> Path:
    """36 regions: a features stage long enough to be caught (and killed) half-way."""
    return synthetic_slide(width=6144, height=6144, mpp=0.5, seed=5)


def _services(monkeypatch: pytest.MonkeyPatch, jobs_env: dict[str, str], broker: str,
              database: str, **settings: str) -> dict[str, str]:
    """Point this process (the CLI) and the workers' environment at the same broker and ledger."""
    values = {"HWSI_BROKER_URL": broker, "HWSI_DATABASE_URL": database, **settings}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return {**jobs_env, **values}


def _submit(*slides: Path) -> list[str]:
    result = hwsi("jobs", "submit", *map(str, slides), *SUBMIT)
    assert result.exit_code == 0, result.output
    return result.stdout.split()


def _ended(ledger: Ledger, *ids: str) -> bool:
    return all(ledger.find(job_id).state in TERMINAL_STATES for job_id in ids)


def _succeeded_once(ledger: Ledger, job_id: str) -> Job:
    """The job succeeded and registered each of its five files exactly once."""
    job = ledger.find(job_id)
    assert job.state == "succeeded", job
    assert sorted(o.path for o in ledger.outputs(job_id)) == sorted(
        str(Path(job.out_dir) / name) for name in ANALYSIS_FILES)
    return job


@pytest.mark.slow
def test_a_killed_pool_process_gives_its_gpu_task_back_at_once(
        fixture_slide, jobs_env, workers, redis_url, pg_database, monkeypatch):
    env = _services(monkeypatch, jobs_env, redis_url, pg_database())
    (job_id,) = _submit(fixture_slide("CMU-1-Small-Region.svs"))
    ledger = Ledger(env["HWSI_DATABASE_URL"])
    workers.start(env, queues="cpu,io", name="cpunode")
    gpu = workers.start(env, queues="gpu", name="gpunode")
    wait_for(lambda: (lambda j: j.state == "running" and j.stage == "infer")(ledger.find(job_id)),
             timeout=300, what="infer to start on the gpu worker", every=0.1)
    (pool,) = pool_processes(gpu.pid)
    os.kill(pool, signal.SIGKILL)  # mid-infer: a pool process's first infer loads torch (>5 s)
    wait_for(lambda: _ended(ledger, job_id), timeout=300, what="the job to end")
    job = _succeeded_once(ledger, job_id)
    assert job.attempts == 2
    messages = [e.message for e in ledger.events(job_id)]
    # task_reject_on_worker_lost: the same message came back through the broker, at once; the
    # reconciler (HWSI_STALE_SECONDS=30) had no part in it.
    assert f"infer {CAME_BACK} (attempt 2)" in messages
    assert not any(m.startswith("re-enqueued") for m in messages)
    assert gpu.poll() is None and pool not in pool_processes(gpu.pid)


def _kill_a_worker_mid_features(env: dict[str, str], workers, slide: Path) -> None:
    """Kill a whole worker (SIGKILL to its process group) half-way through ``features``; a
    second worker, started afterwards, must finish the job from the same message."""
    (job_id,) = _submit(slide)
    ledger = Ledger(env["HWSI_DATABASE_URL"])
    first = workers.start(env, queues="cpu,gpu,io", name="first")
    wait_for(lambda: (lambda j: j.state == "running" and j.stage == "features"
                      and j.progress > 0)(ledger.find(job_id)),
             timeout=300, what="features extraction to be under way", every=0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    workers.start(env, queues="cpu,gpu,io", name="second")
    wait_for(lambda: _ended(ledger, job_id), timeout=300, what="the job to end")
    job = _succeeded_once(ledger, job_id)
    assert job.attempts == 2
    events = ledger.events(job_id)
    restarts = [(e.stage, e.worker.split("@")[0], e.message) for e in events
                if "restarted" in e.message]
    assert restarts == [("features", "second", f"features {CAME_BACK} (attempt 2)")]
    assert not any(e.message.startswith("re-enqueued") for e in events)
    ran_on = {e.stage: e.worker.split("@")[0] for e in events
              if e.message.startswith(f"{e.stage} started")}
    assert ran_on == {"prepare": "first", "features": "first", "infer": "second",
                      "write": "second"}


@pytest.mark.slow
def test_a_killed_worker_s_task_comes_back_from_redis_to_another_worker(
        big_synthetic, jobs_env, workers, redis_url, pg_database, monkeypatch):
    # HWSI_MAX_TASK_SECONDS=20: Redis's visibility timeout is 40 s, after which a live worker
    # restores the message; HWSI_STALE_SECONDS=600 keeps the reconciler out of it.
    env = _services(monkeypatch, jobs_env, redis_url, pg_database(),
                    HWSI_MAX_TASK_SECONDS="20", HWSI_STALE_SECONDS="600")
    _kill_a_worker_mid_features(env, workers, big_synthetic)


@pytest.mark.slow
def test_a_killed_worker_s_task_comes_back_from_rabbitmq_to_another_worker(
        big_synthetic, jobs_env, workers, rabbitmq_url, pg_database, monkeypatch):
    # RabbitMQ requeues the unacknowledged message as soon as the dead worker's connection
    # closes; HWSI_STALE_SECONDS=600 keeps the reconciler out of it.
    env = _services(monkeypatch, jobs_env, rabbitmq_url, pg_database(),
                    HWSI_STALE_SECONDS="600")
    _kill_a_worker_mid_features(env, workers, big_synthetic)


@pytest.mark.slow
def test_a_task_that_kills_its_worker_every_time_ends_in_dead_letter(
        fixture_slide, jobs_env, workers, private_redis, pg_database, monkeypatch):
    import redis

    env = _services(monkeypatch, jobs_env, private_redis.url, pg_database(),
                    HWSI_TASK_RETRIES="1", HWSI_STALE_SECONDS="600")
    (job_id,) = _submit(fixture_slide("CMU-1-Small-Region.svs"))
    ledger = Ledger(env["HWSI_DATABASE_URL"])
    node = workers.start(env, queues="cpu,gpu,io", name="node", program=(str(POISON_WORKER),))
    wait_for(lambda: _ended(ledger, job_id), timeout=300, what="the job to end")
    job = ledger.find(job_id)
    error = ("gave up at stage prepare after 2 start(s): the worker died each time "
             "(HWSI_TASK_RETRIES=1)")
    assert (job.state, job.stage, job.attempts, job.error) == ("dead_letter", "prepare", 3, error)
    assert [e.message for e in ledger.events(job_id)][1:] == [
        "prepare started (attempt 1)", f"prepare {CAME_BACK} (attempt 2)", error]
    assert ledger.outputs(job_id) == [] and not Path(job.out_dir).exists()
    # The message was acknowledged, so nothing is left to loop on, and the worker lives on.
    broker = redis.Redis.from_url(private_redis.url)
    wait_for(lambda: broker.llen("cpu") == 0 and broker.hlen("unacked") == 0, timeout=30,
             what="the poison message to be acknowledged")
    assert node.poll() is None


@pytest.mark.slow
def test_a_broker_restarted_without_its_data_loses_no_job(
        fixture_slide, synthetic_slide, big_synthetic, jobs_env, workers, private_redis,
        pg_database, monkeypatch):
    env = _services(monkeypatch, jobs_env, private_redis.url, pg_database(),
                    HWSI_REQUEUE_SECONDS="8", HWSI_STALE_SECONDS="8",
                    HWSI_RECONCILE_SECONDS="1")
    slides = [fixture_slide("CMU-1-Small-Region.svs"),
              synthetic_slide(width=2048, height=2048, mpp=0.5, seed=3), big_synthetic]
    ids = _submit(*slides)
    ledger = Ledger(env["HWSI_DATABASE_URL"])
    workers.start(env, queues="cpu,gpu,io", name="node")

    def mid_batch() -> list[Job] | None:
        jobs = [ledger.find(job_id) for job_id in ids]
        ahead = any(j.stage in ("infer", "write") for j in jobs)
        waiting = [j for j in jobs if j.state == "queued"]
        return waiting if ahead and waiting else None

    waiting = wait_for(mid_batch, timeout=300, what="one job to reach infer while others wait",
                       every=0.1)
    killed_at = utcnow()
    private_redis.kill()  # every queued message is gone: nothing was persisted
    time.sleep(2)
    private_redis.start()
    wait_for(lambda: _ended(ledger, *ids), timeout=400, what="the batch to end")
    for job_id in ids:
        _succeeded_once(ledger, job_id)
    # Jobs whose message was in the lost broker finished because the reconciler sent it again.
    for job in waiting:
        assert any(e.message.startswith("re-enqueued") and e.time > killed_at
                   for e in ledger.events(job.id)), job.id
