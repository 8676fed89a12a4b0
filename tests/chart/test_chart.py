"""The Helm chart, rendered by the real helm binary that `make setup` installs."""

from __future__ import annotations

import base64
import configparser
import json
import re
from typing import Any

import celpy
import kubernetes_validate
import pytest
from prometheus_client import CollectorRegistry

from support.chart import CHART, NAMESPACED, ROOT, helm, render, rules_of
from wmtp_operator.formats import DATASET
from wmtp_operator.kube import ACCESS
from wmtp_operator.metrics import Metrics
from wmtp_operator.render import MANAGED_BY
from wmtp_operator.render import OPERATOR as MADE_BY_OPERATOR
from wmtp_operator.spec import Defaults

K8S_VERSION = "1.33.0"
VALUE_SETS = {
    "default": [],
    "namespaced": NAMESPACED,
    "no-rbac-debug": ["--set", "rbac.create=false", "--set", "serviceAccount.create=false",
                      "--set", "serviceAccount.name=ops", "--set", "logLevel=debug",
                      "--set", "defaults.mlflowTrackingUri=http://mlflow:5000", "--set", "mlflow.enabled=false",
                      "--set", "admissionPolicy.create=false"],
    "mlflow-external-stores": ["--set", "mlflow.databaseUriSecret.name=mlflow-db",
                               "--set", "mlflow.artifacts.s3Uri=s3://mlflow/artifacts",
                               "--set", "mlflow.artifacts.s3CredentialsSecret=wmtp-s3"],
    "metrics-off": ["--set", "metrics.enabled=false"],
}  # fmt: skip
# What kopf needs besides the adapter's table: CRD discovery, and the namespaces when it watches them all.
DISCOVERY = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}


def operator_rules() -> dict[tuple[str, str], set[str]]:
    """The verbs the code issues, from `wmtp_operator.kube.ACCESS`."""
    return {(resource.group, resource.plural): set(resource.verbs) for resource in ACCESS.values()}


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


def test_cluster_wide_rbac_grants_exactly_the_verbs_the_code_issues() -> None:
    objects = render()
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] in ("ClusterRole", "Role")}
    assert set(roles) == {"wmtp", "wmtp-discovery"}
    assert rules_of(roles["wmtp"]) == operator_rules()
    assert rules_of(roles["wmtp-discovery"]) == {**DISCOVERY, ("", "namespaces"): {"list", "watch"}}


def test_namespaced_rbac_is_a_role_per_watched_namespace() -> None:
    objects = render(*NAMESPACED)
    assert not any(o["kind"] == "ClusterRole" and o["metadata"]["name"] == "wmtp" for o in objects)
    discovery = next(o for o in objects if o["kind"] == "ClusterRole")
    assert rules_of(discovery) == DISCOVERY
    operator_roles = {o["metadata"]["namespace"]: rules_of(o) for o in objects if o["kind"] == "Role"}
    assert operator_roles == {"team-a": operator_rules(), "team-b": operator_rules()}
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "wmtp")
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["WMTP_OPERATOR_NAMESPACES"] == "team-a,team-b"


def test_the_chart_creates_no_trainer_identity_the_operator_makes_one_per_run() -> None:
    accounts = [o["metadata"]["name"] for o in render() if o["kind"] == "ServiceAccount"]
    assert accounts == ["wmtp"]


def _pod(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == name)["spec"]["template"]


def test_operator_runs_non_root_with_a_read_only_root_and_probes() -> None:
    pod = _pod(render(), "wmtp")["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["WMTP_DEFAULT_S3_SECRET"] == "wmtp-s3"
    assert "WMTP_OPERATOR_NAMESPACES" not in env


def test_the_chart_deploys_an_mlflow_server_and_points_runs_without_one_at_it() -> None:
    objects = render()
    env = {e["name"]: e["value"] for e in _pod(objects, "wmtp")["spec"]["containers"][0]["env"]}
    assert env["WMTP_DEFAULT_MLFLOW_URI"] == "http://wmtp-mlflow.wmtp-system.svc:5000"
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "wmtp-mlflow")
    assert service["spec"]["ports"] == [{"name": "http", "port": 5000, "targetPort": "http"}]
    pod = _pod(objects, "wmtp-mlflow")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    assert "--backend-store-uri=sqlite:////mlflow/mlflow.db" in container["args"]
    assert "--artifacts-destination=/mlflow/artifacts" in container["args"]
    assert any(a.startswith("--allowed-hosts=") and "wmtp-mlflow.wmtp-system.svc:5000" in a for a in container["args"])
    claim = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert pod["spec"]["volumes"][-1]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["spec"]["securityContext"]["runAsNonRoot"]


