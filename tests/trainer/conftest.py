"""Fixtures for trainer tests that train: run files on the tiny models, and a real MLflow server."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.runs import write_run_files
from support.waiting import free_port


@pytest.fixture
def run_files(tmp_path: Path, tiny_models: dict[str, Path]) -> Callable[..., tuple[Path, Path]]:
    """Write a config and recipe for a short run on the tiny models; keyword overrides are dotted paths."""
    return functools.partial(write_run_files, tmp_path, tiny_models)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` with a sqlite backend on 127.0.0.1, stopped by its own PID."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = root / "server.log"
    args = ["server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination",
            str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), *args],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            break
        except OSError as err:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"mlflow server did not start: {log.read_text()[-2000:]}") from err
            time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
