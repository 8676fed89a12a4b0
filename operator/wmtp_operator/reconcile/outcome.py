"""A pass's decisions folded into the run's status and Events.

The status is rewritten whole on every pass from the state record and the decisions, whatever a trainer wrote
over it; `headline` is the one place the phase and the message are decided, `conditions_of` the one place the
conditions are: each of them from the record, what the pass observed and the phase, never from the status found
(which lends only the lastTransitionTime of a condition whose status holds). A condition type the operator does not
own is dropped, and Succeeded and Failed always say what the phase says. Events say what changed: a new phase or
attempt, what a step decided, and a Warning when a condition turns False for a new reason — once, not on every
pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from wmtp_operator.plan import Decision, Event, say
from wmtp_operator.reconcile.attempt import Going
from wmtp_operator.reconcile.evaluation import EvalDecision
from wmtp_operator.reconcile.launch import Created, Held, Retry
from wmtp_operator.reconcile.view import View
from wmtp_operator.state import Ending, State
from wmtp_operator.status import CONDITION_TYPES, Condition, Reported, get_condition, held_since

PROGRESSING = ("Pending", "Pulling", "Running", "Restarting", "Evaluating")
WARNING_PHASES = ("Restarting", "Failed")
# A condition turning False for one of these is progress, not a problem: no Warning Event.
QUIET_REASONS = ("Starting", "NextAttempt")


def headline(decided: Decision, view: View) -> tuple[str, str]:
    """The run's phase and message, from the last step's decision and the record it leaves."""
    state, limit = decided.state, view.backoff_limit
    match decided:
        case Retry():  # a child of the next attempt, or of the evaluation, was refused: it waits to be retried
            return _refused_phase(state), decided.said
        case EvalDecision():
            return "Evaluating" if decided.pending else "Succeeded", f"{state.message or ''}; {decided.message}"
        case Going():
            phase, message = decided.pods
            previous = state.previous
            if not decided.seen and previous is not None and previous.cause != "suspend":
                phase, message = "Restarting", f"attempt {state.attempt} created after {_ended(previous, state, limit)}"
            return phase, f"{message}; {decided.waiting}" if decided.waiting else message
        case Held():
            ending = state.ending
            if decided.suspended or (ending is not None and ending.cause == "suspend"):
                return "Suspended", f"suspended; {decided.why}"
            if ending is None:
                return "Pending", decided.why
            return "Restarting", f"{_ended(ending, state, limit)}; {decided.why}"
        case Created():
            ending, resume = state.previous, say(decided.resume)
            if ending is None or ending.cause == "suspend":
                return "Pending", f"attempt {state.attempt} created; resume: {resume}"
            return "Restarting", f"{_ended(ending, state, limit)}; attempt {state.attempt} resumes from {resume}"
    assert state.final is not None  # a pass that decides none of the above finds the run over
    return state.final, state.message or ""


def _refused_phase(state: State) -> str:
    if state.final == "Succeeded":
        return "Evaluating"
    if state.ending is not None and state.ending.cause != "suspend":
        return "Restarting"
    return "Pending"


def _ended(ending: Ending, state: State, limit: int) -> str:
    if ending.cause == "failure":
        return f"attempt {ending.attempt} failed: {ending.message}; restart {state.restarts}/{limit}"
    if ending.cause == "preemption":
        return (
            f"attempt {ending.attempt} was preempted: {ending.message}; preemption {state.preemptions} (not counted "
            "as a restart)"
        )
    return f"attempt {ending.attempt} was suspended"


def status_of(view: View, decided: Decision, report: Reported | None) -> dict[str, Any]:
    """The whole status the operator owns, from the record and this pass's decisions (`report`: rank 0's, if one
    of the current attempt was accepted)."""
    state, old = decided.state, view.old
    phase, message = headline(decided, view)
    problem = "; ".join(view.problems)
    if problem and problem not in message:
        message = f"{message}; {problem}" if message else problem
    step = report.step if report else old.get("step")
    loss = report.loss if report else old.get("loss")
    max_steps = view.files.recipe.train.max_steps if view.files else old.get("maxSteps")
    new: dict[str, Any] = {
        "phase": phase,
        "message": say(message),
        "attempt": state.attempt,
        "restarts": state.restarts,
        "preemptions": state.preemptions,
        "latestCheckpoint": state.checkpoint,
        "resumeFrom": state.resume_from,
        "startTime": state.start_time,
        "completionTime": state.completion_time,
        "observedGeneration": view.generation,
        "maxSteps": max_steps if isinstance(max_steps, int) else None,
        "step": step if isinstance(step, int) and not isinstance(step, bool) else None,
        "loss": loss if isinstance(loss, float | int) and not isinstance(loss, bool) else None,
        "eval": state.evaluation.model_dump(by_alias=True, exclude_none=True) if state.evaluation else None,
    }
    new["progress"] = f"{new['step'] or 0}/{new['maxSteps']}" if new["maxSteps"] else None
    new["conditions"] = [
        held_since(old.get("conditions"), condition).model_dump(by_alias=True)
        for condition in conditions_of(view, decided, phase, new["message"])
    ]
    return new


def conditions_of(view: View, decided: Decision, phase: str, message: str) -> list[Condition]:
    """Every condition of the run, one of each type in CONDITION_TYPES order: Valid and Applied from the spec and
    the record unless a step decided them, what the steps decided (Started, SpecApplied, Evaluated), and the
    verdicts from the phase — Progressing, Succeeded and Failed, never both True."""
    state = decided.state
    problem = say("; ".join(view.problems))
    valid = ("True", "Valid", "spec and recipe are valid") if not problem else ("False", "InvalidSpec", problem)
    verdicts = [
        view.condition("Progressing", "True" if phase in PROGRESSING else "False", phase, message),
        *(
            view.condition(kind, "True", phase, message) if phase == kind else
            view.condition(kind, "False", phase, f"the run is {phase}")
            for kind in ("Succeeded", "Failed")
        ),
    ]  # fmt: skip
    found = {c.type: c for c in [view.condition("Valid", *valid), *_applied(view, state), *decided.conditions]}
    found.update((c.type, c) for c in verdicts)
    return [found[type_] for type_ in CONDITION_TYPES if type_ in found]


def _applied(view: View, state: State) -> list[Condition]:
    """Whether the children exist, from the record: a refusal it holds, else the evaluation's Job or the current
    attempt's objects (none before the first attempt)."""
    if state.refused is not None:
        return [view.condition("Applied", "False", "Refused", state.refused.message)]
    if state.evaluation is not None:
        return [view.condition("Applied", "True", "Created", f"Job {state.evaluation.job} exists")]
    if state.attempt:
        return [view.condition("Applied", "True", "Created", f"attempt {state.attempt}'s objects exist")]
    return []


def events_of(view: View, new: Mapping[str, Any], decided: Decision) -> list[Event]:
    """The pass's Events: a transition (a new phase or attempt), what it decided, and a Warning when a condition
    turns False for a new reason or the spec becomes invalid in a new way — once, not on every pass."""
    old = view.old
    events = list(decided.events)
    if new.get("phase") != old.get("phase") or new.get("attempt") != old.get("attempt"):
        kind = "Warning" if new["phase"] in WARNING_PHASES else "Normal"
        events.insert(0, Event(kind, str(new["phase"]), say(new["message"])))
    before = old.get("conditions")
    for condition in _latest(decided.conditions):
        reason = condition.reason
        if (
            condition.status == "False"
            and reason not in QUIET_REASONS
            and get_condition(before, condition.type).get("reason") != reason
        ):
            events.append(Event("Warning", reason, condition.message))
    problem = say("; ".join(view.problems))
    if problem and get_condition(before, "Valid").get("message") != problem:
        events.append(Event("Warning", "InvalidSpec", problem))
    return events


def _latest(conditions: Iterable[Condition]) -> list[Condition]:
    """One condition of each type: the last one decided, where the first one of its type was."""
    return list({condition.type: condition for condition in conditions}.values())
