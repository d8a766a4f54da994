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
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from omero_hwsi._deps import require
from omero_hwsi.errors import ConfigError, OmeroConnectionError, OmeroPermissionError
from omero_hwsi.settings import Settings, env_var

__all__ = ["KEEPALIVE_SECONDS", "ConnectionCheck", "check_connection", "omero_connection",
           "read_password"]

logger = logging.getLogger(__name__)

KEEPALIVE_SECONDS: Final = 60
"""How often an open connection pings the server (sessions time out after 10 min idle)."""
SUDO_PRIVILEGE: Final = "Sudo"


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


@contextmanager
def omero_connection(settings: Settings, *, user: str | None = None,
                     group: str | None = None) -> Iterator[Any]:
    """A ``BlitzGateway`` as ``user`` (through Sudo) or as the service account; closed at exit.

    Raises:
        ConfigError: OMERO settings missing or the password file unreadable.
        MissingExtraError: omero-py is not installed (the ``omero`` extra).
        OmeroConnectionError: the server cannot be reached or refused the login.
        OmeroPermissionError: the service account cannot act as ``user``.
    """
    conn = _gateway(settings)
    su = None
    try:
        if user and user != settings.omero_user:
            su = _act_as(conn, settings, user, group)
        yield su or conn
    finally:
        for handle in (su, conn):
            if handle is not None:
                try:
                    handle.close()
                except Exception as err:  # closing must not hide the real error
                    logger.warning("closing an OMERO session failed: %s", type(err).__name__)


@dataclass(frozen=True, slots=True)
class ConnectionCheck:
    """What ``hwsi omero check`` found: each line is a fact, and whether it is fine."""

    lines: list[tuple[bool, str]]

    @property
    def ok(self) -> bool:
        return all(ok for ok, _ in self.lines)


def check_connection(settings: Settings, *, user: str | None = None) -> ConnectionCheck:
    """Connect, check the Sudo privilege and, for ``user``, that a session as them opens.

    Raises:
        ConfigError, MissingExtraError, OmeroConnectionError: as :func:`omero_connection`
            (nothing to report line by line before a connection exists).
    """
    lines: list[tuple[bool, str]] = []
    conn = _gateway(settings)
    try:
        version = conn.getConfigService().getVersion()
        lines.append((True, f"connected to OMERO {version} at {settings.omero_host}:"
                            f"{settings.omero_port} as {settings.omero_user!r}"))
        sudo = SUDO_PRIVILEGE in _privileges(conn)
        lines.append((sudo, "the service account has the Sudo privilege" if sudo else
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
