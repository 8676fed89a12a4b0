"""An in-memory Kubernetes API (kmock) with the real operator process against it, for tests and benchmarks.

Test support: needs the dev extra (kmock) and ships in neither package nor image. On top of kmock's store this
plays what a real API server does that the operator relies on: names from generateName, uid, resourceVersion,
creationTimestamp, generation (bumped by spec changes), label selectors on lists, the status subresource split
(a status patch changes nothing else; a main-resource patch never the status), uid preconditions on delete and
patch, graceful pod deletion, and refusals a test injects (422, 403). `support.controllers` plays the Job
controller, the kubelet, the scheduler and the garbage collector.
"""

from __future__ import annotations

import asyncio
import collections
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
from prometheus_client.parser import text_string_to_metric_families

from support.controllers import PODS, Controllers, Kubelet, main_container, now, terminated
from support.waiting import answers, free_port, wait_for

RESOURCES = {
    "wmtp.io/v1alpha1/wmtpruns": ("WMTPRun", True, {"status"}),
    "batch/v1/jobs": ("Job", True, {"status"}),
    "v1/pods": ("Pod", True, {"status"}),
    "v1/configmaps": ("ConfigMap", True, set()),
    "v1/services": ("Service", True, set()),
    "v1/persistentvolumeclaims": ("PersistentVolumeClaim", True, set()),
    "v1/secrets": ("Secret", True, set()),
    "v1/serviceaccounts": ("ServiceAccount", True, set()),
    "rbac.authorization.k8s.io/v1/roles": ("Role", True, set()),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", True, set()),
    "networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", True, set()),
    "v1/events": ("Event", True, set()),
    # kopf looks these up at start-up (namespace and CRD discovery).
    "v1/namespaces": ("Namespace", False, set()),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, set()),
}
VERBS = {"get", "list", "watch", "create", "patch", "delete"}
KINDS = {kmock.resource(key): kind for key, (kind, _, _) in RESOURCES.items()}
PATHS = {
    kind: (f"/apis/{key.rsplit('/', 1)[0]}" if "/" in key.rsplit("/", 1)[0] else f"/api/{key.rsplit('/', 1)[0]}")
    + f"/namespaces/{{ns}}/{key.rsplit('/', 1)[1]}"
    for key, (kind, namespaced, _) in RESOURCES.items()
    if namespaced
}
_KEEP_REQUESTS = 100  # more than are ever in flight at once


@dataclass(frozen=True)
class Call:
    """One API request as the tests see it."""

    verb: str  # create | update | delete | fetch | list | watch
    kind: str
    namespace: str | None
    name: str | None
    subresource: str | None
    data: Any


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


def _failure(code: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=code, reason=reason, message=message, details={})


