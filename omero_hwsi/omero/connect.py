"""Connections to OMERO: a service account that acts as the requesting user.

Why Sudo: a worker writes results hours after a user pressed "Run"; it must not hold the user's
password or a long-lived session of theirs. The service account (``HWSI_OMERO_USER``, password
in ``HWSI_OMERO_PASSWORD_FILE``) needs OMERO's *Sudo* admin privilege; for each job it opens a
session *as* the job's user (``suConn``) in the job's group, so OMERO's own permission checks
apply to every read and write, and everything written is owned by that user. Task messages carry
only the user name and group; the password is read from its file when a connection opens and is
never logged or put in an error message.

Long work keeps the session alive (``omero.client.enableKeepAlive``), so a slide download or a
write-back longer than the server's session timeout does not lose its session.

Session-key mode (``HWSI_OMERO_SESSION_TTL_SECONDS`` above 0) is for facilities that give no
account Sudo: Run Analysis, running as the user, opens one session per job and stores its key
in a private file (:mod:`omero_hwsi.omero.session_keys`); a job's connection joins that session
instead, needs no service account, and ends it after the write-back. omero-py logs the UUID of
the session it joins (DEBUG, INFO): while a key is in use, its records on the ``omero.gateway``
and ``omero.client`` loggers show ``<session key>`` instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from omero_hwsi._deps import require
from omero_hwsi.errors import ConfigError, OmeroConnectionError, OmeroPermissionError
from omero_hwsi.omero.session_keys import forget_session_key, read_session_key, session_key_mode
from omero_hwsi.settings import Settings, env_var

__all__ = ["KEEPALIVE_SECONDS", "KEY_WAIT_SECONDS", "ConnectionCheck", "check_connection",
           "omero_connection", "read_password"]

logger = logging.getLogger(__name__)

KEEPALIVE_SECONDS: Final = 60
"""How often an open connection pings the server (sessions time out after 10 min idle)."""
SUDO_PRIVILEGE: Final = "Sudo"
KEY_WAIT_SECONDS: Final = 30.0
"""Session-key mode: how long a job's connection waits for its key file before calling the
session gone. Run Analysis stores the keys once ``submit`` returns, and ``submit`` has queued
each job's first stage already, so an idle worker can start a job a moment before its key is
there."""
_KEY_POLL_SECONDS: Final = 0.5


def read_password(settings: Settings) -> str:
    """The service account's password from ``HWSI_OMERO_PASSWORD_FILE`` (first line).

    Raises:
        ConfigError: no OMERO host, user or password file is set, or the file is unreadable
            or empty (the message names the file, never its content).
    """
    for name in ("omero_host", "omero_user"):
        if not getattr(settings, name):
            raise ConfigError(f"{env_var(name)} is not set; OMERO access needs "
                              "HWSI_OMERO_HOST, HWSI_OMERO_USER and HWSI_OMERO_PASSWORD_FILE")
    path = settings.omero_password_file
    if path is None:
        raise ConfigError(f"{env_var('omero_password_file')} is not set; put the service "
                          "account's password in a file readable only by the workers")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the OMERO password file "
                          f"({type(err).__name__})") from None
    if not lines or not lines[0].strip():
        raise ConfigError(f"{path}: the OMERO password file is empty")
    return lines[0].strip()


def _gateway(settings: Settings) -> Any:
    """A connected service-account ``BlitzGateway`` (secure, keep-alive on)."""
    gateway = require("omero.gateway", extra="omero", purpose="OMERO access")
    conn = gateway.BlitzGateway(settings.omero_user, read_password(settings),
                                host=settings.omero_host, port=settings.omero_port, secure=True)
    where = f"OMERO {settings.omero_host}:{settings.omero_port}"
    try:
        connected = conn.connect()
    except Exception as err:  # Ice errors at this edge become one line, without secrets
        conn.close()
        raise OmeroConnectionError(f"{where}: cannot connect ({type(err).__name__})") from None
    if not connected:
        conn.close()  # a refused login still holds an Ice communicator
        raise OmeroConnectionError(
            f"{where}: login as {settings.omero_user!r} refused (wrong password in "
            f"{settings.omero_password_file}, or the server is unreachable)")
    conn.c.enableKeepAlive(KEEPALIVE_SECONDS)
    return conn


def _privileges(conn: Any) -> set[str]:
    admin = conn.getAdminService()
    return {str(p.getValue().getValue()) for p in admin.getCurrentAdminPrivileges()}


def _act_as(conn: Any, settings: Settings, user: str, group: str | None) -> Any:
    """A session of ``user`` (in ``group``) opened by the service account."""
    if SUDO_PRIVILEGE not in _privileges(conn):
        raise OmeroPermissionError(
            f"OMERO account {settings.omero_user!r} lacks the Sudo privilege, so it cannot act "
            "as the requesting user; give it Sudo (a restricted admin is enough)")
    ttl_ms = settings.max_task_seconds * 1000
    try:
        su = conn.suConn(user, group=group, ttl=ttl_ms)
    except Exception as err:
        raise OmeroPermissionError(f"OMERO: cannot act as user {user!r}"
                                   f"{f' in group {group!r}' if group else ''} "
                                   f"({type(err).__name__})") from None
    if su is None:
        raise OmeroPermissionError(f"OMERO: no user {user!r}"
                                   f"{f' in group {group!r}' if group else ''}")
    su.c.enableKeepAlive(KEEPALIVE_SECONDS)
    return su


def _close(handle: Any, **options: bool) -> None:
    try:
        handle.close(**options)
    except Exception as err:  # closing must not hide the real error
        logger.warning("closing an OMERO session failed: %s", type(err).__name__)


class _RedactKeys(logging.Filter):
    """Writes ``<session key>`` for the keys in use in omero-py's own log records."""

    def __init__(self) -> None:
        super().__init__()
        self._keys: Counter[str] = Counter()
        self._lock = threading.Lock()

    def hold(self, key: str) -> None:
        with self._lock:
            self._keys[key] += 1
        for name in ("omero.gateway", "omero.client"):
            logging.getLogger(name).addFilter(self)  # once: loggers skip a filter they hold

    def release(self, key: str) -> None:
        with self._lock:
            self._keys -= Counter({key: 1})

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            keys = tuple(self._keys)
        if not keys:
            return True
        text = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        for key in keys:
            text = text.replace(key, "<session key>")
            if record.exc_text:
                record.exc_text = record.exc_text.replace(key, "<session key>")
        record.msg, record.args = text, None
        return True


