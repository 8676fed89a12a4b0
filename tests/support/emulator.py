"""An in-memory Kubernetes API (kmock) with the real operator process against it, for tests and benchmarks.

Test support: needs the dev extra (kmock) and ships in neither package nor image. kmock stores and serves
objects but runs no controllers: there is no Job controller, so callers create an attempt's pods with
`pods_for(job)` and move them through their phases, and no garbage collector. On top of kmock this fills in
what an API server would: names from generateName, uid, resourceVersion, creationTimestamp, generation
(bumped by spec changes), and label selectors on lists."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kmock

from support.waiting import free_port, wait_for
from wmtp_operator.kube import PATHS as OPERATOR_PATHS
from wmtp_operator.render import INDEX_ANNOTATION

RESOURCES = {
    "wmtp.io/v1alpha1/wmtpruns": ("WMTPRun", True, {"status"}),
    "batch/v1/jobs": ("Job", True, {"status"}),
    "v1/pods": ("Pod", True, {"status"}),
    "v1/configmaps": ("ConfigMap", True, set()),
    "v1/services": ("Service", True, set()),
    "v1/persistentvolumeclaims": ("PersistentVolumeClaim", True, set()),
    "v1/events": ("Event", True, set()),
    # What a namespace's workloads use: their Secrets and identities (support.secure_api authorizes with them).
    "v1/secrets": ("Secret", True, set()),
    "v1/serviceaccounts": ("ServiceAccount", True, set()),
    "rbac.authorization.k8s.io/v1/roles": ("Role", True, set()),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", True, set()),
    # kopf looks these up at start-up (namespace and CRD discovery).
    "v1/namespaces": ("Namespace", False, set()),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, set()),
}
VERBS = {"get", "list", "watch", "create", "patch", "delete"}
# The operator's kinds, Events (which kopf posts) for tests to read, and what pods use.
PATHS = {
    **OPERATOR_PATHS,
    "Event": "/api/v1/namespaces/{ns}/events",
    "Secret": "/api/v1/namespaces/{ns}/secrets",
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
}
_KEEP_REQUESTS = 100  # more than are ever in flight at once


class _DirectRouting(kmock.RawHandler):
    """Serves API verbs straight from the emulator's own handlers.

    kmock routes each request by re-filtering the history of all earlier requests (it keeps them for
    assertions), which makes a long run quadratic; nothing here asserts on old requests, so the history is
    trimmed and the API verbs skip the routing altogether.
    """

    async def _handle(self, request: kmock.Request) -> Any:
        del self._requests[:-_KEEP_REQUESTS]
        serve = {
            kmock.action.LIST: self._serve_list,
            kmock.action.WATCH: self._serve_watch,
            kmock.action.FETCH: self._serve_fetch,
            kmock.action.CREATE: self._serve_create,
            kmock.action.UPDATE: self._serve_update,
            kmock.action.DELETE: self._serve_delete,
        }.get(request.action)
        # Discovery (/api, /apis/<group>/<version>) parses as a list without a plural: kmock routes it.
        if serve is None or request.resource is None or not request.resource.plural:
            return await super()._handle(request)
        return await kmock.Response.guess(serve)(request)


class _ApiServer(kmock.KubernetesEmulator, _DirectRouting):
    """kmock's emulator plus the fields and the label filtering that a real API server provides."""

    _versions = itertools.count(1)

    async def _handle(self, request: kmock.Request) -> Any:
        data = request.data if isinstance(request.data, dict) else None
        if request.resource is not None and data is not None:
            meta = data.setdefault("metadata", {})
            if request.action == kmock.action.CREATE:
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
                meta.setdefault("generation", 1)
            elif request.action == kmock.action.UPDATE and "spec" in data and request.subresource is None:
                key = (request.resource, request.namespace, request.name)
                if key in self.objects and not self.objects[key].deleted:
                    meta["generation"] = self.objects[key].raw["metadata"].get("generation", 1) + 1
            if request.action in (kmock.action.CREATE, kmock.action.UPDATE):
                meta["resourceVersion"] = str(next(self._versions))
        return await super()._handle(request)

    async def _serve_list(self, request: kmock.Request) -> Any:
        listing = await super()._serve_list(request)
        selector = dict(part.split("=", 1) for part in request.params.get("labelSelector", "").split(",") if part)
        listing["items"] = [
            item for item in listing["items"] if selector.items() <= (item["metadata"].get("labels") or {}).items()
        ]
        return listing


