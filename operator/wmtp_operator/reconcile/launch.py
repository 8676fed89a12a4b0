"""The next attempt (or the first), and the next try after the API server refused a child.

Gates hold the attempt, in this order, and the first that holds says why: the fence (attempt N+1 starts only once
no pod of attempt N runs any more: their SIGTERM saves done), spec.suspend, a spec that cannot be used, a
ServiceAccount the run may not use, a namesake's objects still being deleted, the backoff after a refusal. Each is
one function in GATES, so a new reason to wait is one more.

The resume point of every attempt but the first is the operator's (`resume_point`): the newest checkpoint it
validated, never behind one it accepted, and never spec.resume's `never` again.

A refusal (of an attempt's objects, of the evaluation's Job) is recorded by `retry`, so that each try waits
longer than the last until the spec changes; `backoff` is that wait, for whichever step creates.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from wmtp import contract
from wmtp.config import run_root
from wmtp_operator import pods as podstat
from wmtp_operator import render
from wmtp_operator.plan import Action, Create, Decision, Event, PatchRun, Refused, chain, say, write
from wmtp_operator.reconcile.view import View
from wmtp_operator.state import Refusal, State, definition_of, operational_of, seconds_since
from wmtp_operator.status import get_condition

Obj = Mapping[str, Any]
FOREIGN_RETRY_SECONDS = 5.0  # how soon to look again while a namesake's objects are being deleted
# How soon to look again at a ServiceAccount a run may not use: labelling or creating one is no event of the run's.
ACCOUNT_RETRY_SECONDS = 30.0


@dataclass(frozen=True, kw_only=True)
class Held(Decision):
    """The next attempt waits (after `state.ending`, or before the first): why."""

    why: str
    suspended: bool = False  # spec.suspend holds it


@dataclass(frozen=True, kw_only=True)
class Created(Decision):
    """Attempt `state.attempt` was created (after `state.previous`), resuming from `resume`."""

    resume: str


@dataclass(frozen=True, kw_only=True)
class Retry(Decision):
    """The API server refused a child: its words are the run's message until a retry, which waits longer each
    time until the spec changes (a namesake's object: until it is gone)."""

    said: str


def next_attempt(view: View, state: State) -> Held | Created:
    """The attempt after `state.ending` (or the first), created once no gate holds it."""
    ended = _wind_down(view, state)
    for gate in GATES:
        held = gate(view, ended.state)
        if held is not None:
            return chain(ended, held)
    return chain(ended, _create(view, ended.state))


def _wind_down(view: View, state: State) -> Decision:
    """The ended attempt's counts corrected (`_reclassify`) and its Jobs deleted (again, if a deletion failed)."""
    if state.ending is None:
        return Decision(state=state)
    reclassified = _reclassify(view, state)
    written = (write(reclassified),) if reclassified != state else ()
    return Decision(state=reclassified, actions=(*written, *view.deletes(state.ending.attempt)))


def _reclassify(view: View, state: State) -> State:
    """A failure whose attempt turns out to have been disrupted (a pod evicted a moment after another crashed) is a
    preemption: the counts move. The operator's own teardown never disrupts (it deletes), so its SIGTERM saves
    change nothing here."""
    ending = state.ending
    if ending is None or ending.cause != "failure" or state.restarts == 0:
        return state
    if not any(podstat.disrupted(p) for p in view.pods if render.attempt_of(p) == ending.attempt):
        return state
    return state.model_copy(
        update={
            "ending": ending.model_copy(update={"cause": "preemption"}),
            "restarts": state.restarts - 1,
            "preemptions": state.preemptions + 1,
        }
    )


def _fence(view: View, state: State) -> Held | None:
    """Any pod of the ended attempt (or an earlier one) still runs: two attempts never train at once."""
    ending = state.ending
    if ending is None:
        return None
    alive = [p for p in view.pods if render.attempt_of(p) <= ending.attempt and not _terminated(p)]
    if not alive:
        return None
    return Held(state=state, why=f"waiting for {len(alive)} pod(s) of attempt {ending.attempt} to stop")


def _suspended(view: View, state: State) -> Held | None:
    """spec.suspend: the next attempt waits until it is false again (and resumes from the accepted checkpoint)."""
    if view.run is None or not view.run.spec.suspend:
        return None
    return Held(state=state, why="set spec.suspend to false to resume", suspended=True)


def _unusable(view: View, state: State) -> Held | None:
    """No spec to create from (after the first attempt, a recipe that became unusable keeps the last ConfigMap)."""
    if view.run is not None and (state.attempt > 0 or view.files is not None):
        return None
    return Held(state=state, why=f"waiting for a valid spec: {'; '.join(view.problems)}")


def _identity(view: View, state: State) -> Held | None:
    """The ServiceAccount the spec names may not be used (`account_refused`): Valid=False, and no Job until it may."""
    refused = account_refused(view)
    if refused is None:
        return None
    reason, why = refused
    invalid = view.condition("Valid", "False", reason, why)
    return Held(state=state, why=why, conditions=(invalid,), requeue=ACCOUNT_RETRY_SECONDS)


def account_refused(view: View) -> tuple[str, str] | None:
    """Why the run's pods may not run as the ServiceAccount its spec names, as (reason, message); None when it names
    none (its own, `<run>-trainer`) or one it may: labelled wmtp.io/trainer: "true" by whoever controls it, and
    never the operator's own, labelled or not."""
    name = view.run.spec.service_account_name if view.run else None
    if view.run is None or not name:
        return None
    opted_in = f'labelled {contract.TRAINER_ACCOUNT_LABEL}: "true"'
    if view.operator_account == f"{view.run.namespace}/{name}":
        return "ServiceAccountNotAllowed", say(
            f"spec.serviceAccountName {name} is the operator's own ServiceAccount; name one {opted_in}"
        )
    if view.account is None:
        return "ServiceAccountNotFound", say(
            f"spec.serviceAccountName {name}: no such ServiceAccount in namespace {view.run.namespace}; create it "
            f"{opted_in}, or name another"
        )
    labels = (view.account.get("metadata") or {}).get("labels") or {}
    if labels.get(contract.TRAINER_ACCOUNT_LABEL) != "true":
        return "ServiceAccountNotAllowed", say(
            f"spec.serviceAccountName {name} has not opted in: a run may name only a ServiceAccount {opted_in}"
        )
    return None


def _namesake(view: View, state: State) -> Held | None:
    """An earlier WMTPRun of the same name whose objects are still being deleted: never touched, waited for."""
    if not view.foreign:
        return None
    names = ", ".join(sorted({o["metadata"]["name"] for o in view.foreign})[:5])
    why = say(f"objects of an earlier WMTPRun named {view.name} are still being deleted: {names}")
    conflict = view.condition("Applied", "False", "Conflict", why)
    return Held(state=state, why=why, conditions=(conflict,), requeue=FOREIGN_RETRY_SECONDS)


def _backing_off(view: View, state: State) -> Held | None:
    """The API server refused the attempt's objects at this generation: not again before the backoff passes."""
    waiting = backoff(view, state)
    return None if waiting is None else Held(state=state, why=waiting[1], requeue=waiting[0])


GATES: tuple[Callable[[View, State], Held | None], ...] = (
    _fence, _suspended, _unusable, _identity, _namesake, _backing_off
)  # fmt: skip


def _backoff_seconds(count: int) -> float:
    """Delay before retrying a refused child: 30 s, doubling, at most 15 min."""
    return float(min(30 * 2 ** (count - 1), 900))


def backoff(view: View, state: State) -> tuple[float, str] | None:
    """After a refusal at this generation: how long before the child may be created again, and the words saying
    so; None once it may be (the backoff passed, or the spec changed)."""
    refused = state.refused
    if refused is None or refused.generation != view.generation:
        return None
    wait = _backoff_seconds(refused.count) - seconds_since(refused.at, view.now)
    if wait <= 0:
        return None
    return wait, f"{refused.message}; retrying in {wait:.0f}s, or at once when the spec changes"


def resume_point(view: View, state: State) -> str | None:
    """Where the next attempt resumes, when the operator chooses it; None for the first attempt, which starts where
    spec.resume says. spec.resume decides the first attempt alone: every later one (after a failure, a preemption
    or a suspend) resumes from the newest, by step, of the checkpoints the operator validated as this run's — the
    accepted one (from a report or a termination message) and the one the ended attempt started from; with none,
    from a checkpoint the user named outside the run's root, else `auto`. The trainer falls back to the newest
    intact checkpoint under the run's own prefix either way, and a retry never starts over."""
    if state.attempt == 0 or view.run is None:
        return None
    started = _as_checkpoint(view, state.resume_from)
    validated = [c for c in (state.checkpoint, started) if view.checkpoint_step(c) is not None]
    if validated:
        return max(validated, key=lambda c: view.checkpoint_step(c) or 0)
    named = started is not None and started not in contract.RESUME_KEYWORDS
    return started if named else contract.RESUME_AUTO


def _as_checkpoint(view: View, resume: str | None) -> str | None:
    """`step_N` as the URI of the run's checkpoint it names (the trainer's layout), anything else as it is."""
    found = re.fullmatch(rf"{contract.RESUME_STEP_PREFIX}([0-9]{{1,15}})", resume or "")
    if found is None or view.run is None:
        return resume
    return f"{run_root(view.run.spec.checkpoints.base_path, view.name)}/{contract.step_dir_name(int(found.group(1)))}"


def _create(view: View, state: State) -> Created:
    """The attempt's objects, resuming from `resume_point` (written to spec.resumeFrom first), then the record of
    the attempt: an operator killed in between finds the Job and recovers the attempt from it."""
    assert view.run is not None  # `_unusable` holds a run without one
    run = view.run
    actions: list[Action] = []
    chosen = resume_point(view, state)
    if chosen is not None and chosen != run.spec.resume_from:
        actions.append(PatchRun({"spec": {"resumeFrom": chosen}}))
    run = replace(run, spec=run.spec.model_copy(update={"resume_from": chosen}))
    n = state.attempt + 1
    objects = render.attempt_objects(run, view.files, n)
    if n > 1:  # what the run owns across attempts was created, and checked to be its own, with attempt 1
        objects = [obj for obj in objects if obj["kind"] in ("ConfigMap", "Job")]
    actions += [Create(obj, update=obj["kind"] == "ConfigMap") for obj in objects]
    resume = render.resume_of(run.spec)[0]
    definition = state.definition
    if not definition and view.files is not None:
        definition = definition_of(run.spec, view.files.recipe)
    created = state.model_copy(
        update={
            "attempt": n,
            "ending": None,
            "previous": state.ending,
            "resume_from": resume,
            "start_time": state.start_time or view.now,
            "applied": operational_of(run.spec),
            "definition": definition,
            "refused": None,
        }
    )
    conditions = (view.condition("SpecApplied", "True", "Current", f"attempt {n} uses generation {view.generation}"),)
    return Created(state=created, actions=(*actions, write(created)), conditions=conditions, resume=resume)


def retry(view: View, refusal: Refused, state: State) -> Retry:
    """After the API server refused a child: the refusal recorded on `state` (the last record written), so that
    the retry waits longer each time until the spec changes; a namesake's object is waited for instead."""
    previous = state.refused
    count = previous.count + 1 if previous and previous.generation == view.generation else 1
    conflict = refusal.code == 409
    said = say(
        f"the API server refused {refusal.kind} {refusal.name} ({refusal.code} {refusal.reason}): {refusal.message}"
    )
    reason = "Conflict" if conflict else "Refused"
    record = Refusal(generation=view.generation, count=count, at=view.now, reason=refusal.reason[:64], message=said)
    recorded = state.model_copy(update={"refused": None if conflict else record})
    before = get_condition(view.old.get("conditions"), "Applied")
    new = (before.get("reason"), before.get("message")) != (reason, said)
    return Retry(
        state=recorded,
        actions=() if conflict else (write(recorded),),
        events=(Event("Warning", reason, said),) if new else (),
        conditions=(view.condition("Applied", "False", reason, said),),
        requeue=FOREIGN_RETRY_SECONDS if conflict else _backoff_seconds(count),
        said=said,
    )


def _terminated(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
