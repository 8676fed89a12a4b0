"""The one place that talks to the Kubernetes API: reads what `reconcile` needs, applies what it returns.

Plain JSON over the official client's connection handling (in-cluster service account or kubeconfig), so the
pure modules see the same dicts the API serves. `ACCESS` lists every verb the operator issues, per resource; the
adapter refuses anything else, and the Helm chart's RBAC is tested against the same table. Nothing here patches
or deletes an object this run does not control: deletes carry the uid as a precondition, and an existing object
of the same name is updated only when its controller is the run.
"""

from __future__ import annotations

import collections
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kubernetes
from pydantic import ValidationError

from wmtp.contract import GROUP, KIND, PLURAL, VERSION
from wmtp_operator.decoding import loads
from wmtp_operator.formats import NAME
from wmtp_operator.plan import Create, Delete, Event, Observed, PatchRun, Plan, Refused, say
from wmtp_operator.render import MANAGED_BY, OPERATOR, RUN_LABEL, controller_uid
from wmtp_operator.spec import RecipeRef
from wmtp_operator.state import State


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    verbs: frozenset[str]

    def path(self, namespace: str) -> str:
        prefix = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        return f"{prefix}/namespaces/{namespace}/{self.plural}"


def _resource(group: str, version: str, plural: str, *verbs: str) -> Resource:
    return Resource(group, version, plural, frozenset(verbs))


# Every verb the operator issues, per kind: the adapter's calls, plus `list`/`watch` for what kopf watches and
# `create` for the Events it posts. The chart's RBAC grants exactly this (tests/chart).
ACCESS: dict[str, Resource] = {
    "WMTPRun": _resource(GROUP, VERSION, PLURAL, "get", "list", "watch", "patch"),
    "WMTPRun/status": _resource(GROUP, VERSION, f"{PLURAL}/status", "patch"),
    "Job": _resource("batch", "v1", "jobs", "get", "list", "watch", "create", "delete"),
    "Pod": _resource("", "v1", "pods", "list", "watch"),
    "ConfigMap": _resource("", "v1", "configmaps", "get", "create", "patch"),
    "Service": _resource("", "v1", "services", "get", "create"),
    "NetworkPolicy": _resource("networking.k8s.io", "v1", "networkpolicies", "get", "create"),
    "PersistentVolumeClaim": _resource("", "v1", "persistentvolumeclaims", "get", "create"),
    "ServiceAccount": _resource("", "v1", "serviceaccounts", "get", "create"),
    "Role": _resource("rbac.authorization.k8s.io", "v1", "roles", "get", "create"),
    "RoleBinding": _resource("rbac.authorization.k8s.io", "v1", "rolebindings", "get", "create"),
    "Event": _resource("", "v1", "events", "create"),
}
MERGE_PATCH = "application/merge-patch+json"
TIMEOUT = (5, 30)  # connect, read (seconds)
# What a retry cannot fix until someone changes the spec or the cluster: the run's status says it. 413: an object
# larger than the API server takes.
REFUSALS = {400, 403, 404, 409, 413, 422}
# Creating one child failed this many times in a row for another reason (a 5xx, a timeout): a refusal too, so that
# the status says it and the retries back off instead of going on every few seconds unseen.
REPEATED_FAILURES = 3
log = logging.getLogger(__name__)


class ApiError(RuntimeError):
    def __init__(self, status: int, method: str, path: str, body: bytes) -> None:
        self.status = status
        try:
            parsed = loads(body)
        except ValueError:
            parsed = {}
        parsed = parsed if isinstance(parsed, dict) else {}
        self.reason = str(parsed.get("reason") or status)
        self.api_message = say(str(parsed.get("message") or body[:400].decode(errors="replace")))
        super().__init__(f"{method} {path}: HTTP {status} {self.reason}: {self.api_message}")


class NotControlled(RuntimeError):
    """An object of the name the run needs exists and is controlled by something else."""

    def __init__(self, kind: str, name: str, owner: str | None) -> None:
        self.kind, self.name = kind, name
        whose = f"controlled by uid {owner}" if owner else "not controlled by this run"
        super().__init__(f"{kind} {name} already exists, {whose}: waiting for it to be deleted (or delete it)")


