"""Processes an end-to-end test runs beside the emulator: an MLflow server, and the operator from its image.

Test support. Both listen on 127.0.0.1 only and are stopped by their own PID or container name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from support.emulator import Emulator
from support.runtime import podman
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


class OperatorContainer:
    """The operator image run with podman against the emulator, as its Deployment runs it: non-root, read-only
    root filesystem, no capabilities; on the host's network, with a kubeconfig naming the emulator."""

    def __init__(self, emulator: Emulator, image: str, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        kubeconfig = emulator.kubeconfig(directory)
        kubeconfig.chmod(0o644)
        self.name = f"wmtp-e2e-operator-{uuid.uuid4().hex[:8]}"
        self.liveness = f"http://127.0.0.1:{free_port()}/healthz"
        podman(
            "run", "--detach", "--pull=never", "--name", self.name, "--network", "host",
            "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--volume", f"{kubeconfig}:/etc/wmtp-e2e/kubeconfig:ro", "--env", "KUBECONFIG=/etc/wmtp-e2e/kubeconfig",
            image, "--standalone", f"--liveness={self.liveness}",
        )  # fmt: skip
        wait_for(self.alive, timeout=60, interval=0.2, what=f"the operator's liveness endpoint ({self.name})")

    def alive(self) -> bool:
        state = podman("inspect", "--format", "{{.State.Status}}", self.name, check=False).stdout.strip()
        if state not in ("running", "created", "configured"):
            raise RuntimeError(f"the operator container is {state or 'gone'}:\n{self.output()}")
        try:
            with urllib.request.urlopen(self.liveness, timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def output(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def user(self) -> str:
        return podman("exec", self.name, "id", "-u", check=False).stdout.strip()

    def stop(self) -> None:
        podman("stop", "--time", "10", self.name, check=False)
        podman("rm", "--force", self.name, check=False)
