"""Job-system overhead: a no-op job through our ledger and stages vs a bare Celery chain.

Four sides run at once, each with its own ``hwsi worker``-style worker (prefork pool,
concurrency 1, our Celery options, queues cpu/gpu/io) on its own empty Redis db number:

    bare        : a plain Celery chain of 4 no-op tasks on the queues our stages use
    bare, PG    : the same chain with Celery's own task states (STARTED, SUCCESS) in a
                  PostgreSQL result backend: Celery's bookkeeping on the same database as ours,
                  the reference of the issue's "both on Redis + PostgreSQL"
    ours, PG    : a no-op job (jobs_noop.py: the real client, tasks, ledger and hand-on, with
                  empty pipeline calls) with the ledger in a private PostgreSQL database
    ours, SQLite: the same with the default single-machine ledger (SQLite in HWSI_DATA_DIR);
                  the broker is still Redis, so only the ledger differs

Latency: one job at a time, the sides interleaved so that load from other work falls on all
three alike; a job's latency runs from just before ``submit()`` (``apply_async()`` for the
chain) to the end its last task recorded (the ledger's ``updated`` on success; a Redis mark for
the chain). Throughput: ``--batch`` jobs queued while no worker runs, then two workers per
side; jobs/s from the first task's start to the last job's end. Target (issue, step 2): our
per-job latency with the PostgreSQL ledger <= 1.5x the chain's on Redis + PostgreSQL; the
ratio to the chain without any result backend is printed too. Prints ratios only against this run's reference;
never asserts a timing. Needs PostgreSQL and Redis (make services). Run: make bench.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis
from _common import synthetic
from celery import Celery, chain
from jobs_noop import BARE_ENDS, BARE_STARTS, bare_app

from omero_hwsi.jobs.app import create_app
from omero_hwsi.jobs.client import JobInput, JobRequest, submit
from omero_hwsi.jobs.ledger import Ledger
from omero_hwsi.jobs.routing import STAGES, queue_for
from omero_hwsi.settings import Settings, load_settings

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS = "redis://127.0.0.1:6379"
NOOP = Path(__file__).with_name("jobs_noop.py")
POLL_S = 0.05
"""How often the benchmark looks for a job's end; latencies come from recorded times."""


