"""The current attempt while a queue (Kueue) holds its Job suspended, judged purely from the Job, its pods and the
record: queued, or preempted.

- Suspended before any of its pods ran: queued (phase Queued). Nothing is wrong and nothing is counted; the Job
  stays, and `startupTimeout` counts from its admission (`kueue.admitted_at`), never from its creation. A Job
  admitted and suspended again before a pod ran (evicted while its pods were still pending) is queued again too:
  Kueue re-queues the same Workload, and no trainer ran that a new attempt could resume after.
- Suspended after a pod ran (`State.ran`, recorded while it ran, or a pod seen running now): Kueue preempted or
  evicted it and the Job controller deletes its pods. That is a preemption, never a restart: the attempt ends, its
  pods' SIGTERM saves are waited for (the fence), and the next attempt (a new Job, a new Workload, queued again)
  resumes from the newest checkpoint. Re-admitting the old Job would resume from where it started.

Why Kueue waits, or evicted, is in its Workload's conditions, which the operator does not read: the message says
how to find it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wmtp_operator import kueue
from wmtp_operator import pods as podstat
from wmtp_operator.plan import Decision, say
from wmtp_operator.reconcile.view import View
from wmtp_operator.state import State

Obj = Mapping[str, Any]
QUEUED = "Queued"  # the phase, and the Started condition's reason
EVICTED = "EvictionByKueue"  # the reason of the preemption (as Kubernetes names a disruption: EvictionByEvictionAPI)


@dataclass(frozen=True, kw_only=True)
class Queued(Decision):
    """The attempt's Job waits in its queue for admission."""

    why: str


def ran(state: State, job: Obj | None, pods: Sequence[Obj]) -> State:
    """The record, with `ran` set once a pod of a Job a queue manages is seen to run."""
    if state.ran or job is None or not kueue.queued(job) or not any(map(podstat.ran, pods)):
        return state
    return state.model_copy(update={"ran": True})


def hold(view: View, state: State, job: Obj) -> Queued | podstat.Stop:
    """A suspended attempt Job (`kueue.held`): queued while none of its pods has run, else preempted."""
    meta = job["metadata"]
    name, namespace = meta["name"], meta.get("namespace") or (view.run.namespace if view.run else "default")
    workload = f"kubectl get workloads -n {namespace} -l {kueue.JOB_UID_LABEL}={meta.get('uid', '')}"
    if state.ran:
        why = f"Job {name} was suspended by Kueue after its pods started (preempted or evicted; {workload} says why)"
        return podstat.Stop(EVICTED, say(why), preempted=True, how="disruption")
    queue = kueue.queue_of(job)
    where = f"in LocalQueue {queue}" if queue else "(the Job is suspended)"
    nodes = (job.get("spec") or {}).get("parallelism") or 1
    why = say(f"attempt {state.attempt} queued: Job {name} waits for Kueue to admit it {where}, quota for its {nodes} "
              f"pod(s) at once; {workload} says why")  # fmt: skip
    return Queued(state=state, conditions=(view.condition("Started", "False", QUEUED, why),), why=why)
