"""Job-system fixtures: private PostgreSQL database, Redis db, RabbitMQ vhost, real workers.

Nothing is mocked and nothing runs in eager mode: workers are ``hwsi worker`` processes (the
prefork pool), the broker is the embedded SQLite transport, the local Redis or RabbitMQ, the
ledger SQLite or the local PostgreSQL. Each test session creates its own PostgreSQL databases
(dropped at the end), takes an empty Redis db number (flushed at the end) and creates its own
RabbitMQ vhost (deleted at the end), so the shared services stay clean. A test that restarts its
broker gets a private ``redis-server`` of its own (:func:`private_redis`); the shared one is
never restarted.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def _pg_admin() -> Any:
    import psycopg

    return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)


@pytest.fixture(scope="session")
def pg_database() -> Callable[[], str]:
    """A factory of private PostgreSQL databases (URLs); all are dropped after the session."""
    try:
        _pg_admin().close()
    except Exception as err:  # the service is not running here
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 is not reachable (make services): {err}")
    created: list[str] = []

    def make() -> str:
        name = f"hwsi_test_{uuid.uuid4().hex[:12]}"
        with _pg_admin() as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return f"postgresql://postgres@127.0.0.1:5432/{name}"

    yield make
    with _pg_admin() as admin:
        for name in created:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url(pg_database: Callable[[], str]) -> str:
    """One private PostgreSQL database for the session."""
    return pg_database()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis URL on an empty db number (highest first), flushed after the session."""
    import redis

    try:
        redis.Redis(REDIS_HOST, REDIS_PORT, socket_timeout=5).ping()
    except Exception as err:
        pytest.skip(f"Redis on {REDIS_HOST}:{REDIS_PORT} is not reachable (make services): {err}")
    for db in range(15, 0, -1):
        client = redis.Redis(REDIS_HOST, REDIS_PORT, db=db)
        if client.dbsize() == 0:
            break
    else:
        pytest.skip("no empty Redis db number for a private test db")
    client.set("hwsi-test-owner", str(os.getpid()))  # claim it
    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
    client.flushdb()


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """An AMQP URL on a private vhost of the local RabbitMQ, deleted after the session.

    A vhost of its own keeps the test's queues, messages and pidbox exchanges apart from
    anything else on the server (``rabbitmqctl`` must be usable, e.g. as root).
    """
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=5).close()
    except OSError as err:
        pytest.skip(f"RabbitMQ on 127.0.0.1:5672 is not reachable (make services): {err}")
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed: cannot create a private RabbitMQ vhost")
    vhost = f"hwsi_test_{uuid.uuid4().hex[:12]}"
    created = _rabbitmqctl("add_vhost", vhost)
    if created.returncode != 0:
        pytest.skip(f"cannot create a RabbitMQ vhost: {created.stderr.strip()[-300:]}")
    try:
        allowed = _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        assert allowed.returncode == 0, allowed.stderr
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@dataclass
class PrivateRedis:
    """A ``redis-server`` of one test, on a free port, persisting nothing: a restart loses all."""

    root: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        if not self.port:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
        log = (self.root / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.root)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        client = redis.Redis("127.0.0.1", self.port, socket_timeout=2)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: every message in it is gone, as after a crash without persistence."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private Redis server a test may kill and restart (never the shared one on 6379)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    root = tmp_path / "redis"
    root.mkdir()
    server = PrivateRedis(root)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def jobs_env(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """HWSI_* settings for fast jobs in tmp (also set in this process, for the CLI and client)."""
    # HWSI_EXTRACT_WORKERS keeps its default (2): tasks must run extraction in-process, as
    # Celery's pool processes are daemonic and cannot start extraction processes.
    values = {"HWSI_HEARTBEAT_SECONDS": "1", "HWSI_STALE_SECONDS": "30", "HWSI_LOG_LEVEL": "INFO",
              "COLUMNS": "200"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return dict(os.environ)