@dataclass
class Side:
    """One configuration under test: its settings, environment and running workers."""

    name: str
    env: dict[str, str]
    command: list[str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return load_settings(self.env)

    def start(self, count: int) -> None:
        """Start ``count`` workers and wait until each answers a ping."""
        names = [f"{self.name}-{len(self.procs) + n}@bench" for n in range(count)]
        for name in names:
            self.procs.append(subprocess.Popen(
                [sys.executable, str(NOOP), *self.command, "--queues", "cpu,gpu,io",
                 "--name", name], env=self.env, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True))
        control = self.app.control
        deadline = time.monotonic() + 180
        while {n for reply in control.ping(destination=names, timeout=1.0) for n in reply} \
                != set(names):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise SystemExit(f"{self.name}: the workers did not start")

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL of the process group if it hangs."""
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        self.procs.clear()

    @functools.cached_property
    def app(self) -> Celery:
        """The side's app, built once (a second bare app would register ``bench.noop`` again)."""
        return bare_app(self.settings) if self.command == ["bare"] else create_app(self.settings)


class Ours:
    """Submit no-op jobs through the real client and read their times from the ledger."""

    def __init__(self, side: Side, slide: Path) -> None:
        self.side, self.slide = side, slide
        self.settings = side.settings
        self.ledger = Ledger(self.settings.ledger_url)
        self.count = 0
        self.measured: list[str] = []

    def submit(self) -> str:
        self.count += 1
        request = JobRequest(question=f"{self.side.name} no-op {self.count}?", evidence="none")
        (done,) = submit([JobInput(self.slide)], request, settings=self.settings, user="bench")
        return done.job.id

    def latency(self) -> tuple[float, float]:
        """(seconds to the job's end, seconds of them spent in ``submit()``)."""
        started = time.time()
        job_id = self.submit()
        sent = time.time()
        while (job := self.ledger.find(job_id)).state != "succeeded":
            if job.state not in ("queued", "running"):
                raise SystemExit(f"{self.side.name}: no-op job {job_id} ended {job.state}")
            time.sleep(POLL_S)
        self.measured.append(job_id)
        return job.updated.timestamp() - started, sent - started

    def breakdown(self, skip: int) -> tuple[float, float]:
        """Median ms inside a stage (claim to done) and between stages (done to next claim).

        From the event times of the latency jobs after the first ``skip`` (warm-up): inside is
        the claim, the progress write and ``finish_stage``/``succeed``; between is the next
        message's send, its delivery and the next claim.
        """
        inside: list[float] = []
        between: list[float] = []
        for job_id in self.measured[skip:]:
            times = [e.time.timestamp() for e in self.ledger.events(job_id)]
            gaps = [(b - a) * 1000 for a, b in zip(times, times[1:])]
            # Events: submitted, then each stage's "started" and "done": the odd gaps lie
            # inside a stage, the even ones after the first between two stages.
            inside += gaps[1::2]
            between += gaps[2::2]
        return statistics.median(inside), statistics.median(between)

    def queues(self) -> list[str]:
        """The queue of each stage for these jobs (``features`` on cpu: built-in encoders)."""
        job = self.ledger.list_jobs(limit=1)[0]
        return [queue_for(stage, encoders=tuple(job.params["encoders"])) for stage in STAGES]

    def span(self, ids: list[str]) -> float:
        """Seconds from the first stage start to the last success among ``ids``."""
        wanted = set(ids)
        wait_until(lambda: all(j.state == "succeeded" for j in self.ledger.list_jobs()
                               if j.id in wanted), what=f"{self.side.name}: the batch")
        jobs = [j for j in self.ledger.list_jobs() if j.id in wanted]
        first = min(e.time for j in jobs for e in self.ledger.events(j.id)
                    if e.message.startswith("prepare started"))
        return max(j.updated for j in jobs).timestamp() - first.timestamp()


class Bare:
    """Send bare chains of 4 no-op tasks and read their times from the Redis marks."""

    def __init__(self, side: Side, queues: list[str]) -> None:
        self.side, self.queues = side, queues
        self.app = side.app
        self.marks = redis.Redis.from_url(side.settings.broker)

    def submit(self) -> str:
        chain_id = uuid.uuid4().hex
        links = ["first", "middle", "middle", "last"]
        chain(*(self.app.signature("bench.noop", args=[{"chain": chain_id, "link": link}],
                                   queue=queue, immutable=True)
                for link, queue in zip(links, self.queues, strict=True))).apply_async()
        return chain_id

    def latency(self) -> tuple[float, float]:
        """(seconds to the chain's end, seconds of them spent in ``apply_async()``)."""
        started = time.time()
        chain_id = self.submit()
        sent = time.time()
        while (end := self.marks.hget(BARE_ENDS, chain_id)) is None:
            time.sleep(POLL_S)
        return float(end) - started, sent - started

    def span(self, ids: list[str]) -> float:
        """Seconds from the first chain's start to the last chain's end among ``ids``."""
        wait_until(lambda: None not in self.marks.hmget(BARE_ENDS, ids), what="bare: the batch")
        starts = [float(x) for x in self.marks.hmget(BARE_STARTS, ids)]
        ends = [float(x) for x in self.marks.hmget(BARE_ENDS, ids)]
        return max(ends) - min(starts)


def wait_until(check: Callable[[], bool], *, what: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


@contextmanager
def private_services(count: int) -> Iterator[tuple[str, list[str]]]:
    """A private PostgreSQL database and ``count`` empty Redis db numbers, cleaned up after."""
    admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    name = f"hwsi_bench_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    dbs: list[redis.Redis] = []
    try:
        for number in range(15, 0, -1):
            client = redis.Redis.from_url(f"{REDIS}/{number}")
            if client.dbsize() == 0:
                client.set("hwsi-bench-owner", str(os.getpid()))
                dbs.append(client)
                if len(dbs) == count:
                    break
        else:
            raise SystemExit(f"need {count} empty Redis db numbers")
        yield (f"postgresql://postgres@127.0.0.1:5432/{name}",
               [f"{REDIS}/{c.connection_pool.connection_kwargs['db']}" for c in dbs])
    finally:
        for client in dbs:
            client.flushdb()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def describe(name: str, values: list[tuple[float, float]], reference: float) -> str:
    """One latency row: median, mean and p90 in ms, the median's ratio, the sending part."""
    ms = sorted(total * 1000 for total, _ in values)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    median = statistics.median(ms)
    sending = statistics.median(sent * 1000 for _, sent in values)
    return (f"{name:<38} {median:8.1f} {statistics.fmean(ms):8.1f} {p90:8.1f} "
            f"{median / reference:7.2f}x {sending:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40, help="latency samples per side")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured jobs per side first")
    parser.add_argument("--batch", type=int, default=200, help="jobs queued for throughput")
    args = parser.parse_args()
    slide = synthetic("bench-jobs-1024.svs", width=1024, height=1024, mpp=0.5, seed=21)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="hwsi-bench-jobs-") as tmp, \
            private_services(4) as (database, brokers):
        (Path(tmp) / "none.toml").write_text("")
        base = {k: v for k, v in os.environ.items() if not k.startswith("HWSI_")}
        base |= {"HWSI_CONFIG": str(Path(tmp) / "none.toml"), "HWSI_LOG_LEVEL": "WARNING"}
        backend = "db+" + database.replace("postgresql://", "postgresql+psycopg://", 1)
        sides = {
            "bare": Side("bare", {**base, "HWSI_BROKER_URL": brokers[0],
                                  "HWSI_DATA_DIR": f"{tmp}/bare"}, ["bare"]),
            "bare_pg": Side("bare-pg", {**base, "HWSI_BROKER_URL": brokers[3],
                                        "HWSI_RESULT_BACKEND": backend,
                                        "HWSI_DATA_DIR": f"{tmp}/bare-pg"}, ["bare"]),
            "pg": Side("ours-pg", {**base, "HWSI_BROKER_URL": brokers[1],
                                   "HWSI_DATABASE_URL": database,
                                   "HWSI_DATA_DIR": f"{tmp}/pg"}, ["ours", "worker"]),
            "sqlite": Side("ours-sqlite", {**base, "HWSI_BROKER_URL": brokers[2],
                                           "HWSI_DATA_DIR": f"{tmp}/sqlite"}, ["ours", "worker"]),
        }
        try:
            for side in sides.values():
                side.start(1)
            ours = {key: Ours(sides[key], slide) for key in ("pg", "sqlite")}
            for _ in range(args.warmup):
                ours["pg"].latency()
                ours["sqlite"].latency()
            queues = ours["pg"].queues()
            bares = {key: Bare(sides[key], queues) for key in ("bare", "bare_pg")}
            runners: dict[str, Ours | Bare] = {**bares, **ours}
            for _ in range(args.warmup):
                for bare in bares.values():
                    bare.latency()
            samples: dict[str, list[tuple[float, float]]] = {key: [] for key in runners}
            for _ in range(args.jobs):
                for key, runner in runners.items():
                    samples[key].append(runner.latency())

            breakdown = {key: ours[key].breakdown(args.warmup) for key in ours}
            spans: dict[str, float] = {}
            for key, runner in runners.items():
                sides[key].stop()
                ids = [runner.submit() for _ in range(args.batch)]
                sides[key].start(2)
                spans[key] = runner.span(ids)
                sides[key].stop()
        finally:
            for side in sides.values():
                side.stop()

    print(f"machine: {os.cpu_count()} cores, load average {load:.2f} at start (other work "
          "running: figures are ratios within this run)")
    print(f"per-job latency, {args.jobs} jobs per side, interleaved, one worker each "
          "(prefork, concurrency 1), broker Redis:")
    print(f"{'ms':<38} {'median':>8} {'mean':>8} {'p90':>8} {'ratio':>8} {'send':>8}"
          "   (send: median ms inside submit() / apply_async())")
    medians = {key: statistics.median(total for total, _ in values) * 1000
               for key, values in samples.items()}
    reference = medians["bare_pg"]
    labels = {"bare": "bare Celery chain, no result backend",
              "bare_pg": "bare Celery chain, PostgreSQL results",
              "pg": "ours, no-op job, PostgreSQL ledger", "sqlite": "ours, no-op job, SQLite ledger"}
    for key, label in labels.items():
        print(describe(label, samples[key], reference))
    print(f"overhead ratio (median; target <= 1.5x for the PostgreSQL ledger vs the chain on "
          f"Redis + PostgreSQL): PostgreSQL ledger {medians['pg'] / reference:.2f}x, SQLite "
          f"ledger {medians['sqlite'] / reference:.2f}x; vs the chain without a result backend "
          f"{medians['pg'] / medians['bare']:.2f}x and {medians['sqlite'] / medians['bare']:.2f}x")
    for key in ("pg", "sqlite"):
        inside, between = breakdown[key]
        print(f"{labels[key]}: per stage {inside:.1f} ms claim -> done (ledger writes), "
              f"{between:.1f} ms done -> next claim (send, delivery, claim); medians")
    print(f"throughput, {args.batch} queued jobs, two workers (prefork, concurrency 1 each):")
    for key, label in labels.items():
        rate = args.batch / spans[key]
        print(f"{label:<38} {rate:8.1f} jobs/s {spans[key]:8.2f} s "
              f"{rate / (args.batch / spans['bare_pg']):7.2f}x")


if __name__ == "__main__":
    main()
