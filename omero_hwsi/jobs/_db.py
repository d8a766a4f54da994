"""Engines for the ledger and the embedded broker, and Alembic migration on first use.

SQLite is the single-machine default, so it has to cope with several worker processes and a
CLI writing at once: WAL journal (readers never block the writer), a 30 s busy timeout, and
every transaction opened with ``BEGIN IMMEDIATE`` so two writers queue for the lock instead of
one failing at once on a lock upgrade (pysqlite's deferred transactions do that). PostgreSQL
URLs without a driver get psycopg 3, the driver of the ``jobs`` extra.

Migrations run programmatically from ``omero_hwsi/jobs/alembic`` the first time a process opens
a ledger that is not at the head revision. Several processes may start at once (a worker and a
CLI, two workers): a file lock (SQLite) or a PostgreSQL advisory lock makes one migrate while
the others wait, then find the head and do nothing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url

from omero_hwsi.errors import ServiceError

__all__ = ["ALEMBIC_DIR", "HEAD_REVISION", "ensure_broker_tables", "head_revision", "ledger_engine", "migrate",
           "normalize_url", "redact", "sqlite_transport_options"]

ALEMBIC_DIR = Path(__file__).parent / "alembic"
HEAD_REVISION = "0001"
"""The newest migration: a ledger at this revision needs no Alembic at all (a test checks it)."""
_MIGRATION_LOCK_ID = 0x68777369  # "hwsi": the PostgreSQL advisory lock held while migrating
_ENGINES: dict[tuple[str, int], Engine] = {}
_MIGRATED: set[tuple[str, int]] = set()
_LOCK = threading.Lock()


def normalize_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` -> ``postgresql+psycopg://``; others unchanged."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def redact(url: str) -> str:
    """The URL with any password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is shown without its credentials part
        return url.split("@")[-1]


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # transactions are begun below, IMMEDIATE
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def ledger_engine(url: str) -> Engine:
    """The (per process) engine of a ledger URL, migrated to the head revision.

    Raises:
        ServiceError: the database cannot be reached or migrated.
    """
    url = normalize_url(url)
    key = (url, os.getpid())
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            file = _sqlite_file(url)
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
                engine = create_engine(url, connect_args={"timeout": 30})
                _sqlite_pragmas(engine)
            else:
                engine = create_engine(url, pool_pre_ping=True)
            _ENGINES[key] = engine
        if key not in _MIGRATED:
            migrate(engine, lock_file=None if (f := _sqlite_file(url)) is None
                    else f.with_name(f.name + ".lock"))
            _MIGRATED.add(key)
    return engine


def _forget_engines_after_fork() -> None:
    # A forked child (Celery's prefork pool) must not use its parent's pooled connections;
    # engines are keyed by pid, so the child builds its own. Drop the parent's entries without
    # closing their connections, which still belong to the parent.
    _ENGINES.clear()
    _MIGRATED.clear()


os.register_at_fork(after_in_child=_forget_engines_after_fork)


def _alembic_config(connection: Any) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest migration's revision id."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config(None)).get_current_head()
    assert head is not None, "the ledger has no migrations"
    return head


def _current_revision(connection: Any) -> str | None:
    """The ledger's revision, read with plain SQL (cheap: every process does it once)."""
    if not inspect(connection).has_table("alembic_version"):
        return None
    versions = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    return versions[0] if len(versions) == 1 else None


def _upgrade(connection: Any) -> None:
    from alembic import command  # imported only when there is something to migrate

    if _current_revision(connection) != HEAD_REVISION:
        command.upgrade(_alembic_config(connection), "head")


def migrate(engine: Engine, *, lock_file: Path | None = None) -> None:
    """Bring the ledger to the head revision; safe when several processes call it at once.

    Raises:
        ServiceError: the database cannot be reached or a migration fails.
    """
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with engine.connect() as connection:
            if _current_revision(connection) == HEAD_REVISION:
                return
        if engine.dialect.name == "sqlite":
            assert lock_file is not None
            with FileLock(str(lock_file)), engine.begin() as connection:
                _upgrade(connection)
            return
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:id)"),
                                   {"id": _MIGRATION_LOCK_ID})
            _upgrade(connection)
    except SQLAlchemyError as err:
        raise ServiceError(f"job ledger {redact(str(engine.url))}: cannot open or migrate: "
                           f"{type(err).__name__}: {str(err).splitlines()[0]}") from err


def sqlite_transport_options() -> dict[str, Any]:
    """kombu SQLAlchemy-transport options for SQLite: passed to ``create_engine`` as they are.

    Only engine arguments belong here (a ``polling_interval`` would reach ``create_engine`` and
    fail); the 30 s timeout lets polling workers wait for each other's short write locks.
    """
    return {"connect_args": {"timeout": 30}}


def ensure_broker_tables(broker_url: str, queues: Sequence[str]) -> None:
    """Create the embedded broker's SQLite file, kombu's tables and the queues once, under a lock.

    kombu creates its tables when a process first connects and a queue's row when a process
    first uses it, without a lock across processes: a worker declaring its queues while a
    client publishes can both insert the same queue and one fails. Creating all of it here
    first (WAL journal on, so polling readers do not block the writer) leaves kombu nothing
    to race on.
    """
    from kombu.connection import Connection

    url = broker_url.removeprefix("sqla+").removeprefix("sqlalchemy+")
    file = _sqlite_file(url)
    if file is None:
        return
    file.parent.mkdir(parents=True, exist_ok=True)
    marker = file.with_name(file.name + ".ready")
    if marker.is_file() and file.is_file():
        return
    with FileLock(str(file.with_name(file.name + ".lock"))):
        if marker.is_file() and file.is_file():
            return
        engine = create_engine(url, connect_args={"timeout": 30})
        try:
            with engine.begin() as connection:
                connection.exec_driver_sql("PRAGMA journal_mode = WAL")
        finally:
            engine.dispose()
        # Opening a channel's session makes kombu create its queue and message tables.
        with Connection(broker_url,
                        transport_options=sqlite_transport_options()) as broker:
            channel = broker.default_channel
            for queue in queues:
                channel._new_queue(queue)  # kombu's own row for the queue
            channel.session.commit()
        marker.touch()
