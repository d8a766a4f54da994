"""One frozen settings object, read from ``HWSI_*`` environment variables and a TOML file.

Precedence, highest first: environment variable, TOML file, built-in default. An empty
environment variable counts as unset. The TOML file is ``$HWSI_CONFIG`` if set, else
``/etc/omero-hwsi.toml`` if it exists; its keys are the field names below (``data_dir``,
``mpp_tolerance``, ...), unknown keys are refused so typos do not pass silently. Relative paths
in the TOML file are taken relative to the file's folder.

Stages never take the whole object: callers pass the few values a stage needs.
Every field is documented in ``docs/configuration.md`` (a test keeps the two in step).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omero_hwsi.errors import ConfigError

__all__ = ["DEFAULT_CONFIG_PATH", "ENV_PREFIX", "Settings", "load_settings"]

ENV_PREFIX = "HWSI_"
DEFAULT_CONFIG_PATH = Path("/etc/omero-hwsi.toml")


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "omero-hwsi"


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of omero-hwsi; build it with :func:`load_settings`."""

    config: Path | None = field(default=None, metadata=_doc(
        "TOML file read for settings (default `/etc/omero-hwsi.toml` if present)."))
    data_dir: Path = field(default_factory=_default_data_dir, metadata=_doc(
        "Root for caches, feature stores and results; shared by all workers."))
    feature_dir: Path | None = field(default=None, metadata=_doc(
        "Where feature stores are written (default `<data_dir>/features`)."))
    model: Path | None = field(default=None, metadata=_doc(
        "Model folder used when a command, job or OMERO script names none (default: the "
        "embedded demo model)."))
    model_dir: Path | None = field(default=None, metadata=_doc(
        "Where models, tokenizers and encoder weights are looked up (default `<data_dir>/models`)."))
    target_mpp: float = field(default=0.5, metadata=_doc(
        "Microns per pixel at which regions and patches are cut and encoded."))
    region_px: int = field(default=4096, metadata=_doc(
        "Region side in pixels at `target_mpp` (4096 px at 0.5 um/px = 2.048 mm)."))
    patch_px: int = field(default=256, metadata=_doc(
        "Patch side in pixels at `target_mpp`; must divide `region_px`."))
    mpp_tolerance: float = field(default=0.05, metadata=_doc(
        "Relative MPP difference under which pixels are used as they are (no resampling)."))
    min_tissue_fraction: float = field(default=0.25, metadata=_doc(
        "Fraction of a patch that must lie on tissue for the patch to be kept."))
    candidates_per_region: int = field(default=32, metadata=_doc(
        "Diversity candidates kept per region by semantic patch selection."))
    patches_per_region: int = field(default=16, metadata=_doc(
        "Patches per region selected by relevance among the candidates (k)."))
    extract_workers: int = field(default=2, metadata=_doc(
        "Worker processes reading and encoding patches during extraction (0 = in-process)."))
    evidence_top_regions: int = field(default=4, metadata=_doc(
        "Evidence: regions (best first) whose patches are scored after every region is scored."))
    evidence_top_patches: int = field(default=4, metadata=_doc(
        "Evidence: patches (best first) whose nuclei are scored."))
    evidence_batch_size: int = field(default=16, metadata=_doc(
        "Evidence: masked variants scored per forward pass of the language model."))
    log_level: str = field(default="WARNING", metadata=_doc(
        "Python logging level for the CLI (DEBUG, INFO, WARNING, ERROR)."))
    qupath_invalid_geometry: Literal["repair", "refuse"] = field(default="repair", metadata=_doc(
        "Self-intersecting polygons in QuPath GeoJSON: `repair` (make valid, logged) or `refuse`."))
    qupath_max_file_mb: float = field(default=200.0, metadata=_doc(
        "Largest QuPath GeoJSON file read, in MB (10^6 bytes); checked before reading."))
    qupath_max_features: int = field(default=1_000_000, metadata=_doc(
        "Most features read from one QuPath GeoJSON file."))
    qupath_max_vertices: int = field(default=10_000_000, metadata=_doc(
        "Most vertices (positions) read from one QuPath GeoJSON file, all geometries together."))
    broker_url: str = field(default="", repr=False, metadata=_doc(
        "Celery broker (`redis://...`, `amqp://...`); empty: the embedded single-machine "
        "transport, SQLite at `<data_dir>/broker.sqlite`."))
    database_url: str = field(default="", repr=False, metadata=_doc(
        "Job ledger database (`postgresql://...`, any SQLAlchemy URL); empty: SQLite at "
        "`<data_dir>/ledger.sqlite`."))
    result_backend: str = field(default="", repr=False, metadata=_doc(
        "Optional Celery result backend (e.g. `redis://...`, for Flower); the ledger is the "
        "source of truth either way."))
    max_task_seconds: int = field(default=3600, metadata=_doc(
        "Longest a job stage may run; sets the soft and hard task time limits and the Redis "
        "visibility timeout (see `workers.md`)."))
    task_retries: int = field(default=2, metadata=_doc(
        "Restarts of a job after its worker died; past this the job goes to `dead_letter`."))
    heartbeat_seconds: float = field(default=10.0, metadata=_doc(
        "How often a running task writes its heartbeat into the job ledger."))
    stale_seconds: float = field(default=60.0, metadata=_doc(
        "A running job whose heartbeat is older than this has no live task: the reconciler "
        "enqueues its stage again."))
    requeue_seconds: float = field(default=3600.0, metadata=_doc(
        "A job queued this long without any worker starting it is enqueued again (a message "
        "lost by the broker); duplicates are dropped at task start."))
    reconcile_seconds: float = field(default=30.0, metadata=_doc(
        "How often each worker runs the reconciler (also once at worker start)."))

    omero_host: str = field(default="", metadata=_doc(
        "OMERO server host the workers and `hwsi omero` connect to; unset: no OMERO."))
    omero_port: int = field(default=4064, metadata=_doc(
        "OMERO server port (4064: Ice over TLS)."))
    omero_user: str = field(default="", metadata=_doc(
        "OMERO service account with the Sudo privilege; it acts as each job's requesting user."))
    omero_password_file: Path | None = field(default=None, metadata=_doc(
        "File holding the service account's password (one line; keep it mode 0600). The "
        "password itself is never a setting, never logged and never put in a message."))
    omero_cache_max_bytes: int = field(default=200_000_000_000, metadata=_doc(
        "Size limit of the cache of slides downloaded from OMERO (`<data_dir>/omero-cache`); "
        "least recently used slides are evicted past it."))
    omero_web_url: str = field(default="", metadata=_doc(
        "OMERO.web address (e.g. `https://omero.lab/`) for links in reports and report indexes."))
    omero_session_ttl_seconds: int = field(default=0, metadata=_doc(
        "0: Sudo mode (the service account acts as each user). Above 0: session-key mode, for "
        "a facility that gives no account Sudo: Run Analysis opens one session of the user per "
        "job, living this many seconds, whose key waits for the workers in "
        "`<data_dir>/secrets/<job id>` (mode 0600) and is deleted after the write-back. At "
        "most 4 x `max_task_seconds`: a job runs four stages of at most `max_task_seconds` "
        "each, so a longer key would outlive any job (see `omero.md`)."))

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.target_mpp > 0, f"target_mpp must be > 0, got {self.target_mpp}"),
            (self.region_px > 0, f"region_px must be > 0, got {self.region_px}"),
            (self.patch_px > 0, f"patch_px must be > 0, got {self.patch_px}"),
            (self.patch_px <= self.region_px and self.region_px % self.patch_px == 0,
             f"patch_px ({self.patch_px}) must divide region_px ({self.region_px})"),
            (0 <= self.mpp_tolerance < 1, f"mpp_tolerance must be in [0, 1), got {self.mpp_tolerance}"),
            (0 < self.min_tissue_fraction <= 1,
             f"min_tissue_fraction must be in (0, 1], got {self.min_tissue_fraction}"),
            (self.candidates_per_region >= 1,
             f"candidates_per_region must be >= 1, got {self.candidates_per_region}"),
            (1 <= self.patches_per_region <= self.candidates_per_region,
             f"patches_per_region must be in [1, candidates_per_region], got {self.patches_per_region}"),
            (self.extract_workers >= 0, f"extract_workers must be >= 0, got {self.extract_workers}"),
            (self.evidence_top_regions >= 0,
             f"evidence_top_regions must be >= 0, got {self.evidence_top_regions}"),
            (self.evidence_top_patches >= 0,
             f"evidence_top_patches must be >= 0, got {self.evidence_top_patches}"),
            (self.evidence_batch_size >= 1,
             f"evidence_batch_size must be >= 1, got {self.evidence_batch_size}"),
            (self.log_level.upper() in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"},
             f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}"),
            (self.qupath_invalid_geometry in ("repair", "refuse"),
             f"qupath_invalid_geometry must be repair or refuse, got {self.qupath_invalid_geometry!r}"),
            (self.qupath_max_file_mb > 0,
             f"qupath_max_file_mb must be > 0, got {self.qupath_max_file_mb}"),
            (self.qupath_max_features >= 1,
             f"qupath_max_features must be >= 1, got {self.qupath_max_features}"),
            (self.qupath_max_vertices >= 1,
             f"qupath_max_vertices must be >= 1, got {self.qupath_max_vertices}"),
            (self.max_task_seconds >= 1,
             f"max_task_seconds must be >= 1, got {self.max_task_seconds}"),
            (self.task_retries >= 0, f"task_retries must be >= 0, got {self.task_retries}"),
            (self.heartbeat_seconds > 0,
             f"heartbeat_seconds must be > 0, got {self.heartbeat_seconds}"),
            (self.stale_seconds > self.heartbeat_seconds,
             f"stale_seconds ({self.stale_seconds}) must exceed heartbeat_seconds "
             f"({self.heartbeat_seconds})"),
            (self.requeue_seconds > 0, f"requeue_seconds must be > 0, got {self.requeue_seconds}"),
            (self.reconcile_seconds > 0,
             f"reconcile_seconds must be > 0, got {self.reconcile_seconds}"),
            (0 < self.omero_port < 65536, f"omero_port must be in 1..65535, got {self.omero_port}"),
            (self.omero_cache_max_bytes > 0,
             f"omero_cache_max_bytes must be > 0, got {self.omero_cache_max_bytes}"),
            (0 <= self.omero_session_ttl_seconds <= 4 * self.max_task_seconds,
             f"omero_session_ttl_seconds must be in [0, 4 x max_task_seconds = "
             f"{4 * self.max_task_seconds}], got {self.omero_session_ttl_seconds}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"invalid setting: {message}")

    @property
    def features_path(self) -> Path:
        """The feature-store root, resolved against ``data_dir``."""
        return self.feature_dir or self.data_dir / "features"

    @property
    def models_path(self) -> Path:
        """The model root, resolved against ``data_dir``."""
        return self.model_dir or self.data_dir / "models"

    @property
    def ledger_url(self) -> str:
        """The job ledger's SQLAlchemy URL (``database_url`` or the SQLite default)."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'ledger.sqlite').absolute()}"

    @property
    def broker(self) -> str:
        """The Celery broker URL (``broker_url`` or the embedded SQLite transport)."""
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').absolute()}"

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def env_var(name: str) -> str:
    """The environment variable that sets field ``name``."""
    return ENV_PREFIX + name.upper()


def _field_types() -> dict[str, type]:
    kinds: dict[str, type] = {}
    for f in dataclasses.fields(Settings):
        text = str(f.type)
        kinds[f.name] = Path if "Path" in text else int if text == "int" else float if text == "float" else str
    return kinds


def _convert(name: str, raw: Any, kind: type, source: str, base: Path | None) -> Any:
    try:
        if kind is Path:
            path = Path(str(raw)).expanduser()
            return (base / path) if base is not None and not path.is_absolute() else path
        if kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return int(raw)
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError(raw)
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"invalid setting {name} from {source}: {raw!r} is not a valid {kind.__name__}"
        ) from err


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: settings file not found (set by {env_var('config')})") from err
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: cannot read settings file: {err}") from err


def load_settings(
    environ: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Build the settings from the environment, the TOML file and explicit ``overrides``.

    ``overrides`` (e.g. from CLI options) win over everything else; ``None`` values are ignored.

    Raises:
        ConfigError: a value does not parse or is out of range, or the TOML file is unreadable
            or holds an unknown key.
    """
    env = os.environ if environ is None else environ
    kinds = _field_types()
    values: dict[str, Any] = {}

    config_raw = env.get(env_var("config")) or None
    config_path = Path(config_raw).expanduser() if config_raw else None
    if config_path is None and DEFAULT_CONFIG_PATH.is_file():
        config_path = DEFAULT_CONFIG_PATH
    if config_path is not None:
        table = _read_toml(config_path)
        unknown = sorted(set(table) - set(kinds) - {"config"})
        if unknown:
            raise ConfigError(
                f"{config_path}: unknown setting(s) {', '.join(unknown)}; "
                "see docs/configuration.md for the valid names"
            )
        for name, raw in table.items():
            if name != "config":
                values[name] = _convert(name, raw, kinds[name], str(config_path), config_path.parent)
        values["config"] = config_path

    for name, kind in kinds.items():
        if name == "config":
            continue
        raw = env.get(env_var(name))
        if raw is not None and raw.strip() != "":
            values[name] = _convert(name, raw.strip(), kind, env_var(name), None)

    for name, raw in overrides.items():
        if name not in kinds:
            raise TypeError(f"unknown setting {name!r}")
        if raw is not None:
            values[name] = _convert(name, raw, kinds[name], "an option", None)

    return Settings(**values)
