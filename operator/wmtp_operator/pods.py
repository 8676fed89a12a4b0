"""What the kubelet, the scheduler and the Job controller say about an attempt, read from pod and Job status.

Pure functions over the dicts the API serves. They answer: has the attempt stopped, and was that a failure, a
preemption (not counted against backoffLimit) or something no retry can fix; is it still starting, and why not
yet; did it succeed, and with what warnings. Every text taken from a pod is clipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wmtp import contract
from wmtp.config import TERMINATION, DocumentError, clip, parse_json
from wmtp_operator.state import seconds_since

Obj = Mapping[str, Any]
TRAINER = "trainer"
# pod status.reason when the kubelet stops a pod that did nothing wrong: node pressure, a critical pod's
# preemption, a node shutdown.
STOPPED_BY_NODE = frozenset({"Evicted", "Preempting", "Terminated"})
# Waiting reasons that are progress, not problems.
NORMAL_WAITING = frozenset({"ContainerCreating", "PodInitializing"})
# No retry fixes these; the run fails without using up restarts.
FATAL_AT_ONCE = frozenset({"InvalidImageName"})
# A missing Secret, ConfigMap or key: fatal unless someone creates it within the grace period.
FATAL_AFTER_GRACE = frozenset({"CreateContainerConfigError"})
MISSING_GRACE_SECONDS = 120
STARTUP_TIMEOUT = "StartupTimeout"  # the reason when pods did not start within spec.startupTimeout


@dataclass(frozen=True)
class Stop:
    """Why an attempt cannot go on."""

    reason: str  # CamelCase, for Events and conditions
    message: str
    preempted: bool = False
    fatal: bool = False
    # How a pod stopped, for choosing the cause when several did: "disruption" (evicted, preempted, a node going
    # away), "crash", "save" (the trainer's exit 75 after SIGTERM), "deleted"; "" for the Job or start-up.
    how: str = ""


# Which pod's stop explains the attempt's: a disruption explains the crashes it causes (the other ranks fail when
# one is taken away); a crash explains the SIGTERM saves of the pods the Job controller then stops.
_PRECEDENCE = ("disruption", "crash", "save", "deleted")


@dataclass(frozen=True)
class Waiting:
    """Why a pod has not started yet: the kubelet's waiting reason or the scheduler's."""

    pod: str
    reason: str
    message: str

    def __str__(self) -> str:
        return clip(f"pod {self.pod}: {self.reason}: {self.message}".rstrip(": "))


def _name(pod: Obj) -> str:
    return str(pod["metadata"]["name"])


def _status(obj: Obj) -> Mapping[str, Any]:
    return obj.get("status") or {}


def _containers(pod: Obj, init: bool = True) -> list[Mapping[str, Any]]:
    status = _status(pod)
    return [*(status.get("initContainerStatuses") or [] if init else []), *(status.get("containerStatuses") or [])]


def condition(obj: Obj, type_: str, status: str = "True") -> Mapping[str, Any] | None:
    return next(
        (c for c in _status(obj).get("conditions") or [] if c.get("type") == type_ and c.get("status") == status), None
    )


def termination(container: Mapping[str, Any]) -> dict[str, Any]:
    """The trainer's last words (its termination message), or {} when there are none or they are not ours (the pod
    writes them: read with the bounded parser, so that no text can make a pass fail)."""
    text = ((container.get("state") or {}).get("terminated") or {}).get("message")
    if not isinstance(text, str):
        return {}
    try:
        data = parse_json(text, TERMINATION)
    except DocumentError:
        return {}
    return data if isinstance(data, dict) else {}


def container(pod: Obj, name: str) -> Mapping[str, Any]:
    """The status of the pod's container `name` ({} before it has one)."""
    return next((c for c in _containers(pod, init=False) if c.get("name") == name), {})


def _trainer(pod: Obj) -> Mapping[str, Any]:
    return container(pod, TRAINER)


def _preempted_exit(container: Mapping[str, Any]) -> bool:
    ended = (container.get("state") or {}).get("terminated") or {}
    last_words = termination(container).get(contract.TERMINATION_REASON)
    return ended.get("exitCode") == contract.ExitCode.PREEMPTED or last_words == contract.STOP_PREEMPTED


def disrupted(pod: Obj) -> Mapping[str, Any] | None:
    """The DisruptionTarget condition (eviction, the scheduler's preemption, a taint), or a kubelet eviction."""
    found = condition(pod, "DisruptionTarget")
    if found:
        return found
    status = _status(pod)
    if status.get("phase") == "Failed" and status.get("reason") in STOPPED_BY_NODE:
        return {"reason": status["reason"], "message": status.get("message", "")}
    return None


def pod_stop(pod: Obj) -> Stop | None:
    """Why this pod broke its attempt, or None while it is healthy or done."""
    name, status = _name(pod), _status(pod)
    phase = status.get("phase")
    if phase == "Succeeded":
        return None
    disruption = disrupted(pod)
    if disruption:
        reason = str(disruption.get("reason") or "Disrupted")
        text = clip(f"pod {name} {reason}: {disruption.get('message', '')}".rstrip(": "))
        return Stop(reason, text, preempted=True, how="disruption")
    if phase == "Failed":
        for container in _containers(pod):
            ended = (container.get("state") or {}).get("terminated") or {}
            if not ended or ended.get("exitCode", 0) == 0:
                continue
            if _preempted_exit(container):
                text = clip(f"pod {name} stopped after saving a checkpoint (preempted)")
                return Stop("Preempted", text, preempted=True, how="save")
            reason = str(ended.get("reason") or "Error")
            said = termination(container).get(contract.TERMINATION_MESSAGE)
            detail = f": {said}" if isinstance(said, str) and said else ""
            text = f"pod {name} container {container.get('name')} {reason} (exit code {ended.get('exitCode')}){detail}"
            return Stop(reason, clip(text), how="crash")
        return Stop("PodFailed", clip(f"pod {name} failed: {status.get('message', '')}".rstrip(": ")), how="crash")
    if pod["metadata"].get("deletionTimestamp"):
        return Stop("PodDeleted", clip(f"pod {name} was deleted"), how="deleted")
    return None