def test_the_operator_knows_its_own_service_account_which_no_run_may_name() -> None:
    for values, account in (((), "wmtp"), (("--set", "serviceAccount.name=ops"), "ops")):
        objects = render(*values)
        pod = _pod(objects, "wmtp")["spec"]
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        assert pod["serviceAccountName"] == account
        assert env["WMTP_OPERATOR_SERVICE_ACCOUNT"] == f"wmtp-system/{account}"
        assert Defaults.from_env(env).operator_account == f"wmtp-system/{account}"


def test_mlflow_stores_may_live_outside_the_cluster_with_credentials_from_secrets() -> None:
    objects = render(*VALUE_SETS["mlflow-external-stores"])
    container = _pod(objects, "wmtp-mlflow")["spec"]["containers"][0]
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in container["args"]
    assert "--artifacts-destination=s3://mlflow/artifacts" in container["args"]
    env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"] == {"name": "mlflow-db", "key": "uri"}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"name": "wmtp-s3", "key": "AWS_SECRET_ACCESS_KEY"}
    # The volume then holds the users and permissions alone; without authentication there is none.
    assert [o["kind"] for o in objects].count("PersistentVolumeClaim") == 1
    assert {"name": "data", "mountPath": "/mlflow"} in container["volumeMounts"]
    no_auth = render(*VALUE_SETS["mlflow-external-stores"], "--set", "mlflow.auth.enabled=false")
    assert not any(o["kind"] == "PersistentVolumeClaim" for o in no_auth)


def test_mlflow_can_be_disabled() -> None:
    objects = render("--set", "mlflow.enabled=false")
    assert not any("mlflow" in o["metadata"]["name"] for o in objects if o["kind"] != "CustomResourceDefinition")
    env = {e["name"]: e["value"] for e in _pod(objects, "wmtp")["spec"]["containers"][0]["env"]}
    assert env["WMTP_DEFAULT_MLFLOW_URI"] == ""


def _auth_ini(objects: list[dict[str, Any]]) -> configparser.ConfigParser:
    config_map = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "wmtp-mlflow-auth")
    ini = configparser.ConfigParser()
    ini.read_string(config_map["data"]["basic_auth.ini"])
    return ini


def test_the_mlflow_server_requires_a_login_with_an_admin_password_the_chart_makes_once() -> None:
    objects = render()
    pod = _pod(objects, "wmtp-mlflow")["spec"]
    container = pod["containers"][0]
    assert "--app-name=basic-auth" in container["args"]
    env = {e["name"]: e.get("value") or e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "auth")
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == f"{mount['mountPath']}/basic_auth.ini"
    ini = _auth_ini(objects)["mlflow"]
    assert ini["default_permission"] == "READ" and ini["admin_username"] == "admin" and "admin_password" not in ini
    assert ini["database_uri"] == "sqlite:////mlflow/basic_auth.db"  # on the volume: users outlive the pod
    # The password and the Flask key come from a Secret that helm generates once (`lookup` keeps it on upgrade).
    secret = next(o for o in objects if o["kind"] == "Secret")
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == {"name": secret["metadata"]["name"], "key": "MLFLOW_TRACKING_PASSWORD"}
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["name"] == secret["metadata"]["name"]
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    password = base64.b64decode(secret["data"]["MLFLOW_TRACKING_PASSWORD"]).decode()
    assert len(password) == 32 and password.isalnum()
    assert password != base64.b64decode(render()[objects.index(secret)]["data"]["MLFLOW_TRACKING_PASSWORD"]).decode()
    assert base64.b64decode(secret["data"]["MLFLOW_TRACKING_USERNAME"]).decode() == ini["admin_username"]
    mlflow_template = (CHART / "templates" / "mlflow.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $authSecret' in mlflow_template


def test_an_admin_secret_of_ones_own_replaces_the_generated_one_and_auth_can_be_turned_off() -> None:
    objects = render("--set", "mlflow.auth.secret=mlflow-admin")
    assert not any(o["kind"] == "Secret" for o in objects)
    container = _pod(objects, "wmtp-mlflow")["spec"]["containers"][0]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert refs == {"mlflow-admin"}
    off = render("--set", "mlflow.auth.enabled=false")
    kept = [o for o in off if o["kind"] in ("Secret", "ConfigMap")]
    auth = [o for o in kept if "grafana_dashboard" not in o["metadata"].get("labels", {})]
    assert not auth, auth  # no admin Secret, no auth ini (the Grafana dashboard is not MLflow's)
    assert not any(a.startswith("--app-name") for a in _pod(off, "wmtp-mlflow")["spec"]["containers"][0]["args"])


@pytest.mark.parametrize("values", [[], NAMESPACED], ids=["cluster-wide", "namespaced"])
def test_only_the_operators_namespace_and_the_pods_it_makes_reach_the_mlflow_server(values: list[str]) -> None:
    objects = render(*values)
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "wmtp-mlflow")
    (rule,) = policy["spec"]["ingress"]
    release, made = rule["from"]
    assert release == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "wmtp-system"}}}
    assert made["podSelector"] == {"matchLabels": {MANAGED_BY: MADE_BY_OPERATOR}}
    watched = made["namespaceSelector"]
    if values:
        expected = [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}]
        assert watched == {"matchExpressions": expected}
    else:
        assert watched == {}
    assert rule["ports"] == [{"port": 5000, "protocol": "TCP"}]


