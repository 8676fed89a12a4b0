"""What the operator knows of Kueue (kueue.sigs.k8s.io): the labels that hand an attempt's Job to a queue, and how a
Job a queue holds looks. Pure functions over the Job as the API serves it; no Kueue object is ever read.

Kueue manages a batch/v1 Job that carries `QUEUE_LABEL`: its webhook creates the Job suspended (`spec.suspend`), a
Workload stands for it in the LocalQueue, and on admission (quota for all its pods at once) Kueue sets `suspend`
false and the Job controller sets `status.startTime` and creates the pods. To preempt or evict it, Kueue suspends it
again and clears `status.startTime`; the Job controller deletes its pods. The Job controller records each change in
the Job's `Suspended` condition. Why a Workload waits, or was evicted, is in the Workload's conditions alone.

The operator never writes `spec.suspend` of a Job: a suspended attempt Job is its queue's doing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"  # on the Workload Kueue creates for a Job: how to find it
SUSPENDED = "Suspended"  # the Job controller's condition type

Obj = Mapping[str, Any]


def labels(queue_name: str | None, priority_class_name: str | None) -> dict[str, str]:
    """The labels that hand a Job to a LocalQueue, with a WorkloadPriorityClass (none for what is unset)."""
    found = {QUEUE_LABEL: queue_name, PRIORITY_LABEL: priority_class_name}
    return {key: value for key, value in found.items() if value}


def held(job: Obj) -> bool:
    """The Job is suspended: not admitted yet, or preempted (its pods are being deleted)."""
    return (job.get("spec") or {}).get("suspend") is True


def _suspended_condition(job: Obj) -> Mapping[str, Any] | None:
    conditions = (job.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if isinstance(c, Mapping) and c.get("type") == SUSPENDED), None)


def queued(job: Obj) -> bool:
    """A queue manages the Job: it names a LocalQueue, or it has been suspended (Kueue may manage Jobs without the
    label: `manageJobsWithoutQueueName`)."""
    return bool(((job.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL)) or (
        held(job) or _suspended_condition(job) is not None
    )


def queue_of(job: Obj) -> str | None:
    return ((job.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL)


def admitted_at(job: Obj, now: str) -> str:
    """When the Job was let run, where `startupTimeout` counts from: its `status.startTime` (set by the Job controller
    once the Job is not suspended), else when it was resumed (the `Suspended` condition turning False), else `now`
    for a Job resumed a moment ago that the Job controller has not synced yet; a Job never suspended, from its
    creation."""
    start = (job.get("status") or {}).get("startTime")
    if isinstance(start, str) and start:
        return start
    condition = _suspended_condition(job)
    if condition is None:
        return str((job.get("metadata") or {}).get("creationTimestamp") or now)
    resumed = condition.get("lastTransitionTime")
    return resumed if condition.get("status") == "False" and isinstance(resumed, str) and resumed else now
