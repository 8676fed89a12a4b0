"""A node for the emulator: a kubelet that runs each pod with a real container runtime.

Test support for `make e2e-local`. The emulator plays the API server, the Job controller and the garbage
collector (`support.controllers`); `Node` plays the kubelet of one namespace in their place (the emulated
kubelet is told to hold its pods and to leave terminating ones alone). The pure parts are in `support.pods`:
- each pod is prepared (env resolved, `$(VAR)` expanded, ConfigMap, Secret and projected volumes as files, the
  service-account token for `support.secure_api`, /etc/hosts with the names the Service's DNS would give) and
  started by the runtime; its containers' states, exit codes and termination messages go into its status;
- a pod being deleted (deletionTimestamp: its Job failed or went, or it was deleted) gets SIGTERM, SIGKILL after
  its grace period, its final status, and then the kubelet's own delete with grace 0.
One departure, because the pods share the host's network: each Job's declared container ports are mapped to
free host ports, and a `--...port=N` argument naming one is rewritten to match (as a Service would route).
"""

from __future__ import annotations

import base64
import re
import signal
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.emulator import Emulator
from support.pods import (
    ConfigurationError,
    Runnable,
    pod_status,
    runnable_pod,
    termination_message,
)
from support.runtime import Runtime
from support.secure_api import SecureApi
from support.waiting import free_port, wait_for

DEFAULT_GRACE_S = 30  # terminationGracePeriodSeconds when a pod does not say
_PORT_ARG = re.compile(r"^(--[\w-]*port=)(\d+)$")


@dataclass
class _Pod:
    runnable: Runnable
    directory: Path
    reported: dict[str, Any] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    terminating: bool = False


