"""A real MLflow server for tests: sqlite backend, artifacts served by the server itself, on 127.0.0.1 only; with
an auth ini, MLflow's basic-auth app, and as the chart's Deployment runs it (`chart_mlflow_server`)."""

from __future__ import annotations

import base64
import configparser
import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import requests

from support.chart import render
from support.waiting import free_port, wait_for

USERS_API = "/api/2.0/mlflow/users/create"


@contextlib.contextmanager
def mlflow_server(root: Path, auth_ini: str | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """A real `mlflow server` (sqlite backend, artifacts served by the server itself); yields its URL. With
    `auth_ini` (a basic_auth.ini), the basic-auth app it configures; `env` adds to the server's environment (the
    admin's password, the Flask key)."""
    port = free_port()
    log = root / "mlflow-server.log"
    args = ["server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination",
            str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    # No job runner: its four huey consumers, each a Python importing MLflow, serve GenAI jobs no test asks for.
    environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
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


def chart_server(root: Path) -> tuple[str, dict[str, str], tuple[str, str]]:
    """The chart's basic_auth.ini (its database moved from the volume to `root`), the environment the Deployment
    gives the server (the admin's password and the Flask key from the generated Secret), and the admin's login."""
    objects = render()
    config_map = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "wmtp-mlflow-auth")
    ini_text = config_map["data"]["basic_auth.ini"].replace("sqlite:////mlflow/", f"sqlite:///{root}/")
    secret = next(o for o in objects if o["kind"] == "Secret")["data"]
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "wmtp-mlflow")
    env = {
        e["name"]: base64.b64decode(secret[e["valueFrom"]["secretKeyRef"]["key"]]).decode()
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    ini = configparser.ConfigParser()
    ini.read_string(ini_text)
    return ini_text, env, (ini["mlflow"]["admin_username"], env["MLFLOW_AUTH_ADMIN_PASSWORD"])


@contextlib.contextmanager
def chart_mlflow_server(root: Path, users: dict[str, str]) -> Iterator[tuple[str, tuple[str, str]]]:
    """The chart's MLflow server, login required, with a user for each namespace in `users` (name: password), as
    docs/operator.md has the admin create them; yields its URL and the admin's login."""
    ini, env, admin = chart_server(root)
    with mlflow_server(root, auth_ini=ini, env=env) as url:
        for user, password in users.items():
            made = requests.post(f"{url}{USERS_API}", json={"username": user, "password": password}, auth=admin,
                                 timeout=30)  # fmt: skip
            assert made.status_code == 200, made.text
        yield url, admin
