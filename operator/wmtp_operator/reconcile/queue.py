"""The current attempt while a queue (Kueue) holds its Job suspended, judged purely from the Job, its pods and the
record: queued, or preempted.

- Suspended before any of its pods ran: queued (phase Queued). Nothing is wrong and nothing is counted; the Job
  stays, and `startupTimeout` counts from its admission (`kueue.admitted_at`), never from its creation. A Job
  admitted and suspended again before a pod ran (evicted while its pods were still pending) is queued again too:
  Kueue re-queues the same Workload, and no trainer ran that a new attempt could resume after.
- Suspended after a pod ran (`State.ran`, recorded while it ran, or a pod that ran and is being deleted): Kueue
  preempted or evicted it and the Job controller deletes its pods. That is a preemption, never a restart: the
  attempt ends, its pods' SIGTERM saves are waited for (the fence), and the next attempt (a new Job, a new
  Workload, queued again) resumes from the newest checkpoint. Re-admitting the old Job would resume from where
  it started.

A pass lists the Jobs, then the pods, and Kueue may act in between. A Job read suspended with pods running undeleted
is the admission that followed: queued for this pass. A pod being deleted while its Job reads admitted may be the
suspension that followed: looked at again before it is taken for a failure (`may_explain`). Limit: an attempt that
Kueue admitted and then preempted, its pods gone, all while the operator was down, reads as queued, and Kueue
re-admits that same Job, which resumes from where it started.

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


RECHECK_SECONDS = 2.0  # how soon to look again at a deletion the Job's suspension may explain (`may_explain`)


@dataclass(frozen=True, kw_only=True)
class Queued(Decision):
    """The attempt's Job waits in its queue for admission."""

    why: str


def ran(state: State, job: Obj | None, pods: Sequence[Obj]) -> State:
    """The record, with `ran` set once a pod of an admitted Job that a queue manages is seen to run. Never from a
    Job seen suspended: the pods, listed after it, may be those of its admission a moment later."""
    if state.ran or job is None or kueue.held(job) or not kueue.queued(job) or not any(map(podstat.ran, pods)):
        return state
    return state.model_copy(update={"ran": True})


def hold(view: View, state: State, job: Obj, pods: Sequence[Obj]) -> Queued | podstat.Stop:
    """A suspended attempt Job (`kueue.held`): queued while none of its pods has run, else preempted. That a pod ran
    is the record's (`ran`), or a pod that ran and that the suspension is deleting; one that runs undeleted is the
    admission that followed the Job as this pass read it."""
    meta = job["metadata"]
    name, namespace = meta["name"], meta.get("namespace") or (view.run.namespace if view.run else "default")
    workload = f"kubectl get workloads -n {namespace} -l {kueue.JOB_UID_LABEL}={meta.get('uid', '')}"
    if state.ran or any(podstat.ran(p) and p["metadata"].get("deletionTimestamp") for p in pods):
        why = f"Job {name} was suspended by Kueue after its pods started (preempted or evicted; {workload} says why)"
        return podstat.Stop(EVICTED, say(why), preempted=True, how="disruption")
    queue = kueue.queue_of(job)
    where = f"in LocalQueue {queue}" if queue else "(the Job is suspended)"
    nodes = (job.get("spec") or {}).get("parallelism") or 1
    why = say(f"attempt {state.attempt} queued: Job {name} waits for Kueue to admit it {where}, quota for its {nodes} "
              f"pod(s) at once; {workload} says why")  # fmt: skip
    return Queued(state=state, conditions=(view.condition("Started", "False", QUEUED, why),), why=why)


def may_explain(stop: podstat.Stop | None, job: Obj | None) -> bool:
    """The attempt stops only because a pod is being deleted, and a queue manages its Job, which does not show
    suspended. Kueue suspends a Job and the Job controller then deletes its pods: a pass that read the Job just
    before the suspension and the pods just after sees only the deletion. It is not taken for a failure until a
    look that sees the Job again, or the pod's end: the next pass (the pods' changes trigger it) tells which."""
    return stop is not None and stop.how == "deleted" and job is not None and kueue.queued(job)
