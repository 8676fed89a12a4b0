"""The run's state machine, pure: (WMTPRun body, observed children, now) → actions, status, events.

An attempt is one Indexed Job. Pending → Pulling → Running → Succeeded. When the attempt stops (a pod failed, was
evicted or deleted, the Job failed or vanished, the pods never started), its ending is recorded in the run's
state annotation (restarts + 1, or preemptions + 1 for an eviction, a disruption or a SIGTERM save), its Job is
deleted, and once all its pods are gone (their SIGTERM saves included: the fence) the next attempt starts from
the latest accepted checkpoint. Past backoffLimit, or for a reason no retry can fix, the run fails.
After a success, `evaluation` decides the evaluation spec.eval asks for (phase Evaluating until it ends).

A pass is a short sequence of steps, each a pure function that takes the state record the previous one left and
returns a typed decision (`plan.Decision`): `view` reads the run, `attempt` judges the current attempt, `launch`
the next one, `evaluation` the evaluation; `outcome` folds the decisions into the status and Events. Everything
is derived from the state annotation and what is observed now, so running it twice, or after an operator
restart, changes nothing more. Callers apply the actions in order and patch the status last.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import reduce
from typing import Any

from wmtp_operator.plan import Action, Decision, Delete, Observed, PatchRun, Plan, Refused, chain, write
from wmtp_operator.reconcile import attempt, evaluation, launch, outcome
from wmtp_operator.reconcile.evaluation import EvalDecision
from wmtp_operator.reconcile.view import View, view_of
from wmtp_operator.spec import Defaults
from wmtp_operator.state import State
from wmtp_operator.status import Reported

Obj = Mapping[str, Any]


def reconcile(body: Obj, observed: Observed, now: str, defaults: Defaults = Defaults()) -> Plan:
    """One pass. Which steps run follows from the record alone, never from what an earlier pass did; each decides
    from the record the step before it left, and the decisions fold into one plan."""
    view = view_of(body, observed, now, defaults)
    accepted = attempt.accept_report(view, attempt.recover(view))  # the record, and rank 0's word on its attempt
    decisions: list[Decision] = [accepted]
    state = accepted.state
    if state.final is None and state.attempt and state.ending is None:
        decisions.append(attempt.watch(view, state))  # it goes on, it ended, or the run is over
        state = decisions[-1].state
    if state.final == "Succeeded" and view.run is not None:
        evaluated = evaluation.decide(view, view.run, state)
        decisions += [evaluated] if evaluated else []
    elif state.final is None and (state.ending is not None or state.attempt == 0):
        decisions.append(launch.next_attempt(view, state))
    return _plan(view, reduce(chain, decisions), accepted.report)


def refused(body: Obj, refusal: Refused, written: State | None, now: str) -> Plan:
    """The plan after the API server refused an action of a pass's plan part-way (`written`: the last state record
    that plan wrote, if any): the refusal recorded, its words in the status and a Warning Event. What the
    children show does not matter here, so none are read."""
    view = view_of(body, Observed(), now)
    retry = launch.retry(view, refusal, written or view.recorded)
    status = outcome.status_of(view, retry, None)
    return Plan(list(retry.actions), _changes(view.old, status), list(retry.events), retry.requeue)


def _plan(view: View, decided: Decision, report: Reported | None) -> Plan:
    """The decisions as one plan: a Job deleted once, the record written if it changed (by the steps, before what
    it announces, or else last), the status fields that change."""
    actions = _once(decided.actions)
    state = decided.state
    if state != view.recorded and not any(isinstance(a, PatchRun) and a.state == state for a in actions):
        actions.append(write(state))
    new = outcome.status_of(view, decided, report)
    evaluating = isinstance(decided, EvalDecision) and decided.pending
    final = state.final is not None and not evaluating
    return Plan(actions, _changes(view.old, new), outcome.events_of(view, new, decided), decided.requeue, final)


def _once(actions: Sequence[Action]) -> list[Action]:
    """The actions without a second deletion of the same Job: steps delete the Jobs up to an attempt, and one
    pass may run two of them (an attempt ends; the next one's wind-down, which also redoes a failed deletion)."""
    deleted: set[str] = set()
    kept: list[Action] = []
    for action in actions:
        if isinstance(action, Delete):
            if action.name in deleted:
                continue
            deleted.add(action.name)
        kept.append(action)
    return kept


def _changes(old: Obj, new: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in new.items() if old.get(key) != value}
