"""The error family users can hit, each class with a fixed process exit code.

Messages are one line: what went wrong, with which value, and what to do. The CLI prints
``str(err)`` unwrapped and exits with ``err.exit_code``; anything that is not an
:class:`HwsiError` is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CheckpointMismatchError",
    "ConfigError",
    "FeatureStoreError",
    "GeoJSONError",
    "HwsiError",
    "InputError",
    "JobError",
    "JobFailedError",
    "JobNotFoundError",
    "MissingExtraError",
    "MissingResourceError",
    "ModelFileNotFoundError",
    "MppError",
    "NoTissueError",
    "OmeroConnectionError",
    "OmeroNotFoundError",
    "OmeroPermissionError",
    "RegionError",
    "ServiceError",
    "SlideNotFoundError",
    "SlideOpenError",
    "SlideReadError",
    "UnknownEncoderError",
    "check_choice",
]


class HwsiError(Exception):
    """Base of every error a user can cause; ``exit_code`` is the CLI's exit status."""

    exit_code: int = 1

    def __str__(self) -> str:
        # One line, always: newlines in a wrapped cause would break log parsing and the CLI.
        # Exception.__str__, not super(): KeyError (a base of some subclasses) quotes its text.
        return " ".join(Exception.__str__(self).split())


class InputError(HwsiError):
    """Bad input: a missing or unreadable slide, a wrong MPP, malformed geometry (exit 2)."""

    exit_code = 2


class ConfigError(InputError):
    """A setting (environment variable, TOML file or option) has an invalid value."""


class SlideNotFoundError(InputError, FileNotFoundError):
    """The slide path does not exist."""


class SlideOpenError(InputError):
    """The file exists but no backend can open it as a slide (unsupported or corrupt)."""


class SlideReadError(InputError):
    """The slide opened but reading its pixels failed."""


class MppError(InputError):
    """The microns-per-pixel value is missing, implausible or too coarse for the request."""


class NoTissueError(InputError):
    """No tissue was found, or the slide is smaller than one patch."""


class RegionError(InputError):
    """User-given regions are unusable (empty, outside the slide)."""


class GeoJSONError(InputError):
    """A GeoJSON file is malformed or holds unsupported geometry."""


class MissingResourceError(HwsiError):
    """Something that must be installed or present locally is not (exit 3)."""

    exit_code = 3


class MissingExtraError(MissingResourceError, ImportError):
    """An optional dependency group (e.g. ``worker`` for torch) is not installed."""


class ModelFileNotFoundError(MissingResourceError, FileNotFoundError):
    """A model, tokenizer or encoder file is missing from its local path."""


class UnknownEncoderError(MissingResourceError, KeyError):
    """An encoder name is not in the registry."""


class CheckpointMismatchError(MissingResourceError):
    """A checkpoint's layout, keys or shapes do not match what is expected."""


class FeatureStoreError(MissingResourceError):
    """A feature store is missing, incomplete or was made with different parameters."""


class ServiceError(HwsiError):
    """An external service (OMERO, broker, database) failed or refused (exit 4)."""

    exit_code = 4


class OmeroConnectionError(ServiceError):
    """The OMERO server cannot be reached or refused the login."""


class OmeroNotFoundError(ServiceError):
    """An OMERO object id does not exist or is not visible to the user."""


class OmeroPermissionError(ServiceError):
    """The requesting user may not read or write the OMERO object."""


class JobError(HwsiError):
    """A queued job is unknown or ended badly (exit 5)."""

    exit_code = 5


class JobNotFoundError(JobError):
    """No job with that id exists in the ledger."""


class JobFailedError(JobError):
    """The job ended in the failed or dead-letter state."""


def check_choice(option: str, value: str, allowed: Sequence[str]) -> None:
    """Refuse ``value`` of ``option`` in one line (:class:`InputError`) unless it is ``allowed``.

    Every front end (CLI options, job requests) names the option and its vocabulary the same way.
    """
    if value not in allowed:
        raise InputError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")
