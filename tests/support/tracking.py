"""A real MLflow server for tests: sqlite backend, artifacts served by the server itself, on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from support.waiting import free_port, wait_for


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """A real `mlflow server` (sqlite backend, artifacts served by the server itself); yields its URL."""
    port = free_port()
    log = root / "mlflow-server.log"
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

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return True
        except OSError:
            return False

    try:
        wait_for(healthy, timeout=120, interval=0.5, what=f"the MLflow server (log: {log})")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