_REDACT = _RedactKeys()


def _job_session_key(settings: Settings, job_id: str) -> str:
    """The job's key, waiting up to :data:`KEY_WAIT_SECONDS` for Run Analysis to store it.

    Raises:
        OmeroConnectionError: no key (never stored, or deleted since).
    """
    deadline = time.monotonic() + KEY_WAIT_SECONDS
    while (key := read_session_key(settings, job_id)) is None:
        if time.monotonic() >= deadline:
            raise OmeroConnectionError(f"job {job_id}: its OMERO session is gone (session-key "
                                       "mode); run the analysis again")
        time.sleep(_KEY_POLL_SECONDS)
    return key


@contextmanager
def _joined(settings: Settings, job_id: str, user: str | None, *,
            end_session: bool) -> Iterator[Any]:
    """A ``BlitzGateway`` joined to the session Run Analysis opened for the job."""
    if not settings.omero_host:
        raise ConfigError(f"{env_var('omero_host')} is not set; OMERO access needs it")
    key = _job_session_key(settings, job_id)
    gateway = require("omero.gateway", extra="omero", purpose="OMERO access")
    where = f"OMERO {settings.omero_host}:{settings.omero_port}"
    _REDACT.hold(key)
    try:
        conn = gateway.BlitzGateway(host=settings.omero_host, port=settings.omero_port,
                                    secure=True)
        try:
            joined = conn.connect(sUuid=key)
        except Exception as err:  # Ice errors at this edge become one line, without the key
            joined, failure = False, f" ({type(err).__name__})"
        else:
            failure = " (it expired, or the server is unreachable)"
        if not joined:
            _close(conn, hard=False)
            raise OmeroConnectionError(f"job {job_id}: {where} did not let it join its session"
                                       f"{failure}; session-key mode")
        ended = False
        try:
            owner = str(conn.getUser().getName())
            if user and owner != user:
                raise OmeroPermissionError(f"job {job_id}: its OMERO session is {owner!r}'s, "
                                           f"not the requesting user {user!r}'s")
            conn.c.enableKeepAlive(KEEPALIVE_SECONDS)
            yield conn
            if end_session:
                forget_session_key(settings, job_id)
                ended = True
                _close(conn, hard=True)  # kills the session, whatever holds it
        finally:
            if not ended:
                _close(conn, hard=False)  # detaches: the job's next stage joins it again
    finally:
        _REDACT.release(key)


