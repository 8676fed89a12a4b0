"""The test node's rules (support.pods, support.secure_api) against what Kubernetes does: no podman needed.

The container end-to-end story is only as true as these: if the node resolved env, expanded `$(VAR)`, wrote
volumes, reported phases or authorized requests differently from a cluster, the story would prove the wrong thing.
The pods here are the operator's own render of `configs/wmtprun.yaml`, as the Job controller makes them.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.pods import ConfigurationError, ContainerState, pod_status, runnable_pod, termination_message
from support.secure_api import allows, request_attributes
from wmtp.contract import SERVICE_ACCOUNT_DIR, STATUS_PATH
from wmtp_operator import render
from wmtp_operator.spec import Run

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "ns"


def rendered_pod(index: int) -> dict[str, Any]:
    """Pod `index` of attempt 1 of configs/wmtprun.yaml, as the Job controller creates it from the template."""
    body = next(d for d in yaml.safe_load_all((ROOT / "configs" / "wmtprun.yaml").read_text()) if d)
    body["metadata"].update(namespace=NAMESPACE, uid="run-uid")
    job = render.job(Run.from_body(body), 1, pull=True)
    template = copy.deepcopy(job["spec"]["template"])
    name = f"{job['metadata']['name']}-{index}"
    meta = {
        "name": f"{name}-abcde",
        "namespace": NAMESPACE,
        "labels": {**template["metadata"]["labels"], "batch.kubernetes.io/job-name": job["metadata"]["name"]},
        "annotations": {render.INDEX_ANNOTATION: str(index)},
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {**template["spec"], "hostname": name}}


OBJECTS = {
    ("Secret", "wmtp-s3"): {"data": {"AWS_ACCESS_KEY_ID": base64.b64encode(b"key-id").decode(),
                                     "AWS_SECRET_ACCESS_KEY": base64.b64encode(b"s3cret").decode()}},
    ("ConfigMap", "tiny-rho1-config"): {"data": {"config.yaml": "a: 1\n", "recipe.yaml": "b: 2\n"}},
    ("ConfigMap", "kube-root-ca.crt"): {"data": {"ca.crt": "CA"}},
}  # fmt: skip
API = {"host": "127.0.0.1", "port": "6443", "token": "t0ken", "ca": "CA"}


def lookup(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    return OBJECTS.get((kind, name)) if namespace == NAMESPACE else None


def test_rendered_pod_runs_with_resolved_env_expanded_args_and_its_files(tmp_path: Path) -> None:
    pod = rendered_pod(1)
    hosts = {"tiny-rho1-a1-0.tiny-rho1": "127.0.0.1"}
    runnable = runnable_pod(pod, lookup, tmp_path / "pod", hosts, tmp_path / "claims", API)
    trainer = next(c for c in runnable.manifest["spec"]["containers"] if c["name"] == "trainer")
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["NODE_RANK"] == "1" and env["AWS_ACCESS_KEY_ID"] == "key-id"
    assert "AWS_SESSION_TOKEN" not in env  # an optional key that is missing is left out
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1" and env["KUBERNETES_SERVICE_PORT"] == "6443"
    assert "--node-rank=1" in trainer["args"]
    assert trainer["command"] == ["wmtp", "launch"]
    # The projected token volume: the ServiceAccount's token, the root CA and the namespace, as files.
    token_dir = tmp_path / "pod" / "volumes" / render.pod.TOKEN_VOLUME
    assert {p.name: p.read_text() for p in token_dir.iterdir()} == {
        "token": "t0ken",
        "ca.crt": "CA",
        "namespace": NAMESPACE,
    }
    mounts = {m["mountPath"]: m["name"] for m in trainer["volumeMounts"]}
    assert mounts[SERVICE_ACCOUNT_DIR] == render.pod.TOKEN_VOLUME
    assert {"/etc/hosts", "/dev/termination-log", "/tmp", "/workspace"} <= set(mounts)
    hosts_text = (tmp_path / "pod" / "hosts").read_text()
    assert "127.0.0.1\ttiny-rho1-a1-0.tiny-rho1" in hosts_text
    assert "tiny-rho1-a1-1.tiny-rho1.ns.svc.cluster.local tiny-rho1-a1-1" in hosts_text
    assert (tmp_path / "pod" / "volumes" / "config" / "recipe.yaml").read_text() == "b: 2\n"
    volumes = {v["name"]: v for v in runnable.manifest["spec"]["volumes"]}
    assert all("hostPath" in volumes[n] for n in ("workspace", "tmp", "models"))  # the pod's own, never shared
    assert runnable.manifest["spec"]["securityContext"]["runAsUser"] == 1000
    assert set(runnable.termination_logs) == {"pull", "trainer"}


def test_a_missing_secret_is_a_configuration_error(tmp_path: Path) -> None:
    def without_secrets(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return None if kind == "Secret" else lookup(kind, namespace, name)

    with pytest.raises(ConfigurationError, match='secret "wmtp-s3" not found'):
        runnable_pod(rendered_pod(0), without_secrets, tmp_path, {}, tmp_path, API)


def test_a_token_volume_needs_an_api_server(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="service account token"):
        runnable_pod(rendered_pod(0), lookup, tmp_path, {}, tmp_path, api=None)


def state(name: str, status: str, code: int | None = None) -> ContainerState:
    return ContainerState(name, status, exit_code=code)


PULLED = state("pull", "terminated", 0)


@pytest.mark.parametrize(
    ("states", "phase", "trainer_state"),
    [
        ({}, "Pending", "waiting"),
        ({"pull": state("pull", "running")}, "Pending", "waiting"),
        ({"pull": state("pull", "terminated", 3)}, "Failed", "waiting"),
        ({"pull": PULLED, "trainer": state("trainer", "waiting")}, "Pending", "waiting"),
        ({"pull": PULLED, "trainer": state("trainer", "running")}, "Running", "running"),
        ({"pull": PULLED, "trainer": state("trainer", "terminated", 0)}, "Succeeded", "terminated"),
        ({"pull": PULLED, "trainer": state("trainer", "terminated", 75)}, "Failed", "terminated"),
    ],
)
def test_pod_phase_follows_its_containers(states: dict[str, ContainerState], phase: str, trainer_state: str) -> None:
    status = pod_status(rendered_pod(0), states, {"trainer": '{"reason": "Preempted"}'})
    assert status["phase"] == phase
    trainer = status["containerStatuses"][0]["state"]
    assert list(trainer) == [trainer_state]
    if trainer_state == "terminated":
        assert trainer["terminated"]["reason"] == ("Completed" if phase == "Succeeded" else "Error")
        assert trainer["terminated"]["message"] == '{"reason": "Preempted"}'


def test_termination_message_falls_back_to_the_log_only_when_asked(tmp_path: Path) -> None:
    pod = rendered_pod(0)
    empty = tmp_path / "log"
    empty.write_text("")
    assert termination_message(pod, "trainer", empty, lambda: "boom", failed=True) == ""
    next(c for c in pod["spec"]["containers"] if c["name"] == "trainer")["terminationMessagePolicy"] = (
        "FallbackToLogsOnError"
    )
    assert termination_message(pod, "trainer", empty, lambda: "line\nboom", failed=True) == "line\nboom"
    assert termination_message(pod, "trainer", empty, lambda: "boom", failed=False) == ""
    empty.write_text("x" * 10_000)
    assert len(termination_message(pod, "trainer", empty, lambda: "", failed=True)) == 4096


TRAINER_ROLE = {"apiGroups": ["wmtp.io"], "resources": ["wmtpruns/status"], "verbs": ["patch"]}


@pytest.mark.parametrize(
    ("method", "path", "rule", "allowed"),
    [
        ("PATCH", STATUS_PATH.format(namespace="ns", name="run"), TRAINER_ROLE, True),
        ("PATCH", STATUS_PATH.format(namespace="ns", name="run"), {**TRAINER_ROLE, "resourceNames": ["run"]}, True),
        ("PATCH", STATUS_PATH.format(namespace="ns", name="other"), {**TRAINER_ROLE, "resourceNames": ["run"]}, False),
        ("PATCH", "/apis/wmtp.io/v1alpha1/namespaces/ns/wmtpruns/run", TRAINER_ROLE, False),
        ("GET", STATUS_PATH.format(namespace="ns", name="run"), TRAINER_ROLE, False),
        (
            "GET",
            "/api/v1/namespaces/ns/secrets",
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]},
            True,
        ),
        (
            "DELETE",
            "/apis/batch/v1/namespaces/ns/jobs/j",
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
            True,
        ),
    ],
)
def test_rbac_rules_match_as_the_api_server_matches_them(method: str, path: str, rule: dict, allowed: bool) -> None:
    assert allows(rule, request_attributes(method, path)) is allowed
