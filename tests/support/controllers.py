"""The parts of a real cluster that kmock does not play, for the emulated API server (`support.emulator`).

- the Job controller: an Indexed Job's pods (one per completion index, with the index annotation), created once
  the pod's ServiceAccount exists and while the Job is not suspended (its startTime set, its Suspended condition
  kept; suspending it stops its pods, none counted as failed); the Job marked Failed when a pod fails
  (backoffLimit 0), its other pods then stopped, and Complete when all succeed;
- the kubelet and the scheduler, per namespace (`Kubelet`): pods run at once, or wait with a reason (an image
  pull back-off, a missing Secret), or stay unschedulable; a deleted pod stops after a grace period, its trainer
  exiting as the real one does on SIGTERM (75, "Preempted", after its save), unless the test holds it;
- the garbage collector: deleting an object deletes every object whose ownerReferences name its uid.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kmock

from wmtp import contract

INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
PODS = kmock.resource("", "v1", "pods")
JOBS = kmock.resource("batch", "v1", "jobs")
ACCOUNTS = kmock.resource("", "v1", "serviceaccounts")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Kubelet:
    """What the kubelet and the scheduler do with the pods of one namespace."""

    start: str = "run"  # run: Running at once; pull: the init container runs; hold: Pending, the test moves them
    waiting: tuple[str, str] | None = None  # (reason, message) every container waits with, e.g. ImagePullBackOff
    unschedulable: str | None = None  # the scheduler's message
    grace: float = 0.5  # seconds a deleted pod takes to stop (its SIGTERM save), long enough to be seen stopping
    hold_terminating: bool = False  # deleted pods keep running (saving) until the test releases them
    sigterm_exit: int = int(contract.ExitCode.PREEMPTED)  # the trainer's exit after SIGTERM (its save)

    def initial_status(self, container: str = "trainer") -> dict[str, Any]:
        if self.unschedulable:
            condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                         "message": self.unschedulable}  # fmt: skip
            return {"phase": "Pending", "conditions": [condition]}
        if self.waiting:
            reason, message = self.waiting
            state = {"waiting": {"reason": reason, "message": message}}
            return {"phase": "Pending", "containerStatuses": [{"name": container, "state": state}]}
        if self.start == "run":
            return running(container)
        if self.start == "pull":
            return {"phase": "Pending", "initContainerStatuses": [{"name": "pull", "state": {"running": {}}}]}
        return {"phase": "Pending"}


def running(container: str = "trainer") -> dict[str, Any]:
    started = {"startedAt": now()}  # as the kubelet says when the container started
    return {"phase": "Running", "containerStatuses": [{"name": container, "state": {"running": started}}]}


def terminated(
    exit_code: int, message: Mapping[str, Any] | None = None, reason: str | None = None, container: str = "trainer"
) -> dict[str, Any]:
    """A pod whose `container` exited: Succeeded for 0, else Failed; `message` is its termination message."""
    state: dict[str, Any] = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error")}
    if message is not None:
        state["message"] = json.dumps(message)
    phase = "Succeeded" if exit_code == 0 else "Failed"
    return {"phase": phase, "containerStatuses": [{"name": container, "state": {"terminated": state}}]}


def main_container(pod: Mapping[str, Any]) -> str:
    """The name of the pod's (first) container: trainer, or eval for an evaluation pod."""
    return str(((pod.get("spec") or {}).get("containers") or [{"name": "trainer"}])[0]["name"])


def _suspended(job: Mapping[str, Any], suspended: bool) -> list[dict[str, Any]]:
    """The Job's conditions with the Job controller's Suspended condition set."""
    reason, message = ("JobSuspended", "Job suspended") if suspended else ("JobResumed", "Job resumed")
    condition = {"type": "Suspended", "status": str(suspended), "reason": reason, "message": message,
                 "lastTransitionTime": now()}  # fmt: skip
    others = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("type") != "Suspended"]
    return [*others, condition]


def _owners(raw: Mapping[str, Any]) -> list[str]:
    return [ref.get("uid") for ref in raw.get("metadata", {}).get("ownerReferences") or []]


