"""The run's state machine, pure: (WMTPRun body, observed Jobs and pods, now) → actions, status changes, events.

Pending → Pulling (init containers) → Running → Succeeded. Any pod of the attempt failing, being evicted or
deleted, or its Job failing or vanishing → Restarting: restarts + 1, spec.resumeFrom := the latest checkpoint
rank 0 reported, the old attempt deleted, the next one created; past backoffLimit → Failed. Everything is
derived from what is observed now, so running it twice, or after an operator restart, changes nothing more.
Callers apply the actions in order and patch the status last: an interrupted apply is simply redone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from wmtp.config import ConfigError
from wmtp_operator import render
from wmtp_operator.spec import TERMINAL, Defaults, Run, Spec, Status

Obj = Mapping[str, Any]
# Status fields the operator owns; step, loss and latestCheckpoint belong to trainer rank 0.
OWNED = (
    "phase", "conditions", "attempt", "restarts", "maxSteps", "resumeFrom", "startTime", "completionTime",
    "observedGeneration", "message",
)  # fmt: skip
PROGRESSING = ("Pending", "Pulling", "Running", "Restarting")
WARNING_PHASES = ("Restarting", "Failed")


@dataclass(frozen=True)
class Create:
    """Create `obj`; if it exists, merge-patch it with `obj` when `update`, else leave it."""

    obj: dict[str, Any]
    update: bool = False


@dataclass(frozen=True)
class Delete:
    """Delete a child (its pods go with it); already gone is fine."""

    kind: str
    name: str


@dataclass(frozen=True)
class PatchSpec:
    patch: dict[str, Any]


Action = Create | Delete | PatchSpec


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    jobs: Sequence[Obj] = ()  # the run's Jobs (label wmtp.io/run)
    pods: Sequence[Obj] = ()  # the run's pods, of any attempt
    recipe_text: str | None = None  # the recipeRef ConfigMap's value, None if it does not exist


@dataclass(frozen=True)
class Plan:
    actions: list[Action] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)  # only the fields that change
    events: list[Event] = field(default_factory=list)


def reconcile(body: Obj, observed: Observed, now: str, defaults: Defaults = Defaults()) -> Plan:
    old = dict(body.get("status") or {})
    if old.get("phase") in TERMINAL:
        return Plan()  # a finished run is history; its Job may even be gone (ttlSecondsAfterFinished)
    try:
        run = Run.from_body(body, defaults)
        files = render.trainer_files(run, observed.recipe_text)
    except (ValidationError, ConfigError) as err:
        return _invalid(body, old, _message(err), now)
    machine = _Machine(run, files, observed, now)
    machine.step()
    new = {**old, **machine.status(old)}
    changes = {key: new[key] for key in OWNED if key in new and new[key] != old.get(key)}
    events: list[Event] = []
    # A transition is a new phase or a new attempt (a restart can follow a restart).
    if new.get("phase") != old.get("phase") or new.get("attempt") != old.get("attempt"):
        kind = "Warning" if new["phase"] in WARNING_PHASES else "Normal"
        events.append(Event(kind, new["phase"], new["message"]))
    return Plan(machine.actions, changes, events)


def _message(err: ValidationError | ConfigError) -> str:
    if isinstance(err, ConfigError):
        return str(err)
    return "; ".join(f"spec.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())


def _invalid(body: Obj, old: dict[str, Any], message: str, now: str) -> Plan:
    generation = body["metadata"].get("generation")
    conditions = set_condition(old.get("conditions", []), "Valid", "False", "InvalidSpec", message, now)
    new = {"phase": old.get("phase") or "Pending", "conditions": conditions, "message": message}
    new["observedGeneration"] = generation
    changes = {key: value for key, value in new.items() if old.get(key) != value}
    # One event per distinct problem: repeats (timer, child events) must not flood the run's events.
    events = [Event("Warning", "InvalidSpec", message)] if old.get("message") != message else []
    return Plan([], changes, events)


class _Machine:
    """One reconcile pass: decides the transition and accumulates actions and the new status fields."""

    def __init__(self, run: Run, files: render.TrainerFiles, observed: Observed, now: str) -> None:
        self.run, self.files, self.now = run, files, now
        self.spec: Spec = run.spec
        prev: Status = run.status
        self.attempt = prev.attempt or 0
        self.restarts = prev.restarts or 0
        self.phase = prev.phase
        self.start_time = prev.start_time
        self.completion_time: str | None = None
        self.resume_from = prev.resume_from
        self.message = prev.message or ""
        self.latest = prev.latest_checkpoint
        self.jobs = list(observed.jobs)
        self.pods = list(observed.pods)
        self.actions: list[Action] = []

    def step(self) -> None:
        if self.spec.suspend:
            self._delete_jobs(keep=None)
            self.phase, self.message = "Suspended", "suspended; set spec.suspend to false to resume"
            return
        if self.attempt == 0 or self.phase == "Suspended":
            self._next_attempt(resume_from=self.latest if self.attempt else None)
            self.phase = "Pending"
            self.message = f"attempt {self.attempt} created; resume: {self.resume_from}"
            return
        job = _find(self.jobs, render.job_name(self.run.name, self.attempt))
        pods = [p for p in self.pods if _labels(p).get(render.ATTEMPT_LABEL) == str(self.attempt)]
        failure = attempt_failure(job, pods, render.job_name(self.run.name, self.attempt))
        if failure is not None:
            self._fail_attempt(failure)
        elif attempt_succeeded(job, pods, self.spec.nodes):
            self.phase, self.message = "Succeeded", f"attempt {self.attempt} succeeded"
            self.completion_time = self.now
        else:
            self._delete_jobs(keep=render.job_name(self.run.name, self.attempt))
            phase, message = progress(pods, self.spec.nodes, self.attempt)
            # Restarting, and why, stays visible until the new attempt's pods show up.
            if not (phase == "Pending" and self.phase == "Restarting"):
                self.phase, self.message = phase, message

    def _fail_attempt(self, failure: str) -> None:
        if self.restarts >= self.spec.backoff_limit:
            self.phase = "Failed"
            self.message = f"attempt {self.attempt} failed: {failure}; backoffLimit {self.spec.backoff_limit} reached"
            self.completion_time = self.now
            return
        failed = self.attempt
        self.restarts += 1
        self._next_attempt(resume_from=self.latest)
        self.phase = "Restarting"
        self.message = (
            f"attempt {failed} failed: {failure}; restart {self.restarts}/{self.spec.backoff_limit} "
            f"resumes from {render.resume_of(self.spec)}"
        )

    def _next_attempt(self, resume_from: str | None) -> None:
        """Patch resumeFrom (when a checkpoint is known), drop other attempts, create the next one."""
        if resume_from and resume_from != self.spec.resume_from:
            self.actions.append(PatchSpec({"spec": {"resumeFrom": resume_from}}))
            self.spec = self.spec.model_copy(update={"resume_from": resume_from})
            self.run = replace(self.run, spec=self.spec)
        self.attempt += 1
        self._delete_jobs(keep=render.job_name(self.run.name, self.attempt))
        self.actions += [
            Create(obj, update=obj["kind"] == "ConfigMap")
            for obj in render.attempt_objects(self.run, self.files, self.attempt)
        ]
        self.resume_from = render.resume_of(self.spec)
        self.start_time = self.start_time or self.now

    def _delete_jobs(self, keep: str | None) -> None:
        for job in self.jobs:
            name = job["metadata"]["name"]
            if name != keep and not job["metadata"].get("deletionTimestamp"):
                self.actions.append(Delete("Job", name))

    def status(self, old: Mapping[str, Any]) -> dict[str, Any]:
        new: dict[str, Any] = {
            "phase": self.phase,
            "attempt": self.attempt,
            "restarts": self.restarts,
            "maxSteps": self.files.recipe.train.max_steps,
            "resumeFrom": self.resume_from,
            "startTime": self.start_time,
            "completionTime": self.completion_time,
            "observedGeneration": self.run.generation,
            "message": self.message,
        }
        conditions = old.get("conditions", [])
        conditions = set_condition(conditions, "Valid", "True", "Valid", "spec and recipe are valid", self.now)
        progressing = "True" if self.phase in PROGRESSING else "False"
        conditions = set_condition(conditions, "Progressing", progressing, str(self.phase), self.message, self.now)
        if self.phase in TERMINAL:
            conditions = set_condition(conditions, str(self.phase), "True", str(self.phase), self.message, self.now)
        new["conditions"] = conditions
        return {key: value for key, value in new.items() if value is not None}


def set_condition(
    conditions: Sequence[Mapping[str, Any]], type_: str, status: str, reason: str, message: str, now: str
) -> list[dict[str, Any]]:
    """Conditions with `type_` set; its lastTransitionTime moves only when its status changes."""
    previous = next((c for c in conditions if c.get("type") == type_), None)
    since = previous["lastTransitionTime"] if previous and previous.get("status") == status else now
    updated = {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": since}
    return [updated if c is previous else dict(c) for c in conditions] if previous else [*conditions, updated]


def _labels(obj: Obj) -> Mapping[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


def _find(objs: Sequence[Obj], name: str) -> Obj | None:
    return next((o for o in objs if o["metadata"]["name"] == name), None)


def _condition(obj: Obj, type_: str) -> Mapping[str, Any] | None:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == type_ and c.get("status") == "True"), None)


def pod_failure(pod: Obj) -> str | None:
    """Why this pod broke its attempt, or None while it is healthy."""
    name, status = pod["metadata"]["name"], pod.get("status") or {}
    phase = status.get("phase")
    if phase == "Failed":
        if status.get("reason"):  # Evicted, DeadlineExceeded, ...
            return f"pod {name} {status['reason']}: {status.get('message', '')}".rstrip(": ")
        for container in [*status.get("initContainerStatuses", []), *status.get("containerStatuses", [])]:
            ended = (container.get("state") or {}).get("terminated") or {}
            if ended and ended.get("exitCode", 0) != 0:
                reason = ended.get("reason") or "Error"
                return f"pod {name} container {container['name']} {reason} (exit code {ended['exitCode']})"
        return f"pod {name} failed"
    if phase != "Succeeded" and pod["metadata"].get("deletionTimestamp"):
        return f"pod {name} was deleted"
    disruption = _condition(pod, "DisruptionTarget")
    if phase != "Succeeded" and disruption:
        return f"pod {name} {disruption.get('reason', 'disrupted')}: {disruption.get('message', '')}".rstrip(": ")
    return None


def attempt_failure(job: Obj | None, pods: Sequence[Obj], name: str) -> str | None:
    """The first reason the attempt cannot go on, or None. Pods go first: their reasons are the useful ones."""
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        reason = pod_failure(pod)
        if reason:
            return reason
    if job is None or job["metadata"].get("deletionTimestamp"):
        return f"Job {name} was deleted"
    failed = _condition(job, "Failed")
    if failed:
        return f"Job {name} failed: {failed.get('reason', '')} {failed.get('message', '')}".strip()
    return None


def attempt_succeeded(job: Obj | None, pods: Sequence[Obj], nodes: int) -> bool:
    done = sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Succeeded")
    return done >= nodes or (job is not None and _condition(job, "Complete") is not None)


def _in_init(pod: Obj) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Pending" and any(
        "running" in (c.get("state") or {}) for c in status.get("initContainerStatuses", [])
    )


def progress(pods: Sequence[Obj], nodes: int, attempt: int) -> tuple[str, str]:
    """Phase and message of a healthy, unfinished attempt."""
    phases = [(p.get("status") or {}).get("phase") for p in pods]
    running = phases.count("Running")
    if running and running + phases.count("Succeeded") >= nodes:
        return "Running", f"attempt {attempt}: {running}/{nodes} pods running"
    pulling = sum(1 for p in pods if _in_init(p))
    if pulling:
        return "Pulling", f"attempt {attempt}: {pulling}/{nodes} pods pulling models"
    return "Pending", f"attempt {attempt}: {running}/{nodes} pods running"
