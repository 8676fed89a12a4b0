"""The chart's MLflow server as its Deployment would run it: the rendered basic_auth.ini and the environment the
Deployment gives (the admin's password and the Flask key from the generated Secret), served by the MLflow the
trainer installs. Without a login nothing is served; each namespace's user writes what it created and may only read
another's, so no tenant overwrites another's runs or registered models, the trainer's own registration included."""

from __future__ import annotations

import base64
import configparser
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from support.chart import render
from support.tracking import mlflow_server
from wmtp.config import MLflowSettings
from wmtp.tracking import Tracker

pytestmark = pytest.mark.slow
API = "/api/2.0/mlflow"
TEAMS = {"team-a": "pw-team-a-0123", "team-b": "pw-team-b-4567"}


def chart_server(root: Path) -> tuple[str, dict[str, str], tuple[str, str]]:
    """The chart's basic_auth.ini (its database moved from the volume to `root`), the environment the Deployment
    gives the server, and the admin's login."""
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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, tuple[str, str]]]:
    root = tmp_path_factory.mktemp("mlflow-auth")
    ini, env, admin = chart_server(root)
    with mlflow_server(root, auth_ini=ini, env=env) as url:
        for user, password in TEAMS.items():  # what docs/operator.md has the admin do for each namespace
            made = requests.post(f"{url}{API}/users/create", json={"username": user, "password": password},
                                 auth=admin, timeout=30)  # fmt: skip
            assert made.status_code == 200, made.text
        yield url, admin


def call(url: str, method: str, path: str, auth: tuple[str, str] | None = None, **body: Any) -> requests.Response:
    kwargs = {"json": body} if method == "POST" else {"params": body}
    return requests.request(method, f"{url}{API}/{path}", auth=auth, timeout=30, **kwargs)


def test_the_charts_mlflow_server_refuses_a_request_without_a_login_and_accepts_the_admins(
    server: tuple[str, tuple[str, str]],
) -> None:
    url, admin = server
    assert call(url, "GET", "experiments/search", max_results=1).status_code == 401
    assert call(url, "GET", "experiments/search", (admin[0], "wrong"), max_results=1).status_code == 401
    assert call(url, "GET", "experiments/search", admin, max_results=1).status_code == 200
    assert requests.get(f"{url}/health", timeout=30).status_code == 200  # the probes need no login


def test_a_namespace_can_read_but_never_overwrite_another_namespaces_runs_and_registered_models(
    server: tuple[str, tuple[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = server
    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")

    def tracker(team: str) -> Tracker:
        """The trainer's tracker with a team's credentials, as the operator renders its config and env."""
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", team)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", TEAMS[team])
        names = {"experiment": f"{team}/wmtp", "registered_model": f"wmtp-{team}-rho1-wmtp"}
        return Tracker(MLflowSettings(tracking_uri=url, **names), tmp_path / team)

    own = tracker("team-a")
    own.start("tiny", {"seed": "7"}, {})
    assert own.register_model(folder, "rho1-wmtp") == "1" and not own.warnings
    own.end()

    team_b = ("team-b", TEAMS["team-b"])
    assert call(url, "GET", "runs/get", team_b, run_id=own.run_id).status_code == 200  # default_permission READ
    metric = {"run_id": own.run_id, "key": "loss", "value": 9.0, "timestamp": 0, "step": 1}
    assert call(url, "POST", "runs/log-metric", team_b, **metric).status_code == 403
    version = {"name": "wmtp-team-a-rho1-wmtp", "source": "models:/wmtp-team-a-rho1-wmtp/1"}
    assert call(url, "POST", "model-versions/create", team_b, **version).status_code == 403
    assert call(url, "POST", "registered-models/delete", team_b, name="wmtp-team-a-rho1-wmtp").status_code == 403

    # The trainer of another namespace pointed at team-a's name registers nothing: a warning, training goes on.
    other = tracker("team-b")
    other.settings = other.settings.model_copy(update={"registered_model": "wmtp-team-a-rho1-wmtp"})
    other.start("tiny", {"seed": "7"}, {})
    assert other.run_id is not None
    assert other.register_model(folder, "rho1-wmtp") is None and "Permission denied" in other.warnings[-1]
    other.end()
    versions = call(
        url, "GET", "model-versions/search", ("team-a", TEAMS["team-a"]), filter="name='wmtp-team-a-rho1-wmtp'"
    )
    assert [v["version"] for v in versions.json()["model_versions"]] == ["1"]