class Kube:
    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.api = api
        # The resourceVersions this operator's own last writes gave each run: the watch events they cause carry
        # nothing new, so they need not cost a pass.
        self.written: dict[tuple[str, str], collections.deque[str]] = {}
        self.failures: collections.Counter[tuple[str, str, str]] = collections.Counter()  # creates failed in a row

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
        self,
        verb: str,
        kind: str,
        namespace: str,
        name: str = "",
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        resource = ACCESS[kind]
        if verb not in resource.verbs:
            raise PermissionError(f"the operator does not {verb} {kind} (kube.ACCESS)")
        method = {"get": "GET", "list": "GET", "create": "POST", "patch": "PATCH", "delete": "DELETE"}[verb]
        path = resource.path(namespace) + (f"/{name}" if name else "")
        if kind == "WMTPRun/status":
            path = ACCESS["WMTPRun"].path(namespace) + f"/{name}/status"
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
        return loads(data) if data else {}

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call("get", kind, namespace, name)
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{key}={value}" for key, value in labels.items())
        return self._call("list", kind, namespace, query=[("labelSelector", selector)])["items"]

    def create(self, obj: Mapping[str, Any], update: bool = False) -> None:
        """Create `obj`. If its name is taken: by an object the same run controls, fine (merge-patched with `obj`
        when `update`); by anything else, NotControlled, and nothing is changed."""
        meta, kind = obj["metadata"], obj["kind"]
        try:
            self._call("create", kind, meta["namespace"], body=obj)
            return
        except ApiError as err:
            if err.status != 409:
                raise
        existing = self.get(kind, meta["namespace"], meta["name"])
        if existing is None:
            return self.create(obj, update)  # deleted in between
        owner = controller_uid(existing)
        if owner != controller_uid(obj):
            raise NotControlled(kind, meta["name"], owner)
        if update:
            content = {key: value for key, value in obj.items() if key not in ("apiVersion", "kind", "metadata")}
            content["metadata"] = {"uid": existing["metadata"]["uid"]}  # the object checked above, not a successor
            self._call("patch", kind, meta["namespace"], meta["name"], body=content)

    def patch_run(self, namespace: str, name: str, uid: str, patch: Mapping[str, Any], status: bool = False) -> None:
        """Merge-patch the run (or its status) only if it is still the run of that uid."""
        body = {**patch, "metadata": {**patch.get("metadata", {}), "uid": uid}}
        updated = self._call("patch", "WMTPRun/status" if status else "WMTPRun", namespace, name, body=body)
        version = updated.get("metadata", {}).get("resourceVersion")
        if version:
            self.written.setdefault((namespace, name), collections.deque(maxlen=4)).append(version)

    def delete(self, kind: str, namespace: str, name: str, uid: str) -> None:
        # Background: the Job goes at once and the garbage collector takes its pods (each gets its grace period).
        options = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        options["preconditions"] = {"uid": uid}
        try:
            self._call("delete", kind, namespace, name, body=options)
        except ApiError as err:
            if err.status not in (404, 409):  # gone, or a successor of the same name that is not this one
                raise

    def observe(self, run: Mapping[str, Any]) -> Observed:
        """The run's Jobs and pods (by label), its recipeRef's text, and the ServiceAccount it names (or that it is
        missing)."""
        meta = run["metadata"]
        namespace, selector = meta["namespace"], {MANAGED_BY: OPERATOR, RUN_LABEL: meta["name"]}
        spec = run.get("spec") or {}
        account = spec.get("serviceAccountName")
        named = isinstance(account, str) and re.fullmatch(NAME, account) is not None
        found = self.get("ServiceAccount", namespace, account) if named else None
        return Observed(
            jobs=self.list("Job", namespace, selector),
            pods=self.list("Pod", namespace, selector),
            recipe_text=self._recipe_text(namespace, spec.get("recipeRef")) if spec.get("recipeRef") else None,
            account_missing=account if named and found is None else None,
            account=found,
        )

    def _recipe_text(self, namespace: str, ref: Any) -> str | None:
        try:
            parsed = RecipeRef.model_validate(ref)
        except ValidationError:
            return None  # reconcile reports the invalid spec
        config_map = self.get("ConfigMap", namespace, parsed.name) or {}
        text = (config_map.get("data") or {}).get(parsed.key)
        return text if isinstance(text, str) else None

    def apply(self, namespace: str, name: str, uid: str, plan: Plan) -> tuple[Refused, State | None] | None:
        """Actions in order, then the status. A refused child stops the plan: the refusal and the last state
        written are returned, for `reconcile.refused`. Any other failure part-way raises and a later pass redoes
        the rest."""
        state: State | None = None
        for action in plan.actions:
            try:
                if isinstance(action, Create):
                    self.create(action.obj, update=action.update)
                    self.failures.pop(_child(action), None)
                elif isinstance(action, Delete):
                    self.delete(action.kind, namespace, action.name, action.uid)
                elif isinstance(action, PatchRun):
                    self.patch_run(namespace, name, uid, action.patch)
                    state = action.state or state
            except NotControlled as err:
                return Refused(err.kind, err.name, 409, "Conflict", str(err)), state
            except Exception as err:
                refusal = self._refusal(action, err) if isinstance(action, Create) else None
                if refusal is None:
                    raise
                return refusal, state
        if plan.status:
            self.patch_run(namespace, name, uid, {"status": plan.status}, status=True)
        return None

    def _refusal(self, action: Create, err: Exception) -> Refused | None:
        """The API server's refusal of a create; a failure of another kind only once it repeats (None before)."""
        kind, name = _child(action)[1:]
        if isinstance(err, ApiError) and err.status in REFUSALS:
            return Refused(kind, name, err.status, err.reason, err.api_message)
        self.failures[_child(action)] += 1
        if self.failures[_child(action)] < REPEATED_FAILURES:
            return None
        del self.failures[_child(action)]
        code, reason = (err.status, err.reason) if isinstance(err, ApiError) else (503, type(err).__name__)
        said = err.api_message if isinstance(err, ApiError) else say(str(err))
        return Refused(kind, name, code, reason, f"failed {REPEATED_FAILURES} times in a row: {said}")

    def post_events(self, run: Mapping[str, Any], events: list[Event], now: str) -> None:
        """Events about the run, as `kubectl describe` shows them; a failure to post one is logged, not raised."""
        meta = run["metadata"]
        involved = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": meta["name"],
                    "namespace": meta["namespace"], "uid": meta["uid"]}  # fmt: skip
        for event in events:
            body = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
                "involvedObject": involved,
                "type": event.type,
                "reason": event.reason[:128],
                "message": say(event.message),
                "source": {"component": OPERATOR},
                "reportingComponent": OPERATOR,
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            }
            try:
                self._call("create", "Event", meta["namespace"], body=body)
            except (ApiError, OSError) as err:
                log.warning(
                    "posting event %s about %s/%s failed: %s", event.reason, meta["namespace"], meta["name"], err
                )


def _child(action: Create) -> tuple[str, str, str]:
    meta = action.obj["metadata"]
    return meta.get("namespace", ""), action.obj["kind"], meta["name"]
