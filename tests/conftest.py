"""Shared fixtures: checksum-verified real slides, cached synthetic slides, QuPath skips, and
real ``hwsi worker`` subprocesses (jobs and OMERO tests)."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def _expected_checksums() -> dict[str, str]:
    table = (DATA / "SOURCES.md").read_text(encoding="utf-8")
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| (\S+) \|.*\| ([0-9a-f]{64}) \|$", table, re.M)}


@pytest.fixture(scope="session")
def fixture_slide() -> Callable[[str], Path]:
    """Path of a real test slide from tests/data, its sha256 checked against SOURCES.md."""
    expected = _expected_checksums()
    verified: set[str] = set()

    def get(name: str) -> Path:
        path = DATA / name
        if name not in verified:
            assert name in expected, f"{name} is not listed in tests/data/SOURCES.md"
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert digest == expected[name], f"{name}: checksum mismatch, the test data is damaged"
            verified.add(name)
        return path

    return get


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Write (once per session and parameter set) a synthetic pyramidal SVS."""
    from omero_hwsi.synthetic import write_svs

    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("synthetic")

    def make(**kwargs: object) -> Path:
        key = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        if key not in cache:
            path = root / f"slide-{len(cache)}.svs"
            write_svs(path, **kwargs)  # type: ignore[arg-type]
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HWSI_* settings pointing into tmp_path, nothing read from the host's config."""
    for var in list(os.environ):
        if var.startswith("HWSI_"):
            monkeypatch.delenv(var)
    data = tmp_path / "hwsi-data"
    monkeypatch.setenv("HWSI_DATA_DIR", str(data))
    monkeypatch.setenv("HWSI_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")
    return data


@functools.cache
def qupath_missing() -> str | None:
    """Why QuPath projects cannot be used here (our one-line error), or None when they can."""
    from omero_hwsi.errors import MissingResourceError
    from qupath_bridge.project import require_qupath

    try:
        require_qupath()
    except MissingResourceError as err:
        return str(err)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``qupath`` are skipped, with the reason, where no QuPath install is found."""
    marked = [item for item in items if item.get_closest_marker("qupath")]
    reason = qupath_missing() if marked else None
    for item in marked if reason else []:
        item.add_marker(pytest.mark.skip(reason=f"needs QuPath: {reason}"))


@pytest.fixture
def without_qupath() -> str:
    """For tests of the error without QuPath: skipped where QuPath is installed."""
    reason = qupath_missing()
    if reason is None:
        pytest.skip("QuPath is installed here; this test checks the error without it")
    return reason


@dataclass
class Workers:
    """``hwsi worker`` subprocesses started by a test; stopped (by their ids) at teardown."""

    root: Path
    procs: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def start(self, env: dict[str, str], *, queues: str, name: str,
              program: Sequence[str] = ("-m", "omero_hwsi.cli")) -> subprocess.Popen[bytes]:
        """Start ``hwsi worker`` in its own process group; ``program`` replaces ``-m
        omero_hwsi.cli`` for a test wrapper that runs the same CLI (``poison_worker.py``)."""
        log = self.root / f"worker-{name}.log"
        handle = log.open("wb")
        proc = subprocess.Popen(
            [sys.executable, *program, "worker", "--queues", queues,
             "--concurrency", "1", "--name", f"{name}@%h"],
            env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        handle.close()
        self.procs.append((proc, log))
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {log.name} ---\n{log.read_text(errors='replace')[-6000:]}"
                         for _, log in self.procs)

    def stop(self) -> None:
        """Cold shutdown (SIGQUIT to the worker's main process), then SIGKILL its group.

        A cold shutdown during a task can hang in billiard's pool finaliser, hence the kill.
        """
        for proc, _ in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGQUIT)
        deadline = time.monotonic() + 8
        for proc, _ in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture
def workers(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Workers]:
    """Start worker subprocesses; their logs are printed when the test fails."""
    pool = Workers(tmp_path)
    yield pool
    pool.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(pool.logs())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)