class _ApiServer(kmock.KubernetesEmulator, _DirectRouting, Controllers):
    """kmock's emulator plus what a real API server and its controllers do."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.kubelets: dict[str, Kubelet] = {}
        self.gc_paused = False
        self._gc_pending: list[str] = []
        self.refusals: list[tuple[Callable[[Call], bool], int, str, str]] = []
        self.hooks: list[tuple[Callable[[Call], bool], Callable[[Call], None]]] = []
        self.calls: collections.Counter[tuple[str, str, str | None]] = collections.Counter()
        self._versions = itertools.count(1)
        self._by_resource = {}
        self._dependents = {}
        self.job_controller = True

    def _next_version(self) -> str:
        return str(next(self._versions))

    def _stamp(self, data: dict[str, Any], create: bool) -> None:
        meta = data.setdefault("metadata", {})
        if create:
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now()
            meta.setdefault("generation", 1)
        meta["resourceVersion"] = self._next_version()

    def _stored(self, request: kmock.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        obj = self._find(key)
        return None if obj is None or obj.deleted else obj.raw

    async def _handle(self, request: kmock.Request) -> Any:
        kind = KINDS.get(request.resource) if request.resource is not None else None
        if kind is None or not request.resource.plural:
            return await super()._handle(request)
        data = request.data if isinstance(request.data, dict) else None
        verb = request.action.value.lower()  # list, watch, fetch, create, update, delete
        name = request.name or (data or {}).get("metadata", {}).get("name")
        call = Call(verb, kind, request.namespace, name, request.subresource, data)
        self.calls[(verb, kind, request.namespace)] += 1
        stored = self._stored(request) if request.name else None
        if request.action == kmock.action.CREATE and data is not None:
            for matches, code, reason, message in self.refusals:
                if matches(call):
                    raise _failure(code, reason, message)
            self._stamp(data, create=True)
            name = data["metadata"]["name"]  # generateName is resolved now
        elif request.action == kmock.action.UPDATE and data is not None and stored is not None:
            uid = (data.get("metadata") or {}).get("uid")
            if uid and uid != stored["metadata"]["uid"]:
                raise _failure(409, "Conflict", f"Precondition failed: UID in precondition: {uid}")
            if request.subresource == "status":  # the status subresource changes the status alone
                for key in [k for k in data if k != "status"]:
                    del data[key]
            elif "status" in RESOURCES_WITH_STATUS.get(kind, ()):  # and the main resource never does
                data.pop("status", None)
            if "spec" in data and request.subresource is None:
                data.setdefault("metadata", {})["generation"] = stored["metadata"].get("generation", 1) + 1
            self._stamp(data, create=False)
        elif request.action == kmock.action.DELETE and stored is not None:
            uid = ((data or {}).get("preconditions") or {}).get("uid")
            if uid and uid != stored["metadata"]["uid"]:
                raise _failure(409, "Conflict", f"Precondition failed: UID in precondition: {uid}")
            # A grace period of 0 (the kubelet's own delete once the containers have stopped, or a forced one)
            # removes the pod at once; any other delete of a pod is graceful.
            if kind == "Pod" and (data or {}).get("gracePeriodSeconds") != 0:
                raw = await self.stop_pod((request.resource, request.namespace, request.name))
                self._after(call)
                return aiohttp.web.json_response(raw)
        try:
            response = await super()._handle(request)
        except Exception:  # refused by kmock itself (409, 404): still a call the hooks may wait for
            self._after(call)
            raise
        if request.action == kmock.action.CREATE and data is not None:
            key = (request.resource, request.namespace, name)
            created = self._stored(kmock.Request(resource=request.resource, namespace=request.namespace, name=name))
            if created is not None:
                self._track(key, created)
            if created is not None and kind == "Job":
                await self.job_created(created)
            elif created is not None and kind == "ServiceAccount":
                await self.account_created(created)
        elif request.action == kmock.action.UPDATE and kind == "Pod" and stored is not None:
            await self.pod_changed(self._stored(request) or stored)
        elif request.action == kmock.action.DELETE and stored is not None:
            self._untrack((request.resource, request.namespace, request.name), stored)
            await self.collect(stored["metadata"].get("uid"))
        self._after(call)
        return response

    def _after(self, call: Call) -> None:
        for matches, action in list(self.hooks):
            if matches(call):
                action(call)

    # kmock finds objects by scanning them all; a benchmark with thousands needs the direct ways.
    async def _serve_fetch(self, request: kmock.Request) -> Any:
        stored = self._stored(request)
        if stored is None:
            raise kmock.KubernetesObjectNotFoundError()
        return stored

    async def _serve_list(self, request: kmock.Request) -> Any:
        selector = dict(part.split("=", 1) for part in request.params.get("labelSelector", "").split(",") if part)
        items = [
            raw
            for _, raw in self._live(request.resource, request.namespace)
            if selector.items() <= (raw["metadata"].get("labels") or {}).items()
        ]
        return {"metadata": {"resourceVersion": "..."}, "items": items}

    async def _serve_create(self, request: kmock.Request) -> Any:
        name = (request.data or {}).get("metadata", {}).get("name")
        return self._find((request.resource, request.namespace, name)).raw

    async def _serve_update(self, request: kmock.Request) -> Any:
        return self._find((request.resource, request.namespace, request.name)).last.raw

    async def _serve_delete(self, request: kmock.Request) -> Any:
        return self._find((request.resource, request.namespace, request.name)).last.raw


RESOURCES_WITH_STATUS = {kind: subresources for kind, _, subresources in RESOURCES.values()}


class Emulator:
    """kmock on 127.0.0.1 in a background thread, with a small synchronous JSON client and the controls a test
    needs to play the cluster (the kubelet per namespace, refusals, the garbage collector, hooks)."""

    def __init__(self, job_controller: bool = True) -> None:
        """`job_controller=False`: Jobs get no pods unless the caller plays the Job controller itself (e.g. a
        harness that runs each rendered pod in a container)."""
        self._job_controller = job_controller
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.url = self._run(self._start())

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    async def _start(self) -> str:
        self.server = _ApiServer()
        self.server.job_controller = self._job_controller
        await self.server.__aenter__()
        for key, (kind, namespaced, subresources) in RESOURCES.items():
            self.server.resources[key] = kmock.ResourceInfo(
                kind=kind, singular=kind.lower(), namespaced=namespaced, verbs=VERBS, subresources=subresources
            )
        self._http = kmock.Server(self.server)
        await self._http.__aenter__()
        return str(self._http.url).rstrip("/")

    def close(self) -> None:
        async def stop() -> None:
            await self._http.__aexit__(None, None, None)
            await self.server.__aexit__(None, None, None)

        self._run(stop())
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

    # ------------------------------------------------------------------ the client

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

    def delete(self, kind: str, namespace: str, name: str, grace_seconds: int | None = None) -> Any:
        options = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": grace_seconds}
        return self.request("DELETE", self.path(kind, namespace, name), options if grace_seconds is not None else None)

    # ------------------------------------------------------------------ playing the cluster

    def kubelet(self, namespace: str, **settings: Any) -> Kubelet:
        """How the kubelet and scheduler treat the pods of `namespace` from now on."""
        kubelet = self.server.kubelet(namespace)
        for key, value in settings.items():
            setattr(kubelet, key, value)
        return kubelet

    def refuse(self, kind: str, code: int, reason: str, message: str, namespace: str | None = None) -> None:
        """The API server refuses every create of `kind` (in `namespace`) with this status."""
        matches = lambda call: call.kind == kind and namespace in (None, call.namespace)  # noqa: E731
        self.server.refusals.append((matches, code, reason, message))

    def accept(self) -> None:
        self.server.refusals.clear()

    def after(self, matches: Callable[[Call], bool], action: Callable[[Call], None]) -> None:
        """Run `action` right after the API server has handled a request that `matches`, once."""

        def once(call: Call) -> None:
            self.server.hooks.remove(entry)
            action(call)

        entry = (matches, once)
        self.server.hooks.append(entry)

    def calls(self, verb: str, kind: str, namespace: str) -> int:
        return self.server.calls[(verb, kind, namespace)]

    def pause_gc(self) -> None:
        self.server.gc_paused = True

    def resume_gc(self) -> None:
        self._run(self.server.resume_gc())

    def release(self, namespace: str) -> None:
        """Let the terminating pods that the kubelet holds in `namespace` go."""
        self._run(self.server.release(namespace))

    def pods(self, namespace: str, attempt_job: str) -> list[dict[str, Any]]:
        return sorted(
            self.list("Pod", namespace, **{"batch.kubernetes.io/job-name": attempt_job}),
            key=lambda pod: pod["metadata"]["name"],
        )

    def set_status(self, namespace: str, pod: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        self.patch("Pod", namespace, pod["metadata"]["name"], {"status": status}, status=True)

    def exit(self, namespace: str, pod: Mapping[str, Any], code: int, message: Mapping[str, Any] | None = None) -> None:
        """The pod's trainer (or evaluator) exits with `code` (and this termination message)."""
        self.set_status(namespace, pod, terminated(code, message, container=main_container(pod)))

    def evict(self, namespace: str, pod: Mapping[str, Any]) -> None:
        """The Eviction API (a node drain): DisruptionTarget, then a graceful delete."""
        disruption = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                      "message": "Eviction API: evicting"}  # fmt: skip
        self.set_status(namespace, pod, {"conditions": [disruption]})
        self.delete("Pod", namespace, pod["metadata"]["name"])

    def evict_by_kubelet(self, namespace: str, pod: Mapping[str, Any], message: str = "low on memory") -> None:
        """Node-pressure eviction: the pod fails with reason Evicted, its containers killed."""
        disruption = {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": "TerminationByKubelet",
            "message": message,
        }
        status = {
            **terminated(137, reason="Error"),
            "reason": "Evicted",
            "message": message,
            "conditions": [disruption],
        }
        self.set_status(namespace, pod, status)


