"""What every HWSI OMERO script shares: its credits and the run around its one action.

Why a module of its own: the server runs each script file in a child of its Python and first
runs it in "parse only" mode to read its parameters, so a script should import little at its
top. This module imports only the standard library at import time; omero-py, the settings and
the script actions (:mod:`omero_hwsi.omero.script_actions`) load when the script runs.
"""

from __future__ import annotations

from typing import Any, Final

from omero_hwsi import __version__

__all__ = ["SCRIPT_INFO", "run_script"]

SCRIPT_INFO: Final[dict[str, Any]] = {
    "version": __version__,
    "authors": ["omero-hwsi developers"],
    "institutions": ["omero-hwsi"],
    "contact": "https://github.com/omero-hwsi/omero-hwsi",
}
"""Keyword arguments of ``omero.scripts.client`` common to the HWSI scripts."""


def run_script(client: Any, action: str) -> None:
    """Run ``script_actions.<action>(conn, inputs, settings=...)`` as the script's user.

    The action returns a :class:`~omero_hwsi.omero.script_actions.ScriptOutcome`; its message
    becomes the ``Message`` output and its ``outputs`` the others (strings as text, anything
    else as an OMERO object). An error becomes a one-line ``Message`` instead of a traceback in
    the Activities panel. The session is always closed.
    """
    from omero.gateway import BlitzGateway
    from omero.rtypes import robject, rstring

    from omero_hwsi.omero import script_actions
    from omero_hwsi.settings import load_settings

    try:
        conn = BlitzGateway(client_obj=client)
        try:
            outcome = getattr(script_actions, action)(conn, client.getInputs(unwrap=True),
                                                      settings=load_settings())
        except Exception as err:  # the Activities panel shows one line, not a traceback
            client.setOutput("Message", rstring(script_actions.script_error(err)))
            return
        client.setOutput("Message", rstring(outcome.message))
        for name, value in outcome.outputs.items():
            client.setOutput(name, rstring(value) if isinstance(value, str) else robject(value))
    finally:
        client.closeSession()
