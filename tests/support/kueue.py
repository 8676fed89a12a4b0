"""Kueue, as the emulated API server plays it (`support.emulator`), for the Jobs that name a LocalQueue.

What the real one does (kueue.sigs.k8s.io, the batch/Job integration), and this plays:
- its mutating webhook creates a Job that carries `kueue.x-k8s.io/queue-name` suspended;
- admission: when the queue has quota for all the Job's pods at once, it sets `spec.suspend` false and merges its
  ResourceFlavor's node labels into the pod template's nodeSelector; the Job controller (`support.controllers`)
  then sets `status.startTime` and creates the pods;
- preemption or eviction: it sets `spec.suspend` true again, clears `status.startTime` and restores the pod
  template; the Job controller deletes the pods (gracefully: the trainers' SIGTERM saves), and counts none of them
  as a failure.
Here admission comes `admit_after` seconds after the Job's creation, or when the test says (`admit`); preemption
only when the test says (`preempt`). No Workload object is played: the operator reads none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kmock

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # Kueue's own name, written here independently of the operator's
JOBS = kmock.resource("batch", "v1", "jobs")


@dataclass
class Queue:
    """What Kueue does with the queued Jobs of one namespace."""

    admit_after: float | None = 0.0  # seconds from a Job's creation to its admission; None: held until `admit`
    flavor: dict[str, str] = field(default_factory=lambda: {"example.com/flavor": "on-demand"})  # its node labels


class Kueue:
    """Mixed into the emulated API server, beside the Job controller it drives (`support.controllers`: `_patch`,
    `job_resumed`, `job_suspended`)."""

    queues: dict[str, Queue]

    def queue(self, namespace: str) -> Queue:
        return self.queues.setdefault(namespace, Queue())

    @staticmethod
    def queued(job: Mapping[str, Any]) -> bool:
        return bool(((job.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL))

    def webhook(self, job: dict[str, Any]) -> None:
        """At the Job's creation: a queued Job is created suspended."""
        if self.queued(job):
            job.setdefault("spec", {})["suspend"] = True

    async def job_queued(self, job: Mapping[str, Any]) -> None:
        """A queued Job was created: admitted after the namespace's delay, unless the test admits it."""
        delay = self.queue(job["metadata"]["namespace"]).admit_after
        if not self.queued(job) or delay is None:
            return
        key = (JOBS, job["metadata"]["namespace"], job["metadata"]["name"])
        loop = asyncio.get_running_loop()
        loop.call_later(delay, lambda: asyncio.ensure_future(self.admit(key)))

    async def admit(self, key: tuple[Any, str, str]) -> None:
        """Quota for all the Job's pods: unsuspended, its flavor's node labels in the pod template."""
        flavor = self.queue(key[1]).flavor
        patch = {"spec": {"suspend": False, "template": {"spec": {"nodeSelector": dict(flavor)}}}}
        if await self._patch(key, patch) is not None:
            await self.job_resumed(key)

    async def preempt(self, key: tuple[Any, str, str]) -> None:
        """Evicted (a higher priority Workload, a reclaimed quota): suspended, startTime cleared, template restored."""
        unflavored = {name: None for name in self.queue(key[1]).flavor}
        patch = {"spec": {"suspend": True, "template": {"spec": {"nodeSelector": unflavored}}},
                 "status": {"startTime": None}}  # fmt: skip
        if await self._patch(key, patch) is not None:
            await self.job_suspended(key)
