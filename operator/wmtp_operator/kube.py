"""The one place that talks to the Kubernetes API: reads what `reconcile` needs, applies what it returns.

Plain JSON over the official client's connection handling (in-cluster service account or kubeconfig), so the
pure modules see the same dicts the API serves and nothing is converted through generated model classes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import kubernetes
from pydantic import ValidationError

from wmtp.contract import GROUP, PLURAL, VERSION
from wmtp_operator.reconcile import Create, Delete, Observed, PatchSpec, Plan
from wmtp_operator.render import MANAGED_BY, OPERATOR, RUN_LABEL
from wmtp_operator.spec import RecipeRef

# kind → collection path under a namespace
PATHS = {
    "WMTPRun": f"/apis/{GROUP}/{VERSION}/namespaces/{{ns}}/{PLURAL}",
    "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
    "Pod": "/api/v1/namespaces/{ns}/pods",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Service": "/api/v1/namespaces/{ns}/services",
    "PersistentVolumeClaim": "/api/v1/namespaces/{ns}/persistentvolumeclaims",
}
MERGE_PATCH = "application/merge-patch+json"
TIMEOUT = (5, 30)  # connect, read (seconds)


class ApiError(RuntimeError):
    def __init__(self, status: int, method: str, path: str, body: bytes) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:300].decode(errors='replace')}")
        self.status = status


class Kube:
    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.api = api

    @classmethod
    def from_environment(cls, pool_size: int = 32) -> Kube:
        """In a pod: its service account; elsewhere: the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
        configuration = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=configuration)
        # Reconciles run in a thread pool; one connection per thread avoids urllib3 discarding connections.
        configuration.connection_pool_maxsize = pool_size
        return cls(kubernetes.client.ApiClient(configuration))

    def _call(
        self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None
    ) -> dict[str, Any]:
        headers = {
            "Accept": "application/json",
            "Content-Type": MERGE_PATCH if method == "PATCH" else "application/json",
        }
        method, url, headers, body, _ = self.api.param_serialize(
            method, path, query_params=query or [], header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        response = self.api.call_api(method, url, header_params=headers, body=body, _request_timeout=TIMEOUT)
        data = response.read()
        if response.status >= 400:
            raise ApiError(response.status, method, path, data)
        return json.loads(data) if data else {}

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", f"{PATHS[kind].format(ns=namespace)}/{name}")
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{key}={value}" for key, value in labels.items())
        return self._call("GET", PATHS[kind].format(ns=namespace), query=[("labelSelector", selector)])["items"]

    def create(self, obj: Mapping[str, Any], update: bool = False) -> None:
        meta = obj["metadata"]
        try:
            self._call("POST", PATHS[obj["kind"]].format(ns=meta["namespace"]), body=obj)
        except ApiError as err:
            if err.status != 409:
                raise
            if update:
                content = {key: value for key, value in obj.items() if key not in ("apiVersion", "kind", "metadata")}
                self.patch(obj["kind"], meta["namespace"], meta["name"], content)

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any], status: bool = False) -> None:
        suffix = "/status" if status else ""
        self._call("PATCH", f"{PATHS[kind].format(ns=namespace)}/{name}{suffix}", body=patch)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        # Background: the Job goes at once and the garbage collector takes its pods.
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        try:
            self._call("DELETE", f"{PATHS[kind].format(ns=namespace)}/{name}", body=body)
        except ApiError as err:
            if err.status != 404:
                raise

    def observe(self, run: Mapping[str, Any]) -> Observed:
        """The run's Jobs and pods (by label) and its recipeRef's text, if any."""
        meta = run["metadata"]
        namespace, selector = meta["namespace"], {MANAGED_BY: OPERATOR, RUN_LABEL: meta["name"]}
        ref = (run.get("spec") or {}).get("recipeRef")
        return Observed(
            jobs=self.list("Job", namespace, selector),
            pods=self.list("Pod", namespace, selector),
            recipe_text=self._recipe_text(namespace, ref) if ref else None,
        )

    def _recipe_text(self, namespace: str, ref: Any) -> str | None:
        try:
            parsed = RecipeRef.model_validate(ref)
        except ValidationError:
            return None  # reconcile reports the invalid spec
        config_map = self.get("ConfigMap", namespace, parsed.name) or {}
        return (config_map.get("data") or {}).get(parsed.key)

    def apply(self, namespace: str, name: str, plan: Plan) -> None:
        """Actions in order, then the status: a failure part-way leaves the old status and a later pass redoes it."""
        for action in plan.actions:
            if isinstance(action, Create):
                self.create(action.obj, update=action.update)
            elif isinstance(action, Delete):
                self.delete(action.kind, namespace, action.name)
            elif isinstance(action, PatchSpec):
                self.patch("WMTPRun", namespace, name, action.patch)
        if plan.status:
            self.patch("WMTPRun", namespace, name, {"status": plan.status}, status=True)