def test_runs_on_the_default_server_get_the_namespaces_credentials_secret_and_no_uri_may_carry_them() -> None:
    env = {e["name"]: e["value"] for e in _pod(render(), "wmtp")["spec"]["containers"][0]["env"]}
    assert env["WMTP_DEFAULT_MLFLOW_SECRET"] == "wmtp-mlflow"
    refused = helm("lint", "--strict", str(CHART), "--set", "defaults.mlflowTrackingUri=http://u:pw@mlflow:5000")
    assert refused.returncode != 0 and "mlflowTrackingUri" in refused.stdout + refused.stderr


def test_no_rbac_no_service_account_renders_none() -> None:
    objects = render(*VALUE_SETS["no-rbac-debug"])
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & {o["kind"] for o in objects}
    pod = _pod(objects, "wmtp")["spec"]
    assert pod["serviceAccountName"] == "ops"
    assert pod["containers"][0]["args"] == ["--verbose"]


def _object(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def test_metrics_have_a_port_a_service_a_way_through_the_network_policy_and_a_dashboard() -> None:
    objects = render()
    pod = _pod(objects, "wmtp")
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["WMTP_OPERATOR_METRICS_PORT"] == "8000"
    assert {"name": "metrics", "containerPort": 8000} in container["ports"]
    service = _object(objects, "Service", "wmtp-metrics")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8000, "targetPort": "metrics", "protocol": "TCP"}]
    ingress = _object(objects, "NetworkPolicy", "wmtp")["spec"]["ingress"]
    assert {"ports": [{"port": 8000, "protocol": "TCP"}]} in ingress
    assert not any(o["kind"] == "ServiceMonitor" for o in objects)  # it needs the Prometheus Operator: opt in
    dashboard = _object(objects, "ConfigMap", "wmtp-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["wmtp-operator.json"])["uid"] == "wmtp-operator"


def test_a_service_monitor_scrapes_the_metrics_service_and_scrapes_may_be_limited_to_some_peers() -> None:
    peers = '[{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]'
    values = ["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.serviceMonitor.labels.release=kps",
              "--set-json", f"metrics.from={peers}"]  # fmt: skip
    assert helm("lint", "--strict", str(CHART), *values).returncode == 0
    objects = render(*values)
    monitor, service = _object(objects, "ServiceMonitor", "wmtp"), _object(objects, "Service", "wmtp-metrics")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["wmtp-system"]}
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    rule = {"ports": [{"port": 8000, "protocol": "TCP"}], "from": json.loads(peers)}
    assert rule in _object(objects, "NetworkPolicy", "wmtp")["spec"]["ingress"]


def test_metrics_can_be_turned_off() -> None:
    objects = render("--set", "metrics.enabled=false")
    container = _pod(objects, "wmtp")["spec"]["containers"][0]
    assert {"name": "WMTP_OPERATOR_METRICS_PORT", "value": "0"} in container["env"]
    assert [port["name"] for port in container["ports"]] == ["health"]
    ingress = _object(objects, "NetworkPolicy", "wmtp")["spec"]["ingress"]
    assert ingress == [{"ports": [{"port": 8080, "protocol": "TCP"}]}]
    assert not {"wmtp-metrics", "wmtp-dashboard"} & {o["metadata"]["name"] for o in objects}


