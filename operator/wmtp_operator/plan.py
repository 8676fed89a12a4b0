"""What a reconcile pass decides, as data: the actions to apply in order, the status fields that change, the
Events to post, when to look again; and what the API server said when it refused one of the actions.

Kept apart from the state machine (`reconcile`) so that the API adapter (`kube`) depends on these shapes alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wmtp.config import clip, redact_uri
from wmtp_operator.state import State
from wmtp_operator.status import TERMINAL, Condition, get_condition, set_condition

Obj = Mapping[str, Any]
FOREIGN_RETRY_SECONDS = 5.0  # how soon to look again while a namesake's objects are being deleted
PROGRESSING = ("Pending", "Pulling", "Running", "Restarting", "Evaluating")
WARNING_PHASES = ("Restarting", "Failed")
# A condition turning False for one of these is progress, not a problem: no Warning Event.
QUIET_REASONS = ("Starting", "NextAttempt")


@dataclass(frozen=True)
class Create:
    """Create `obj`; if it exists and this run controls it, merge-patch it with `obj` when `update`."""

    obj: dict[str, Any]
    update: bool = False


@dataclass(frozen=True)
class Delete:
    """Delete a child this run controls (uid precondition: never a namesake); already gone is fine."""

    kind: str
    name: str
    uid: str


@dataclass(frozen=True)
class PatchRun:
    """Merge-patch the WMTPRun itself (its uid as precondition); `state` is the record it writes, if any."""

    patch: dict[str, Any]
    state: State | None = None


Action = Create | Delete | PatchRun


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    jobs: Sequence[Obj] = ()  # Jobs labelled with the run's name (of this run or a namesake)
    pods: Sequence[Obj] = ()  # pods labelled with the run's name, of any attempt
    recipe_text: str | None = None  # the recipeRef ConfigMap's value, None if it does not exist
    account_missing: str | None = None  # the ServiceAccount the spec names, when it does not exist


@dataclass(frozen=True)
class Plan:
    actions: list[Action] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)  # the fields that change (None removes one)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None  # reconcile again after this many seconds even if nothing happens
    final: bool = False  # the run is over: no further passes are needed


def say(text: str) -> str:
    """Any text bound for a status, an Event or a log: credentials redacted, length clipped."""
    return clip(redact_uri(" ".join(str(text).split())))


def backoff_seconds(count: int) -> float:
    """Delay before retrying a refused child: 30 s, doubling, at most 15 min."""
    return float(min(30 * 2 ** (count - 1), 900))


@dataclass(frozen=True)
class Refused:
    """What the API server said when it refused to create a child (or a namesake holds its name)."""

    kind: str
    name: str
    code: int
    reason: str
    message: str


def conditions_of(status: Obj) -> list[Mapping[str, Any]]:
    """The status's conditions, leaving out anything a trainer wrote that is not one."""
    found = status.get("conditions")
    return (
        [c for c in found if isinstance(c, Mapping) and isinstance(c.get("type"), str)]
        if isinstance(found, list)
        else []
    )


@dataclass(frozen=True)
class Outcome:
    """What a pass concluded, before it becomes the status and Events."""

    phase: str
    message: str
    problems: list[str]  # why the spec or recipe cannot be used (Valid=False)
    conditions: dict[str, Condition]  # by type, as decided this pass
    max_steps: Any
    reported: Mapping[str, Any]  # step and loss of the accepted report, if any


def status_of(old: Obj, outcome: Outcome, state: State, now: str, generation: int) -> dict[str, Any]:
    """The whole status the operator owns, rewritten from its state and this pass (whatever a trainer wrote)."""
    problem = "; ".join(outcome.problems)
    message = outcome.message
    if problem and problem not in message:
        message = f"{message}; {problem}" if message else problem
    step = outcome.reported.get("step", old.get("step"))
    loss = outcome.reported.get("loss", old.get("loss"))
    new: dict[str, Any] = {
        "phase": outcome.phase,
        "message": say(message),
        "attempt": state.attempt,
        "restarts": state.restarts,
        "preemptions": state.preemptions,
        "latestCheckpoint": state.checkpoint,
        "resumeFrom": state.resume_from,
        "startTime": state.start_time,
        "completionTime": state.completion_time,
        "observedGeneration": generation,
        "maxSteps": outcome.max_steps if isinstance(outcome.max_steps, int) else None,
        "step": step if isinstance(step, int) and not isinstance(step, bool) else None,
        "loss": loss if isinstance(loss, float | int) and not isinstance(loss, bool) else None,
        "eval": state.evaluation.model_dump(by_alias=True, exclude_none=True) if state.evaluation else None,
    }
    new["progress"] = f"{new['step'] or 0}/{new['maxSteps']}" if new["maxSteps"] else None
    conditions = dict(outcome.conditions)
    valid = ("False", "InvalidSpec", say(problem)) if problem else ("True", "Valid", "spec and recipe are valid")
    derived = {
        "Valid": valid,
        "Progressing": ("True" if outcome.phase in PROGRESSING else "False", outcome.phase, new["message"]),
        **({outcome.phase: ("True", outcome.phase, new["message"])} if outcome.phase in TERMINAL else {}),
    }
    for type_, (status, reason, text) in derived.items():
        conditions[type_] = Condition(
            type=type_,
            status=status,
            reason=reason,
            message=text,
            last_transition_time=now,
            observed_generation=generation,
        )
    merged = conditions_of(old)
    for condition in conditions.values():
        merged = set_condition(merged, condition)
    new["conditions"] = merged
    return new


def events_of(old: Obj, new: Mapping[str, Any], outcome: Outcome, decided: Sequence[Event]) -> list[Event]:
    """The pass's Events: a transition (a new phase or attempt), what it decided, and a Warning when a condition
    turns False for a new reason or the spec becomes invalid in a new way — once, not on every pass."""
    events = list(decided)
    if new.get("phase") != old.get("phase") or new.get("attempt") != old.get("attempt"):
        kind = "Warning" if new["phase"] in WARNING_PHASES else "Normal"
        events.insert(0, Event(kind, str(new["phase"]), say(new["message"])))
    before = old.get("conditions")
    for type_, condition in outcome.conditions.items():
        reason = condition.reason
        if (
            condition.status == "False"
            and reason not in QUIET_REASONS
            and get_condition(before, type_).get("reason") != reason
        ):
            events.append(Event("Warning", reason, condition.message))
    problem = say("; ".join(outcome.problems))
    if problem and get_condition(before, "Valid").get("message") != problem:
        events.append(Event("Warning", "InvalidSpec", problem))
    return events