def kill_on(process: OperatorProcess) -> Callable[[Call], None]:
    """A hook action: SIGKILL the operator, as if its node died right after that request."""
    return lambda _call: process.kill(wait=False)


class OperatorProcess:
    """`python -m wmtp_operator` against the emulator, as a subprocess; its output goes to `log`."""

    def __init__(self, emulator: Emulator, workdir: Path | None = None, env: Mapping[str, str] | None = None) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="wmtp-operator-"))
        self.log = self.workdir / f"operator-{uuid.uuid4().hex[:6]}.log"
        self.liveness = f"http://127.0.0.1:{free_port()}/healthz"
        self.metrics_port = free_port()
        self.env = dict(env or {})  # what this operator's environment says beyond the test process's
        environment = {**os.environ, "KUBECONFIG": str(emulator.kubeconfig(self.workdir)), **self.env}
        environment.pop("KUBERNETES_SERVICE_HOST", None)  # never the real cluster, even when run inside one
        # Cluster-wide and without peering: kmock 0.8 misparses /api/v1/namespaces, which a namespaced kopf lists.
        command = [sys.executable, "-m", "wmtp_operator", "--standalone", f"--liveness={self.liveness}",
                   f"--metrics-port={self.metrics_port}"]  # fmt: skip
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(command, env=environment, stdout=out, stderr=subprocess.STDOUT)
        wait_for(self.alive, timeout=30, interval=0.1, what=f"the operator's liveness endpoint (log: {self.log})")

    def alive(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"the operator exited with {self.process.returncode}:\n{self.output()}")
        return answers(self.liveness)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Its /metrics: (sample name, labels) → value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def kill(self, wait: bool = True) -> None:
        """SIGKILL: the operator crashes mid-flight, as when its node dies."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        if wait:
            self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


__all__ = ["PODS", "Call", "Emulator", "Kubelet", "OperatorProcess", "kill_on"]