def _exported() -> dict[str, set[str]]:
    """Each metric the operator defines → the names its samples have."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    families = CollectorRegistry()
    Metrics(families)
    return {f.name: {f.name + suffix for suffix in suffixes[f.type]} for f in families.collect()}


def test_the_dashboard_charts_every_metric_the_operator_exports_and_nothing_else() -> None:
    dashboard = json.loads((CHART / "dashboards" / "wmtp-operator.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for query in queries for name in re.findall(r"\bwmtp_\w+", query)}
    exported = _exported()
    assert used <= set().union(*exported.values()), used - set().union(*exported.values())
    assert [metric for metric, names in exported.items() if not names & used] == []
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in dashboard["panels"])


def test_helm_test_hook_exists() -> None:
    hooks = [o for o in render() if o.get("metadata", {}).get("annotations", {}).get("helm.sh/hook") == "test"]
    assert {o["kind"] for o in hooks} == {"Pod", "NetworkPolicy"}


OPERATOR = "system:serviceaccount:wmtp-system:wmtp"


def _admission() -> Any:
    """The chart's ValidatingAdmissionPolicy, evaluated as the API server would (variables, then validations)."""
    policy = next(o for o in render() if o["kind"] == "ValidatingAdmissionPolicy")["spec"]
    env = celpy.Environment()
    compiled = {v["name"]: env.program(env.compile(v["expression"])) for v in policy["variables"]}
    checks = [(env.program(env.compile(v["expression"])), v["message"]) for v in policy["validations"]]

    def admit(user: str, new: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
        activation = {
            "object": celpy.json_to_cel(new),
            "oldObject": celpy.json_to_cel(old),
            "request": celpy.json_to_cel({"userInfo": {"username": user}, "operation": "UPDATE" if old else "CREATE"}),
        }
        activation["variables"] = celpy.json_to_cel(
            {name: program.evaluate(activation) for name, program in compiled.items()}
        )
        return [message for program, message in checks if not bool(program.evaluate(activation))]

    return admit


def _run(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "r"}, "spec": {"image": "x", "datasets": {"mbpp": "s3://b/m.jsonl"}, **spec}}


CKPT = "s3://b/c/r/checkpoint_step_00000100"
ADMISSION = [
    ("a user creates a run", "alice", _run(), None, []),
    ("a user sets resumeFrom on create", "alice", _run(resumeFrom=CKPT), None, ["spec.resumeFrom"]),
    ("a user changes resumeFrom", "alice", _run(resumeFrom="s3://x"), _run(resumeFrom=CKPT), ["spec.resumeFrom"]),
    ("a user removes resumeFrom", "alice", _run(), _run(resumeFrom=CKPT), ["spec.resumeFrom"]),
    ("a user edits another field", "alice", _run(resumeFrom=CKPT, suspend=True), _run(resumeFrom=CKPT), []),
    ("the operator writes resumeFrom", OPERATOR, _run(resumeFrom=CKPT), _run(), []),
    ("another ServiceAccount writes it", "system:serviceaccount:team-a:wmtp", _run(resumeFrom=CKPT), _run(),
     ["spec.resumeFrom"]),
    ("a dataset name climbing out", "alice", _run(datasets={"../x": "s3://b/x"}), None, ["spec.datasets"]),
    ("a dataset name with a slash", "alice", _run(datasets={"a/b": "s3://b/x"}), None, ["spec.datasets"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("user", "new", "old", "refused"), [row[1:] for row in ADMISSION], ids=[r[0] for r in ADMISSION]
)
def test_the_admission_policy_keeps_resume_from_the_operators_and_dataset_names_one_segment(
    user: str, new: dict[str, Any], old: dict[str, Any] | None, refused: list[str]
) -> None:
    messages = _admission()(user, new, old)
    assert [m.split(" ", 1)[0].rstrip(":") for m in messages] == refused, messages


def test_the_admission_policy_and_the_operator_share_the_dataset_name_pattern() -> None:
    policy = next(o for o in render() if o["kind"] == "ValidatingAdmissionPolicy")["spec"]
    assert f"name.matches('{DATASET}')" in policy["validations"][1]["expression"]
