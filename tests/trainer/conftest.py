"""Fixtures for trainer tests that train: run files on the tiny models, and a real MLflow server."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support import tracking
from support.runs import write_run_files


@pytest.fixture
def run_files(tmp_path: Path, tiny_models: dict[str, Path]) -> Callable[..., tuple[Path, Path]]:
    """Write a config and recipe for a short run on the tiny models; keyword overrides are dotted paths."""
    return functools.partial(write_run_files, tmp_path, tiny_models)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` with a sqlite backend on 127.0.0.1, stopped by its own PID."""
    with tracking.mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread: a tiny model gains nothing from more, and on a shared machine spinning threads make
    each of its steps many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