class Emulator:
    """kmock on 127.0.0.1 in a background thread, with a small synchronous JSON client."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)

    async def _start(self) -> str:
        self._server = _ApiServer()
        await self._server.__aenter__()
        for key, (kind, namespaced, subresources) in RESOURCES.items():
            singular = kind.lower()
            self._server.resources[key] = kmock.ResourceInfo(
                kind=kind, singular=singular, namespaced=namespaced, verbs=VERBS, subresources=subresources
            )
        self._http = kmock.Server(self._server)
        await self._http.__aenter__()
        return str(self._http.url).rstrip("/")

    def close(self) -> None:
        async def stop() -> None:
            await self._http.__aexit__(None, None, None)
            await self._server.__aexit__(None, None, None)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "test"}}],
            "current-context": "emulator",
        }
        path.write_text(json.dumps(config))
        return path

    def request(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Content-Type": "application/merge-patch+json" if method == "PATCH" else "application/json"}
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise

    def path(self, kind: str, namespace: str, name: str = "") -> str:
        return PATHS[kind].format(ns=namespace) + (f"/{name}" if name else "")

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", self.path(obj["kind"], obj["metadata"].get("namespace", "default")), obj)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.request("GET", self.path(kind, namespace, name))

    def list(self, kind: str, namespace: str, **labels: str) -> list[dict[str, Any]]:
        selector = ",".join(f"{key}={value}" for key, value in labels.items())
        query = f"?labelSelector={urllib.request.quote(selector)}" if selector else ""
        return self.request("GET", self.path(kind, namespace) + query)["items"]

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any], status: bool = False) -> Any:
        return self.request("PATCH", self.path(kind, namespace, name) + ("/status" if status else ""), patch)

    def delete(self, kind: str, namespace: str, name: str) -> Any:
        return self.request("DELETE", self.path(kind, namespace, name))


def pods_for(job: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The pods the Job controller would create for an Indexed Job: one per completion index, Pending."""
    template = job["spec"]["template"]
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    return [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{name}-{index}-{uuid.uuid4().hex[:5]}",
                "namespace": namespace,
                "labels": {**template["metadata"]["labels"], "batch.kubernetes.io/job-name": name},
                "annotations": {INDEX_ANNOTATION: str(index)},
            },
            "spec": template["spec"],
            "status": {"phase": "Pending"},
        }
        for index in range(job["spec"]["completions"])
    ]


def pod_status(phase: str, pulling: bool = False, exit_code: int | None = None) -> dict[str, Any]:
    """A pod status as the kubelet reports it: init container running, trainer running or terminated."""
    if pulling:
        return {"phase": "Pending", "initContainerStatuses": [{"name": "pull", "state": {"running": {}}}]}
    status: dict[str, Any] = {"phase": phase}
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error"}}
        status["containerStatuses"] = [{"name": "trainer", "state": state}]
    return status


class OperatorProcess:
    """`python -m wmtp_operator` against the emulator, as a subprocess; its output goes to `log`."""

    def __init__(self, emulator: Emulator, workdir: Path | None = None) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="wmtp-operator-"))
        self.log = self.workdir / "operator.log"
        self.liveness = f"http://127.0.0.1:{free_port()}/healthz"
        env = {**os.environ, "KUBECONFIG": str(emulator.kubeconfig(self.workdir))}
        env.pop("KUBERNETES_SERVICE_HOST", None)  # never the real cluster, even when run inside one
        # Cluster-wide and without peering: kmock 0.8 misparses /api/v1/namespaces, which a namespaced kopf lists.
        command = [sys.executable, "-m", "wmtp_operator", "--standalone", f"--liveness={self.liveness}"]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_for(self.alive, timeout=30, interval=0.1, what=f"the operator's liveness endpoint (log: {self.log})")

    def alive(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"the operator exited with {self.process.returncode}:\n{self.output()}")
        try:
            with urllib.request.urlopen(self.liveness, timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: the operator crashes mid-flight, as when its node dies."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