class Controllers:
    """Mixed into the emulated API server: reacts to what was just created, changed or deleted."""

    kubelets: dict[str, Kubelet]
    job_controller: bool
    gc_paused: bool
    _gc_pending: list[str]
    # Indexes over kmock's store, which can only be scanned: live keys by resource, and by owner uid.
    _by_resource: dict[tuple[str, str, str], set[tuple[Any, str, str]]]
    _dependents: dict[str, set[tuple[Any, str, str]]]

    # The store (kmock's): `_objects`, `_lock`, `_buses`; `_stamp` fills in what an API server sets.

    async def _emit(self, resource: Any, kind: str, raw: Mapping[str, Any]) -> None:
        await self._buses[resource].put({"type": kind, "object": dict(raw)})

    def _track(self, key: tuple[Any, str, str], raw: Mapping[str, Any]) -> None:
        resource = key[0]
        self._by_resource.setdefault((resource.group, resource.version, resource.plural), set()).add(key)
        for uid in _owners(raw):
            self._dependents.setdefault(uid, set()).add(key)

    def _untrack(self, key: tuple[Any, str, str], raw: Mapping[str, Any]) -> None:
        resource = key[0]
        self._by_resource.get((resource.group, resource.version, resource.plural), set()).discard(key)
        for uid in _owners(raw):
            self._dependents.get(uid, set()).discard(key)

    async def _add(self, resource: Any, data: dict[str, Any]) -> None:
        meta = data["metadata"]
        self._stamp(data, create=True)
        key = (resource, meta.get("namespace"), meta["name"])
        async with self._lock:
            if key in self._objects:
                self._objects[key].create(data)
            else:
                self._objects[key] = data
            raw = self._objects[key].raw
        self._track(key, raw)
        await self._emit(resource, "ADDED", raw)

    async def _patch(self, key: tuple[Any, str, str], patch: dict[str, Any]) -> dict[str, Any] | None:
        async with self._lock:
            obj = self._find(key)
            if obj is None or obj.deleted:
                return None
            patch.setdefault("metadata", {})["resourceVersion"] = self._next_version()
            obj.patch(patch)
            raw = obj.raw
        await self._emit(key[0], "MODIFIED", raw)
        return raw

    async def _remove(self, key: tuple[Any, str, str]) -> None:
        async with self._lock:
            obj = self._find(key)
            if obj is None or obj.deleted:
                return
            raw = obj.raw
            obj.delete()
        self._untrack(key, raw)
        await self._emit(key[0], "DELETED", raw)
        await self.collect(raw["metadata"].get("uid"))
        if key[0] == PODS and raw.get("status", {}).get("phase") != "Succeeded":
            await self.pod_changed({**raw, "status": {**raw.get("status", {}), "phase": "Failed"}})

    def _find(self, key: tuple[Any, str, str]) -> Any:
        return self._objects[key] if key in self._objects else None  # noqa: SIM401 (no .get on kmock's store)

    def _live(self, resource: Any, namespace: str | None = None) -> list[tuple[tuple[Any, str, str], dict[str, Any]]]:
        keys = self._by_resource.get((resource.group, resource.version, resource.plural), set())
        found = [(key, self._find(key)) for key in list(keys) if namespace in (None, key[1])]
        return [(key, obj.raw) for key, obj in found if obj is not None and not obj.deleted]

    # ------------------------------------------------------------------ the garbage collector

    async def collect(self, uid: str | None) -> None:
        """Delete what `uid` owned (pods stop gracefully), unless the test paused the collector."""
        if not uid:
            return
        if self.gc_paused:
            self._gc_pending.append(uid)
            return
        for key in list(self._dependents.pop(uid, ())):
            await (self.stop_pod(key) if key[0] == PODS else self._remove(key))

    async def resume_gc(self) -> None:
        self.gc_paused = False
        pending, self._gc_pending = self._gc_pending, []
        for uid in pending:
            await self.collect(uid)

    # ------------------------------------------------------------------ the kubelet

    def kubelet(self, namespace: str) -> Kubelet:
        return self.kubelets.setdefault(namespace, Kubelet())

    async def stop_pod(self, key: tuple[Any, str, str]) -> dict[str, Any] | None:
        """A graceful delete: deletionTimestamp now, the trainer's SIGTERM exit and removal after the grace."""
        raw = await self._patch(key, {"metadata": {"deletionTimestamp": now()}})
        if raw is not None:
            loop = asyncio.get_running_loop()
            loop.call_later(self.kubelet(key[1]).grace, lambda: asyncio.ensure_future(self._stopped(key)))
        return raw

    async def _stopped(self, key: tuple[Any, str, str]) -> None:
        obj = self._find(key)
        if obj is None or obj.deleted:
            return
        kubelet = self.kubelet(key[1])
        if kubelet.hold_terminating:
            return  # still saving: `release` ends it
        status = obj.raw.get("status", {})
        trainer_ran = any("running" in (c.get("state") or {}) for c in status.get("containerStatuses") or [])
        if trainer_ran and status.get("phase") not in ("Succeeded", "Failed"):
            words = {"reason": contract.STOP_PREEMPTED} if kubelet.sigterm_exit == contract.ExitCode.PREEMPTED else None
            status = terminated(kubelet.sigterm_exit, words, container=main_container(obj.raw))
            await self._patch(key, {"status": status})
        await self._remove(key)

    async def release(self, namespace: str) -> None:
        """The held terminating pods of `namespace` finish their saves and go."""
        self.kubelet(namespace).hold_terminating = False
        for key, raw in self._live(PODS, namespace):
            if raw["metadata"].get("deletionTimestamp"):
                await self._stopped(key)

    # ------------------------------------------------------------------ the Job controller

    async def job_created(self, job: Mapping[str, Any]) -> None:
        if not self.job_controller:
            return  # the caller plays the Job controller
        meta = job["metadata"]
        key = (JOBS, meta["namespace"], meta["name"])
        if job["spec"].get("suspend"):
            conditions = (job.get("status") or {}).get("conditions") or []
            if not any(c.get("type") == "Suspended" and c.get("status") == "True" for c in conditions):
                await self._patch(key, {"status": {"conditions": _suspended(job, True)}})
            return  # no pods until it is resumed
        if not (job.get("status") or {}).get("startTime"):
            job = await self._patch(key, {"status": {"startTime": now()}}) or job
        template = job["spec"]["template"]
        account = template["spec"].get("serviceAccountName", "default")
        if account != "default" and not any(key[2] == account for key, _ in self._live(ACCOUNTS, meta["namespace"])):
            return  # the real controller retries and records FailedCreate events; the pods never come
        kubelet = self.kubelet(meta["namespace"])
        for index in range(job["spec"]["completions"]):
            name = f"{meta['name']}-{index}"
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{name}-{uuid.uuid4().hex[:5]}",
                    "namespace": meta["namespace"],
                    "labels": {
                        **template["metadata"]["labels"],
                        "batch.kubernetes.io/job-name": meta["name"],
                        "batch.kubernetes.io/job-completion-index": str(index),
                    },
                    "annotations": {INDEX_ANNOTATION: str(index)},
                    "ownerReferences": [
                        {
                            "apiVersion": "batch/v1",
                            "kind": "Job",
                            "name": meta["name"],
                            "uid": meta["uid"],
                            "controller": True,
                        }
                    ],
                },
                "spec": {**template["spec"], "hostname": name},
                "status": kubelet.initial_status(main_container(template)),
            }
            await self._add(PODS, pod)

    async def job_resumed(self, key: tuple[Any, str, str]) -> None:
        """Unsuspended (Kueue admitted it): Suspended=False, startTime now, its pods created."""
        obj = self._find(key)
        if obj is None or obj.deleted or not self.job_controller:
            return
        status = {"conditions": _suspended(obj.raw, False), "startTime": now()}
        job = await self._patch(key, {"status": status})
        if job is not None:
            await self.job_created(job)

    async def job_suspended(self, key: tuple[Any, str, str]) -> None:
        """Suspended (Kueue preempted it): Suspended=True, its pods deleted gracefully, none counted as failed."""
        obj = self._find(key)
        if obj is None or obj.deleted or not self.job_controller:
            return
        await self._patch(key, {"status": {"conditions": _suspended(obj.raw, True)}})
        for pod_key in list(self._dependents.get(obj.raw["metadata"]["uid"], ())):
            await self.stop_pod(pod_key)

    async def pod_changed(self, pod: Mapping[str, Any]) -> None:
        """backoffLimit 0: one failed pod (a pod deleted before it succeeded counts) fails the Job and stops the
        others; all succeeded completes it."""
        job_uid = next(
            (ref["uid"] for ref in pod["metadata"].get("ownerReferences") or [] if ref["kind"] == "Job"), None
        )
        namespace = pod["metadata"]["namespace"]
        job_key = next((key for key, raw in self._live(JOBS, namespace) if raw["metadata"]["uid"] == job_uid), None)
        if job_key is None:
            return
        job = self._objects[job_key].raw
        finished = [c for c in job.get("status", {}).get("conditions") or [] if c.get("type") in ("Failed", "Complete")]
        if job["spec"].get("suspend") or any(c.get("status") == "True" for c in finished):
            return  # a suspended Job's pods are stopped by the suspension: no failure of the Job
        siblings = [
            (key, self._find(key).raw) for key in self._dependents.get(job_uid, ()) if not self._find(key).deleted
        ]
        phases = [raw.get("status", {}).get("phase") for _, raw in siblings]
        if all(raw["metadata"]["uid"] != pod["metadata"]["uid"] for _, raw in siblings):
            phases.append(pod.get("status", {}).get("phase"))  # a pod that is gone
        if "Failed" in phases:
            failed = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                      "message": "Job has reached the specified backoff limit"}  # fmt: skip
            await self._patch(job_key, {"status": {"conditions": [failed], "failed": phases.count("Failed")}})
            for key, raw in siblings:
                if raw.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
                    await self.stop_pod(key)
        elif phases.count("Succeeded") >= job["spec"]["completions"]:
            complete = {"type": "Complete", "status": "True", "reason": "CompletionsReached", "message": ""}
            await self._patch(job_key, {"status": {"conditions": [complete], "succeeded": phases.count("Succeeded")}})

    async def account_created(self, account: Mapping[str, Any]) -> None:
        """Jobs whose pods waited for this ServiceAccount get them now."""
        namespace, account_name = account["metadata"]["namespace"], account["metadata"]["name"]
        for _, job in self._live(JOBS, namespace):
            spec = job["spec"]["template"]["spec"]
            waiting = job["metadata"]["namespace"] == namespace and spec.get("serviceAccountName") == account_name
            if waiting and not self._dependents.get(job["metadata"]["uid"]):
                await self.job_created(job)