@contextmanager
def omero_connection(settings: Settings, *, user: str | None = None,
                     group: str | None = None, job_id: str | None = None,
                     end_session: bool = False) -> Iterator[Any]:
    """A ``BlitzGateway`` as ``user`` (through Sudo) or as the service account; closed at exit.

    In session-key mode, a connection for ``job_id`` joins the session Run Analysis opened for
    that job instead (in the image's group; ``group`` is not needed); at exit it detaches,
    leaving the session to the job's next stage, except with ``end_session`` (the write-back,
    the job's last use): after a normal exit the key file is deleted and the session killed,
    so it does not outlive the job. ``end_session`` changes nothing in Sudo mode, whose
    sessions always close at exit.

    Raises:
        ConfigError: OMERO settings missing or the password file unreadable.
        MissingExtraError: omero-py is not installed (the ``omero`` extra).
        OmeroConnectionError: the server cannot be reached or refused the login; in
            session-key mode, the job's key is gone or its session cannot be joined.
        OmeroPermissionError: the service account cannot act as ``user``.
    """
    if job_id is not None and session_key_mode(settings):
        with _joined(settings, job_id, user, end_session=end_session) as joined:
            yield joined
        return
    conn = _gateway(settings)
    su = None
    try:
        if user and user != settings.omero_user:
            su = _act_as(conn, settings, user, group)
        yield su or conn
    finally:
        for handle in (su, conn):
            if handle is not None:
                _close(handle)


@dataclass(frozen=True, slots=True)
class ConnectionCheck:
    """What ``hwsi omero check`` found: each line is a fact, and whether it is fine."""

    lines: list[tuple[bool, str]]

    @property
    def ok(self) -> bool:
        return all(ok for ok, _ in self.lines)


def _mode_line(settings: Settings) -> str:
    if session_key_mode(settings):
        return (f"session-key mode ({env_var('omero_session_ttl_seconds')}="
                f"{settings.omero_session_ttl_seconds}): jobs join the session Run Analysis "
                "opens for each of them")
    return "Sudo mode: jobs act as their user through the service account"


def check_connection(settings: Settings, *, user: str | None = None) -> ConnectionCheck:
    """Say which mode is active; connect, check the Sudo privilege and, for ``user``, that a
    session as them opens.

    In session-key mode the service account is optional (workers do not use it): without one,
    only the mode is reported, and lacking Sudo is no failure.

    Raises:
        ConfigError, MissingExtraError, OmeroConnectionError: as :func:`omero_connection`
            (nothing to report line by line before a connection exists).
    """
    keys = session_key_mode(settings)
    lines: list[tuple[bool, str]] = [(True, _mode_line(settings))]
    if keys and not settings.omero_user:
        if user:
            lines.append((False, f"no service account ({env_var('omero_user')}) to act as "
                                 f"{user!r}"))
        else:
            lines.append((True, "no service account set: nothing more to check (workers do "
                                "not need one in this mode)"))
        return ConnectionCheck(lines)
    conn = _gateway(settings)
    try:
        version = conn.getConfigService().getVersion()
        lines.append((True, f"connected to OMERO {version} at {settings.omero_host}:"
                            f"{settings.omero_port} as {settings.omero_user!r}"))
        sudo = SUDO_PRIVILEGE in _privileges(conn)
        lines.append((sudo or keys, "the service account has the Sudo privilege" if sudo else
                      "the service account lacks the Sudo privilege (not needed in session-key "
                      "mode)" if keys else
                      "the service account lacks the Sudo privilege: jobs cannot act as users"))
        if user:
            try:
                su = _act_as(conn, settings, user, None)
            except OmeroPermissionError as err:
                lines.append((False, str(err)))
            else:
                try:
                    groups = [g.getName() for g in su.getGroupsMemberOf()]
                    lines.append((True, f"acting as {user!r}: member of "
                                        f"{', '.join(groups) or 'no group'}"))
                finally:
                    su.close()
    finally:
        conn.close()
    return ConnectionCheck(lines)
