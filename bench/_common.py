"""Helpers shared by the benchmarks: synthetic slides and a PSS sampler."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil

from omero_hwsi.synthetic import write_svs

OUTPUT = Path(__file__).parent / "output"


def synthetic(name: str, **kwargs: object) -> Path:
    """A synthetic slide in bench/output, written once and reused by later runs."""
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / name
    if not path.exists():
        started = time.perf_counter()
        write_svs(path, **kwargs)  # type: ignore[arg-type]
        print(f"wrote {path.name} ({path.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - started:.1f} s")
    return path


class PssSampler:
    """Samples the summed PSS of a process and all its children in a background thread.

    PSS (proportional set size) splits shared pages between the processes that map them, so
    summing it over a process tree counts shared libraries once, unlike RSS.
    """

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for proc in procs:
                try:
                    total += proc.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
