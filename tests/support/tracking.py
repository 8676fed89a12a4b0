"""A real MLflow server for tests: sqlite backend, artifacts served by the server itself, on 127.0.0.1 only; with
an auth ini, MLflow's basic-auth app."""

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
def mlflow_server(root: Path, auth_ini: str | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """A real `mlflow server` (sqlite backend, artifacts served by the server itself); yields its URL. With
    `auth_ini` (a basic_auth.ini), the basic-auth app it configures; `env` adds to the server's environment (the
    admin's password, the Flask key)."""
    port = free_port()
    log = root / "mlflow-server.log"
    args = ["server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination",
            str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    environment = {**os.environ, **(env or {})}
    if auth_ini is not None:
        (root / "basic_auth.ini").write_text(auth_ini)
        environment["MLFLOW_AUTH_CONFIG_PATH"] = str(root / "basic_auth.ini")
        args += ["--app-name", "basic-auth"]
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), *args],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=environment,
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
