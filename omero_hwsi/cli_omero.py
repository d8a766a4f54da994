"""``hwsi omero ...``: check the OMERO connection the workers and scripts will use.

Imports omero-py only when a command runs (the ``omero`` extra), never torch.
"""

from __future__ import annotations

from typing import Annotated

import typer

from omero_hwsi import _cli_common as _cli

__all__ = ["omero_app"]

omero_app = typer.Typer(help="OMERO: check the connection, the Sudo privilege and a user's "
                             "access (settings HWSI_OMERO_*; docs/omero.md).",
                        no_args_is_help=True)


@omero_app.command("check")
@_cli._handle_errors
def check(
    user: Annotated[str | None, typer.Option("--user", help="Also open a session as this "
                                             "OMERO user, as a worker does for their jobs.")]
    = None,
) -> None:
    """Say which mode jobs use; in Sudo mode, connect as the service account, check its Sudo
    privilege and, with --user, act as them.

    Prints one line per check; exits 4 when a check fails. The password (from
    HWSI_OMERO_PASSWORD_FILE) is never printed. In session-key mode
    (HWSI_OMERO_SESSION_TTL_SECONDS > 0) jobs join sessions the Run Analysis script opened.
    """
    from omero_hwsi.errors import OmeroPermissionError
    from omero_hwsi.omero.connect import check_connection

    report = check_connection(_cli._settings(), user=user)
    for ok, line in report.lines:
        typer.echo(f"{'ok  ' if ok else 'FAIL'} {line}")
    if not report.ok:
        raise OmeroPermissionError("OMERO check failed: " + "; ".join(
            line for ok, line in report.lines if not ok))
