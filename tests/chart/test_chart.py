"""The Helm chart, rendered by the real helm binary that `make setup` installs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "wmtp"
HELM = Path(sys.executable).with_name("helm")
K8S_VERSION = "1.33.0"

NAMESPACED = ["--set", "watch.clusterWide=false", "--set", "watch.namespaces={team-a,team-b}"]
VALUE_SETS = {
    "default": [],
    "namespaced": NAMESPACED,
    "no-rbac-debug": ["--set", "rbac.create=false", "--set", "serviceAccount.create=false",
                      "--set", "serviceAccount.name=ops", "--set", "logLevel=debug",
                      "--set", "defaults.mlflowTrackingUri=http://mlflow:5000"],
}  # fmt: skip

OPERATOR_RULES = {
    ("wmtp.io", "wmtpruns"): {"get", "list", "watch", "patch", "update"},
    ("wmtp.io", "wmtpruns/status"): {"get", "patch", "update"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
    ("", "pods"): {"get", "list", "watch", "delete"},
    ("", "configmaps"): {"get", "list", "watch", "create", "delete", "patch"},
    ("", "services"): {"get", "list", "watch", "create", "delete", "patch"},
    ("", "persistentvolumeclaims"): {"get", "list", "watch", "create", "delete", "patch"},
    ("", "events"): {"create"},
    ("events.k8s.io", "events"): {"create"},
}


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    assert HELM.exists(), f"{HELM} is missing: `make setup` installs it"
    return subprocess.run([str(HELM), *args], capture_output=True, text=True)


def render(*values: str) -> list[dict]:
    result = helm("template", "wmtp", str(CHART), "--namespace", "wmtp-system", "--include-crds", *values)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def rules_of(role: dict) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_lint_strict(values: list[str]) -> None:
    result = helm("lint", "--strict", str(CHART), *values)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_rendered_object_is_valid_kubernetes(values: list[str]) -> None:
    objects = render(*values)
    assert {"Deployment", "CustomResourceDefinition"} <= {o["kind"] for o in objects}
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_schema_refuses_bad_values() -> None:
    result = helm("lint", "--strict", str(CHART), "--set", "watch.clusterwide=true")
    assert result.returncode != 0
    assert "clusterwide" in result.stdout + result.stderr


def test_chart_crd_is_the_project_crd() -> None:
    assert (CHART / "crds" / "wmtpruns.yaml").read_bytes() == (ROOT / "crds" / "wmtpruns.yaml").read_bytes()


def test_cluster_wide_rbac_grants_exactly_what_the_operator_uses() -> None:
    objects = render()
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] in ("ClusterRole", "Role")}
    assert rules_of(roles["wmtp"]) == OPERATOR_RULES
    discovery = rules_of(roles["wmtp-discovery"])
    assert discovery == {
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
        ("", "namespaces"): {"list", "watch"},
    }
    trainer = [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"].endswith("-trainer")]
    assert [rules_of(r) for r in trainer] == [{("wmtp.io", "wmtpruns/status"): {"patch"}}]
    assert not any(o["kind"] == "Role" and not o["metadata"]["name"].endswith("-trainer") for o in objects)


def test_namespaced_rbac_is_a_role_per_watched_namespace() -> None:
    objects = render(*NAMESPACED)
    assert not any(o["kind"] == "ClusterRole" and o["metadata"]["name"] == "wmtp" for o in objects)
    discovery = next(o for o in objects if o["kind"] == "ClusterRole")
    assert ("", "namespaces") not in rules_of(discovery)
    operator_roles = {
        o["metadata"]["namespace"]: rules_of(o)
        for o in objects
        if o["kind"] == "Role" and not o["metadata"]["name"].endswith("-trainer")
    }
    assert operator_roles == {"team-a": OPERATOR_RULES, "team-b": OPERATOR_RULES}
    trainer_accounts = {
        o["metadata"]["namespace"]
        for o in objects
        if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == "wmtp-trainer"
    }
    assert trainer_accounts == {"team-a", "team-b"}
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["WMTP_OPERATOR_NAMESPACES"] == "team-a,team-b"


def test_operator_runs_non_root_with_a_read_only_root_and_a_liveness_probe() -> None:
    deployment = next(o for o in render() if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["WMTP_DEFAULT_S3_SECRET"] == "wmtp-s3"
    assert env["WMTP_TRAINER_SERVICE_ACCOUNT"] == "wmtp-trainer"
    assert "WMTP_OPERATOR_NAMESPACES" not in env


def test_no_rbac_no_service_account_renders_none() -> None:
    kinds = [o["kind"] for o in render(*VALUE_SETS["no-rbac-debug"])]
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & set(kinds)
    deployment = next(o for o in render(*VALUE_SETS["no-rbac-debug"]) if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "ops"
    assert pod["containers"][0]["args"] == ["--verbose"]


def test_helm_test_hook_exists() -> None:
    hooks = [o for o in render() if o.get("metadata", {}).get("annotations", {}).get("helm.sh/hook") == "test"]
    assert len(hooks) == 1 and hooks[0]["kind"] == "Pod"
