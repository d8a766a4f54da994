"""Session-key mode: the per-job OMERO session keys, kept out of messages, ledger and logs.

Why: a facility that gives no account the Sudo privilege cannot let workers act as a user
(:mod:`omero_hwsi.omero.connect`). With ``HWSI_OMERO_SESSION_TTL_SECONDS`` above 0, Run Analysis
(running as the user) opens one new session of that user per job, in the image's group, living
that long; the workers join it by its key. A key is as good as the user's password while it
lives, so it travels in neither the task message nor the ledger: it waits in
``<data_dir>/secrets/<job id>`` (folder 0700, file 0600, created exclusively so nothing planted
at that path is written through) and is deleted once the write-back has succeeded.

Nothing here logs a key or puts it in an error message.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from omero_hwsi.errors import ConfigError, InputError, OmeroConnectionError
from omero_hwsi.settings import Settings, env_var

__all__ = ["SECRETS", "close_user_sessions", "forget_session_key", "open_user_sessions",
           "read_session_key", "session_key", "session_key_mode", "write_session_key"]

logger = logging.getLogger(__name__)

SECRETS: Final = "secrets"
"""Folder under ``HWSI_DATA_DIR`` holding one key file per job (mode 0700)."""
_JOB_ID = re.compile(r"[0-9a-f][0-9a-f-]{7,63}")
"""What a job id looks like (a UUID): the file name must not be able to leave the folder."""


def session_key_mode(settings: Settings) -> bool:
    """Whether jobs join sessions Run Analysis opened (True) or act as users through Sudo."""
    return settings.omero_session_ttl_seconds > 0


def _key_path(settings: Settings, job_id: str) -> Path:
    if not _JOB_ID.fullmatch(job_id):
        raise InputError(f"{job_id!r} is not a job id")
    return settings.data_dir / SECRETS / job_id


def _secrets_folder(settings: Settings) -> None:
    """``<data_dir>/secrets``, made if needed and private (0700) in any case.

    Raises:
        ConfigError: it cannot be made or made private.
    """
    folder = settings.data_dir / SECRETS
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)  # an existing folder too: the keys are only the owner's
    except OSError as err:
        raise ConfigError(f"{folder}: cannot make the folder of OMERO session keys "
                          f"({type(err).__name__}); {env_var('data_dir')} must be writable by "
                          "the OMERO server's user in session-key mode") from None


def write_session_key(settings: Settings, job_id: str, key: str) -> None:
    """Store the session key of a newly created job (file mode 0600, folder 0700).

    Call it only for a job this submission created: a duplicate submission keeps the key of
    the job it found. A file already there is a leftover of an earlier job with the same id
    (failed, then pruned) and is replaced.

    Raises:
        ConfigError: the secrets folder cannot be made private or the file written (for
            example ``HWSI_DATA_DIR`` is not writable by the OMERO server's user).
    """
    path = _key_path(settings, job_id)
    _secrets_folder(settings)
    try:
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as err:
        raise ConfigError(f"{path}: cannot store the job's OMERO session key "
                          f"({type(err).__name__})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(key + "\n")
    except OSError as err:
        path.unlink(missing_ok=True)
        raise ConfigError(f"{path}: cannot write the job's OMERO session key "
                          f"({type(err).__name__})") from None


def read_session_key(settings: Settings, job_id: str) -> str | None:
    """The job's session key, or None when there is none (never stored, expired or deleted).

    Raises:
        ConfigError: the file exists but cannot be read (a worker running as another OS user
            than the one that owns the secrets folder).
    """
    path = _key_path(settings, job_id)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the job's OMERO session key "
                          f"({type(err).__name__}); in session-key mode the workers must run "
                          "as the OS user owning that folder") from None
    return text.strip() or None


def forget_session_key(settings: Settings, job_id: str) -> None:
    """Delete the job's key file (nothing happens when there is none)."""
    _key_path(settings, job_id).unlink(missing_ok=True)


def open_user_sessions(conn: Any, settings: Settings, groups: Sequence[str]) -> list[Any]:
    """One new session of ``conn``'s user per entry of ``groups``, in that group.

    Each lives ``omero_session_ttl_seconds`` and may stay idle as long (a job waits in the
    queue and between its stages without touching it); the server's own session limits still
    apply. Either every session opens or none stays open. The secrets folder is made first,
    so a data folder the OMERO server's user cannot write refuses the analysis before anything
    is queued.

    Raises:
        ConfigError: the secrets folder cannot be made private.
        OmeroConnectionError: the server refused a session (one line, no key in it).
    """
    _secrets_folder(settings)
    service = conn.getSessionService()
    ttl_ms = settings.omero_session_ttl_seconds * 1000
    opened: list[Any] = []
    for group in groups:
        try:
            opened.append(service.createUserSession(ttl_ms, ttl_ms, group))
        except Exception as err:  # Ice errors at this edge become one line
            close_user_sessions(conn, opened)
            raise OmeroConnectionError(
                f"OMERO: cannot open a session for the analysis in group {group!r} "
                f"({type(err).__name__}); session-key mode "
                f"({env_var('omero_session_ttl_seconds')})") from None
    return opened


def session_key(session: Any) -> str:
    """The key of an ``omero.model.Session`` (its UUID)."""
    return str(session.getUuid().getValue())


def close_user_sessions(conn: Any, sessions: Sequence[Any]) -> None:
    """Close sessions no job took; a failure is logged (they end at their TTL anyway)."""
    if not sessions:
        return
    service = conn.getSessionService()
    for session in sessions:
        try:
            service.closeSession(session)
        except Exception as err:  # best effort: the TTL bounds a session left open
            logger.warning("closing an unused OMERO session failed: %s", type(err).__name__)