class Node:
    """Plays the kubelet for `namespace`, in a background thread, until `close()`."""

    def __init__(
        self,
        emulator: Emulator,
        runtime: Runtime,
        workdir: Path,
        namespace: str,
        api: SecureApi | None = None,
        interval_s: float = 0.5,
    ) -> None:
        self.emulator, self.runtime, self.workdir, self.namespace, self.api = emulator, runtime, workdir, namespace, api
        # The emulated kubelet creates pods Pending and leaves terminating ones to this node.
        emulator.kubelet(namespace, start="hold", hold_terminating=True)
        self.interval_s = interval_s
        self.errors: list[str] = []  # tracebacks of failed passes: a test should find none
        self._reported: dict[str, dict[str, Any]] = {}  # pod name → the last status reported, kept after it goes
        self._pods: dict[str, _Pod] = {}
        self._ports: dict[str, dict[int, int]] = {}  # Job uid → container port → host port
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="node", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------- what a test does to a pod

    def stop_container(self, pod: str, container: str = "trainer", grace_s: float | None = None) -> threading.Thread:
        """SIGTERM to the container, SIGKILL if still up after the grace period (the pod's, unless given): what a
        kubelet does when the container must go (preemption, node shutdown). Returns the thread doing it."""
        record = self._record(pod)
        grace = grace_s if grace_s is not None else self._grace(record)
        thread = threading.Thread(
            target=self.runtime.signal, args=(record.runnable.manifest, container, signal.SIGTERM, grace), daemon=True
        )
        thread.start()
        return thread

    def kill_container(self, pod: str, container: str = "trainer") -> None:
        """SIGKILL: the container dies at once, as when its process is OOM-killed or its node fails."""
        self.runtime.signal(self._record(pod).runnable.manifest, container, signal.SIGKILL)

    def logs(self, pod: str, container: str = "trainer") -> str:
        """The container's output so far, kept once the pod is gone ("" before it has started here)."""
        saved = self.workdir / pod / f"{container}.log"
        if saved.exists():
            return saved.read_text()
        with self._lock:
            record = self._pods.get(pod)
        return self.runtime.logs(record.runnable.manifest, container) if record is not None else ""

    def last_status(self, pod: str) -> dict[str, Any]:
        """The last status reported for the pod, even once it is gone ({} if none was)."""
        with self._lock:
            return self._reported.get(pod, {})

    def pod_names(self) -> list[str]:
        with self._lock:
            return sorted(self._pods)

    def every_log(self) -> dict[str, str]:
        """`pod/container` → output, for every container of every pod this node ran: those gone (their saved logs,
        the evaluation's included) and those still running."""
        logs = {f"{path.parent.name}/{path.stem}": path.read_text() for path in sorted(self.workdir.glob("*/*.log"))}
        with self._lock:
            running = list(self._pods.items())
        for pod, record in running:
            for container in record.runnable.termination_logs:
                logs.setdefault(f"{pod}/{container}", self.runtime.logs(record.runnable.manifest, container))
        return logs

    def close(self) -> None:
        """Stop the loop and every pod still running (without grace: the test is over)."""
        self._closing.set()
        self._thread.join(timeout=60)
        with self._lock:
            pods = list(self._pods.items())
        for name, record in pods:
            self._save_logs(record)
            self.runtime.remove(record.runnable.manifest)
            with self._lock:
                self._pods.pop(name, None)

    def _record(self, pod: str) -> _Pod:
        with self._lock:
            if pod not in self._pods:
                raise KeyError(f"pod {pod} is not running here; known: {sorted(self._pods)}")
            return self._pods[pod]

    # ------------------------------------------------------------------------- the loop

    def _loop(self) -> None:
        while not self._closing.is_set():
            try:
                self.sync()
            except Exception:
                self.errors.append(traceback.format_exc())
            self._closing.wait(self.interval_s)

    def sync(self) -> None:
        """One pass over the namespace's pods as the API holds them now."""
        pods = self.emulator.list("Pod", self.namespace)
        for pod in pods:
            if pod["metadata"].get("deletionTimestamp"):
                self._terminate(pod)
            else:
                self._sync_pod(pod, pods)
        present = {p["metadata"]["name"] for p in pods}
        with self._lock:
            vanished = [n for n, r in self._pods.items() if n not in present and not r.terminating]
        for name in vanished:  # removed without a graceful delete: its containers still get their grace
            self._terminate({"metadata": {"name": name, "namespace": self.namespace}}, in_api=False)

    def _sync_pod(self, pod: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        name = pod["metadata"]["name"]
        with self._lock:
            record = self._pods.get(name)
        if record is None:
            record = self._start(pod, pods)
            if record is None:
                return
        if record.terminating:
            return
        self._mirror(pod, record)

    def _start(self, pod: dict[str, Any], pods: list[dict[str, Any]]) -> _Pod | None:
        name = pod["metadata"]["name"]
        directory = self.workdir / name
        account = pod["spec"].get("serviceAccountName", "default")
        api = None
        if self.api is not None:
            token = self.api.token(self.namespace, account)
            api = {"host": self.api.host, "port": str(self.api.port), "token": token, "ca": self.api.ca}
        try:
            runnable = runnable_pod(pod, self._lookup, directory, self._hosts(pod, pods), self.workdir / "claims", api)
        except ConfigurationError as err:
            waiting = {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)}}
            statuses = [{"name": c["name"], "state": waiting} for c in pod["spec"]["containers"]]
            self._patch_status(pod, {"phase": "Pending", "containerStatuses": statuses})
            return None
        self._map_ports(pod, runnable.manifest)
        record = _Pod(runnable, directory)  # directory is self.workdir / name: `logs` finds it after the pod goes
        with self._lock:
            self._pods[name] = record
        self.runtime.start(runnable.manifest, directory)
        return record

    def _mirror(self, pod: dict[str, Any], record: _Pod) -> dict[str, Any]:
        manifest = record.runnable.manifest
        states = self.runtime.states(manifest)
        for container, state in states.items():
            if state.status == "terminated" and container not in record.messages:
                record.messages[container] = termination_message(
                    pod,
                    container,
                    record.runnable.termination_logs[container],
                    lambda c=container: self.runtime.logs(manifest, c),
                    failed=state.exit_code != 0,
                )
        status = pod_status(pod, states, record.messages)
        if status != record.reported:
            self._patch_status(pod, status)
            record.reported = status
            with self._lock:
                self._reported[pod["metadata"]["name"]] = status
        return status

    def _terminate(self, pod: dict[str, Any], in_api: bool = True) -> None:
        """A graceful deletion: SIGTERM, SIGKILL after the grace period, the final status, then the delete."""
        name = pod["metadata"]["name"]
        with self._lock:
            record = self._pods.get(name)
            if record is not None and record.terminating:
                return
            if record is not None:
                record.terminating = True
        if record is None:
            if in_api:  # never started here: nothing to stop
                self.emulator.delete("Pod", self.namespace, name, grace_seconds=0)
            return
        threading.Thread(target=self._finish, args=(pod, record, in_api), daemon=True).start()

    def _finish(self, pod: dict[str, Any], record: _Pod, in_api: bool) -> None:
        try:
            manifest = record.runnable.manifest
            states = self.runtime.states(manifest)
            grace = self._grace(record)
            running = [c for c, s in states.items() if s.status == "running"]
            stops = [
                threading.Thread(target=self.runtime.signal, args=(manifest, c, signal.SIGTERM, grace)) for c in running
            ]
            for thread in stops:
                thread.start()
            for thread in stops:
                thread.join()
            if in_api:
                current = self.emulator.get("Pod", self.namespace, pod["metadata"]["name"])
                if current is not None:
                    self._mirror(current, record)
                    self.emulator.delete("Pod", self.namespace, pod["metadata"]["name"], grace_seconds=0)
            self._save_logs(record)
            self.runtime.remove(manifest)
            with self._lock:
                self._pods.pop(pod["metadata"]["name"], None)
        except Exception:
            self.errors.append(traceback.format_exc())

    # ------------------------------------------------------------------------- helpers

    def _lookup(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self.emulator.get(kind, namespace, name)
        if obj is not None and kind == "Secret" and obj.get("stringData"):
            # What an API server stores for stringData: base64 under data.
            encoded = {k: base64.b64encode(v.encode()).decode() for k, v in obj["stringData"].items()}
            obj = {**obj, "data": {**(obj.get("data") or {}), **encoded}}
        return obj

    def _hosts(self, pod: dict[str, Any], pods: list[dict[str, Any]]) -> dict[str, str]:
        """The DNS names a headless Service gives the pods it selects (`<hostname>.<subdomain>[.<ns>.svc...]`):
        only when the Service exists, as with cluster DNS."""
        subdomain = pod["spec"].get("subdomain")
        if not subdomain or self.emulator.get("Service", self.namespace, subdomain) is None:
            return {}
        names: dict[str, str] = {}
        for other in pods:
            spec = other["spec"]
            if spec.get("subdomain") == subdomain and spec.get("hostname"):
                short = f"{spec['hostname']}.{subdomain}"
                for name in (short, f"{short}.{self.namespace}.svc", f"{short}.{self.namespace}.svc.cluster.local"):
                    names[name] = "127.0.0.1"
        return names

    def _map_ports(self, pod: dict[str, Any], manifest: dict[str, Any]) -> None:
        owner = next(iter(pod["metadata"].get("ownerReferences") or []), {})
        key = owner.get("uid") or pod["metadata"]["name"]
        containers = [*manifest["spec"].get("initContainers", []), *manifest["spec"]["containers"]]
        declared = {p["containerPort"] for c in containers for p in c.get("ports", [])}
        with self._lock:
            mapping = self._ports.setdefault(key, {})
            for port in declared:
                mapping.setdefault(port, free_port())
        for container in containers:
            container.pop("ports", None)
            container["args"] = [_mapped(arg, mapping) for arg in container.get("args", [])]
            container["command"] = [_mapped(arg, mapping) for arg in container.get("command", [])]
            if not container["command"]:
                del container["command"]

    def _grace(self, record: _Pod) -> float:
        return float(record.runnable.manifest["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_S))

    def _patch_status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        self.emulator.patch("Pod", self.namespace, pod["metadata"]["name"], {"status": status}, status=True)

    def _save_logs(self, record: _Pod) -> None:
        for container in record.runnable.termination_logs:
            path = record.directory / f"{container}.log"
            if not path.exists():
                path.write_text(self.runtime.logs(record.runnable.manifest, container))


def _mapped(arg: str, mapping: dict[int, int]) -> str:
    match = _PORT_ARG.match(arg)
    if match and int(match.group(2)) in mapping:
        return f"{match.group(1)}{mapping[int(match.group(2))]}"
    return arg


def wait_until(check: Callable[[], Any], timeout: float, what: str, node: Node, interval: float = 0.25) -> Any:
    """Poll `check` until truthy; fail at once if the node's loop broke, with `what` on a timeout."""

    def checked() -> Any:
        if node.errors:
            raise AssertionError("the test node failed:\n" + node.errors[0])
        return check()

    return wait_for(checked, timeout, interval, what)
