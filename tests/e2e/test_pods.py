"""The test kubelet's rules (support.pods, support.secure_api) against what Kubernetes does: no podman needed.

The container end-to-end story is only as true as these: if the harness resolved env, expanded `$(VAR)`,
reported phases or authorized requests differently from a cluster, the story would prove the wrong thing.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from support.pods import (
    ConfigurationError,
    ContainerState,
    expand,
    job_failed,
    job_pods,
    job_status,
    pod_status,
    runnable_pod,
    termination_message,
)
from support.secure_api import allows, request_attributes
from wmtp.contract import STATUS_PATH
from wmtp_operator.render import INDEX_ANNOTATION


def indexed_job(completions: int = 2, backoff_limit: int = 0) -> dict[str, Any]:
    container = {
        "name": "trainer",
        "image": "trainer:dev",
        "command": ["torchrun"],
        "args": ["--node-rank=$(NODE_RANK)", "--master-port=29500", "$$(NODE_RANK)", "$(UNDEFINED)"],
        "env": [
            {
                "name": "NODE_RANK",
                "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}},
            },
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}}},
            {
                "name": "TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_SESSION_TOKEN", "optional": True}},
            },
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/wmtp"},
            {"name": "workspace", "mountPath": "/workspace"},
        ],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "run-a1", "namespace": "ns", "uid": "job-uid"},
        "spec": {
            "completionMode": "Indexed",
            "completions": completions,
            "backoffLimit": backoff_limit,
            "template": {
                "metadata": {"labels": {"wmtp.io/run": "run"}},
                "spec": {
                    "restartPolicy": "Never",
                    "subdomain": "run",
                    "initContainers": [{**container, "name": "pull", "command": ["wmtp", "pull"], "args": []}],
                    "containers": [container],
                    "volumes": [
                        {"name": "config", "configMap": {"name": "run-config"}},
                        {"name": "workspace", "emptyDir": {}},
                    ],
                },
            },
        },
    }


OBJECTS = {
    ("Secret", "s3"): {"data": {"AWS_ACCESS_KEY_ID": base64.b64encode(b"key-id").decode()}},
    ("ConfigMap", "run-config"): {"data": {"config.yaml": "a: 1\n"}},
}


def lookup(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    return OBJECTS.get((kind, name))


def test_indexed_job_pods_carry_their_index_and_hostname() -> None:
    pods = job_pods(indexed_job(completions=3))
    assert [p["metadata"]["annotations"][INDEX_ANNOTATION] for p in pods] == ["0", "1", "2"]
    assert [p["spec"]["hostname"] for p in pods] == ["run-a1-0", "run-a1-1", "run-a1-2"]
    assert all(p["metadata"]["labels"]["batch.kubernetes.io/job-name"] == "run-a1" for p in pods)
    assert all(p["metadata"]["ownerReferences"][0]["uid"] == "job-uid" for p in pods)
    env = pods[0]["spec"]["containers"][0]["env"]
    assert env[-1]["name"] == "JOB_COMPLETION_INDEX"


def test_runnable_pod_resolves_env_and_expands_references_as_a_kubelet(tmp_path: Path) -> None:
    pod = job_pods(indexed_job())[1]
    api = {"host": "127.0.0.1", "port": "6443", "token": "t0ken", "ca": "CA"}
    runnable = runnable_pod(pod, lookup, tmp_path / "pod", {"run-a1-0.run": "127.0.0.1"}, tmp_path / "claims", api)
    trainer = runnable.manifest["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["NODE_RANK"] == "1" and env["KEY"] == "key-id" and env["POD"] == pod["metadata"]["name"]
    assert "TOKEN" not in env  # an optional key that is missing is left out
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1" and env["KUBERNETES_SERVICE_PORT"] == "6443"
    assert trainer["args"] == ["--node-rank=1", "--master-port=29500", "$(NODE_RANK)", "$(UNDEFINED)"]
    hosts = (tmp_path / "pod" / "hosts").read_text()
    assert "127.0.0.1\trun-a1-0.run" in hosts and "run-a1-1.run.ns.svc.cluster.local run-a1-1" in hosts
    assert (tmp_path / "pod" / "serviceaccount" / "token").read_text() == "t0ken"
    assert (tmp_path / "pod" / "volumes" / "config" / "config.yaml").read_text() == "a: 1\n"
    volumes = {v["name"]: v for v in runnable.manifest["spec"]["volumes"]}
    assert "hostPath" in volumes["workspace"]  # an emptyDir is the pod's own folder, never shared
    mounts = {m["mountPath"] for m in trainer["volumeMounts"]}
    assert {"/etc/hosts", "/dev/termination-log", "/var/run/secrets/kubernetes.io/serviceaccount"} <= mounts
    assert set(runnable.termination_logs) == {"pull", "trainer"}


def test_a_missing_secret_is_a_configuration_error(tmp_path: Path) -> None:
    pod = job_pods(indexed_job())[0]
    with pytest.raises(ConfigurationError, match='secret "s3" not found'):
        runnable_pod(
            pod, lambda kind, ns, name: None if kind == "Secret" else lookup(kind, ns, name), tmp_path, {}, tmp_path
        )


@pytest.mark.parametrize(
    ("text", "expanded"),
    [
        ("$(A)-$(B)", "1-$(B)"),
        ("$$(A)", "$(A)"),
        ("$$$(A)", "$1"),
        ("$A", "$A"),
    ],
)
def test_expand_follows_kubernetes_variable_references(text: str, expanded: str) -> None:
    assert expand(text, {"A": "1"}) == expanded


def state(name: str, status: str, code: int | None = None) -> ContainerState:
    return ContainerState(name, status, exit_code=code)


@pytest.mark.parametrize(
    ("states", "phase", "trainer_state"),
    [
        ({}, "Pending", "waiting"),
        ({"pull": state("pull", "running")}, "Pending", "waiting"),
        ({"pull": state("pull", "terminated", 3)}, "Failed", "waiting"),
        ({"pull": state("pull", "terminated", 0), "trainer": state("trainer", "waiting")}, "Pending", "waiting"),
        ({"pull": state("pull", "terminated", 0), "trainer": state("trainer", "running")}, "Running", "running"),
        (
            {"pull": state("pull", "terminated", 0), "trainer": state("trainer", "terminated", 0)},
            "Succeeded",
            "terminated",
        ),
        (
            {"pull": state("pull", "terminated", 0), "trainer": state("trainer", "terminated", 75)},
            "Failed",
            "terminated",
        ),
    ],
)
def test_pod_phase_follows_its_containers(states: dict[str, ContainerState], phase: str, trainer_state: str) -> None:
    pod = job_pods(indexed_job())[0]
    status = pod_status(pod, states, {"trainer": '{"reason": "Preempted"}'})
    assert status["phase"] == phase
    trainer = status["containerStatuses"][0]["state"]
    assert list(trainer) == [trainer_state]
    if trainer_state == "terminated":
        assert trainer["terminated"]["reason"] == ("Completed" if phase == "Succeeded" else "Error")
        assert trainer["terminated"]["message"] == '{"reason": "Preempted"}'


def test_termination_message_falls_back_to_the_log_only_when_asked(tmp_path: Path) -> None:
    pod = job_pods(indexed_job())[0]
    empty = tmp_path / "log"
    empty.write_text("")
    assert termination_message(pod, "trainer", empty, lambda: "boom", failed=True) == ""
    pod["spec"]["containers"][0]["terminationMessagePolicy"] = "FallbackToLogsOnError"
    assert termination_message(pod, "trainer", empty, lambda: "line\nboom", failed=True) == "line\nboom"
    assert termination_message(pod, "trainer", empty, lambda: "boom", failed=False) == ""
    empty.write_text("x" * 10_000)
    assert len(termination_message(pod, "trainer", empty, lambda: "", failed=True)) == 4096


def test_job_fails_past_its_backoff_limit_and_completes_when_every_index_succeeds() -> None:
    job = indexed_job(completions=2, backoff_limit=0)
    pods = job_pods(job)
    for pod, phase in zip(pods, ("Running", "Failed"), strict=True):
        pod["status"]["phase"] = phase
    assert job_failed(job_status(job, pods))
    for pod in pods:
        pod["status"]["phase"] = "Succeeded"
    status = job_status(job, pods)
    assert not job_failed(status) and status["conditions"][0]["type"] == "Complete"


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