def started(pod: Obj) -> bool:
    """Scheduled, image pulled, a container running or done: past what startupTimeout bounds."""
    if _status(pod).get("phase") in ("Running", "Succeeded", "Failed"):
        return True
    return any({"running", "terminated"} & set(c.get("state") or {}) for c in _containers(pod))


def waiting(pod: Obj) -> Waiting | None:
    """Why a pod is not starting: the scheduler's Unschedulable, or a container's waiting reason."""
    unscheduled = condition(pod, "PodScheduled", "False")
    if unscheduled and unscheduled.get("reason") == "Unschedulable":
        return Waiting(_name(pod), "Unschedulable", str(unscheduled.get("message", "")))
    for container in _containers(pod):
        state = (container.get("state") or {}).get("waiting") or {}
        reason = state.get("reason")
        if reason and reason not in NORMAL_WAITING:
            return Waiting(_name(pod), str(reason), f"container {container.get('name')}: {state.get('message', '')}")
    return None


def startup_stop(
    job: Obj, pods: Sequence[Obj], nodes: int, now: str, timeout: int, account_missing: str | None
) -> tuple[Stop | None, Waiting | None]:
    """For an attempt whose pods have not all started: a Stop once it cannot start, else why it waits."""
    age = seconds_since(job["metadata"].get("creationTimestamp"), now)
    grace = min(MISSING_GRACE_SECONDS, timeout)
    blocked = next((w for w in (waiting(p) for p in pods if not started(p)) if w), None)
    if account_missing and len(pods) < nodes:
        blocked = Waiting("(none created)", "ServiceAccountNotFound", f"serviceaccount {account_missing!r} not found")
    if blocked and blocked.reason in FATAL_AT_ONCE:
        return Stop(blocked.reason, str(blocked), fatal=True), blocked
    if blocked and age >= grace and blocked.reason in (*FATAL_AFTER_GRACE, "ServiceAccountNotFound"):
        return Stop(blocked.reason, f"{blocked}; still missing after {grace}s", fatal=True), blocked
    if age >= timeout:
        last = str(blocked) if blocked else f"{sum(map(started, pods))}/{nodes} pods started"
        return Stop(STARTUP_TIMEOUT, clip(f"pods did not start within startupTimeout ({timeout}s): {last}")), blocked
    return None, blocked


def attempt_stop(job: Obj | None, pods: Sequence[Obj], name: str) -> Stop | None:
    """The reason the attempt cannot go on, or None: the pod whose stop explains the others' (_PRECEDENCE), then
    the Job's."""
    stops = [stop for stop in map(pod_stop, sorted(pods, key=_name)) if stop]
    if stops:
        return min(stops, key=lambda stop: _PRECEDENCE.index(stop.how))
    if job is None or job["metadata"].get("deletionTimestamp"):
        return Stop("JobDeleted", f"Job {name} was deleted")
    failed = condition(job, "Failed")
    if failed:
        return Stop("JobFailed", clip(f"Job {name} failed: {failed.get('reason', '')} {failed.get('message', '')}"))
    return None


def attempt_succeeded(job: Obj | None, pods: Sequence[Obj], nodes: int) -> bool:
    done = sum(1 for p in pods if _status(p).get("phase") == "Succeeded")
    return done >= nodes or (job is not None and condition(job, "Complete") is not None)


def warnings(pods: Sequence[Obj], limit: int = 5) -> list[str]:
    """What the trainers said went wrong without failing the run (their termination messages), deduplicated."""
    found: list[str] = []
    for pod in sorted(pods, key=_name):
        said = termination(_trainer(pod)).get(contract.TERMINATION_WARNINGS)
        for warning in said if isinstance(said, list) else []:
            text = clip(str(warning))
            if text not in found:
                found.append(text)
    return found[:limit]


def last_checkpoint(pods: Sequence[Obj]) -> str | None:
    """The checkpoint the trainers named in their last words (the highest step), if any."""
    best: tuple[int, str] | None = None
    for pod in pods:
        said = termination(_trainer(pod))
        step, checkpoint = said.get(contract.TERMINATION_STEP), said.get(contract.TERMINATION_CHECKPOINT)
        if isinstance(step, int) and isinstance(checkpoint, str) and (best is None or step > best[0]):
            best = (step, checkpoint)
    return best[1] if best else None


def _pulling(pod: Obj) -> bool:
    return _status(pod).get("phase") == "Pending" and any(
        "running" in (c.get("state") or {}) for c in _status(pod).get("initContainerStatuses") or []
    )


def progress(pods: Sequence[Obj], nodes: int, attempt: int) -> tuple[str, str]:
    """Phase and message of a healthy, unfinished attempt.

    Pulling lasts from the first init container's start until every trainer runs, so that a run goes Pending →
    Pulling → Running and never back to Pending while its trainers start after their pulls.
    """
    phases = [_status(p).get("phase") for p in pods]
    running = phases.count("Running")
    if running and running + phases.count("Succeeded") >= nodes:
        return "Running", f"attempt {attempt}: {running}/{nodes} pods running"
    pulling = sum(1 for p in pods if _pulling(p))
    if any(started(p) for p in pods):
        return "Pulling", f"attempt {attempt}: {pulling}/{nodes} pods pulling models, {running}/{nodes} running"
    return "Pending", f"attempt {attempt}: {running}/{nodes} pods running"
