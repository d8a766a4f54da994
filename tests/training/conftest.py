"""Training tests: one torch thread (tiny models run faster without thread hand-offs, and
other suites on a small machine do not slow them down), shared read-only toy inputs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from toy_training import toy_data, write_start_folder


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(WSI-Bench train file, feature folder) of 4 toy slides, one question each; read only."""
    return toy_data(tmp_path_factory.mktemp("toy"), 4)


@pytest.fixture(scope="session")
def start_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved stage folder (model, processor, text tower) to start runs from; read only."""
    return write_start_folder(tmp_path_factory.mktemp("start") / "model")
