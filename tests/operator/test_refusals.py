"""A plan the API server refused part-way: recorded, said once, retried after a growing backoff."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from support.reconcile_rows import (
    BEFORE,
    JUST_NOW,
    NOW,
    apply_plan,
    ending,
    state,
    state_of,
)
from wmtp_operator.plan import Observed, PatchRun, Refused
from wmtp_operator.reconcile import reconcile, refused
from wmtp_operator.state import STATE_ANNOTATION, State


def test_a_refusal_records_a_growing_backoff_and_says_what_the_api_server_said(make_run: Callable[..., Any]) -> None:
    body = make_run()
    refusal = Refused("Job", "tiny-rho1-a1", 422, "Invalid", 'Job.batch "tiny-rho1-a1" is invalid: ' + "x" * 5000)
    plan = refused(body, refusal, State(), NOW)
    assert plan.requeue_after == 30 and [e.reason for e in plan.events] == ["Refused"]
    assert plan.status["message"].startswith("the API server refused Job tiny-rho1-a1 (422 Invalid): Job.batch")
    assert len(plan.status["message"]) <= 400
    condition = next(c for c in plan.status["conditions"] if c["type"] == "Applied")
    assert (condition["status"], condition["reason"]) == ("False", "Refused")
    recorded = state_of(plan)
    again = refused({**body, "status": plan.status}, refusal, recorded, NOW)
    assert again.requeue_after == 60 and again.events == []  # the same refusal is one Event, not one per retry


INVALID_JOB = Refused("Job", "tiny-rho1-a1", 422, "Invalid", "spec.template: Required value")
REFUSED_WORDS = "the API server refused Job tiny-rho1-a1 (422 Invalid): spec.template: Required value"


def refusal(generation: int = 1, count: int = 1, at: str = JUST_NOW) -> dict[str, Any]:
    return {"generation": generation, "count": count, "at": at, "reason": "Invalid", "message": REFUSED_WORDS}


def applied(reason: str, message: str = REFUSED_WORDS) -> dict[str, Any]:
    return {"type": "Applied", "status": "False", "reason": reason, "message": message, "lastTransitionTime": BEFORE}


@dataclass
class RefusalCase:
    """The plan after the API server refused one of a pass's actions part-way (`written`: the last record that
    plan wrote before the refusal, if any)."""

    name: str
    refusal: Refused
    state: dict[str, Any] | None = None
    written: dict[str, Any] | None = None
    status: dict[str, Any] = field(default_factory=dict)
    phase: str = "Pending"  # expected
    requeue: float = 30
    count: int | None = 1  # the refusal recorded, None: nothing recorded
    restarts: int = 0  # of the record written
    events: list[str] = field(default_factory=lambda: ["Warning Refused"])
    applied: str = "False Refused"
    message: str = REFUSED_WORDS


REFUSALS = [
    RefusalCase("a refused Job: recorded, the API server's words in the status, a Warning, retried in 30s",
                INVALID_JOB),
    RefusalCase("refused again at the same generation: the wait doubles, and the same words are not a new Event",
                INVALID_JOB, state(0, refused=refusal(count=1)), status={"conditions": [applied("Refused")]},
                requeue=60, count=2, events=[]),
    RefusalCase("refused again with other words: a new Event", INVALID_JOB, state(0, refused=refusal(count=2)),
                status={"conditions": [applied("Refused", "the API server refused Job tiny-rho1-a1: other")]},
                requeue=120, count=3),
    RefusalCase("refused after the spec changed: the wait starts again", INVALID_JOB,
                state(0, refused=refusal(generation=0, count=5))),
    RefusalCase("the wait is at most 15 minutes", INVALID_JOB, state(0, refused=refusal(count=9)), requeue=900,
                count=10),
    RefusalCase("a namesake holds the name (409): nothing recorded, looked at again in 5s",
                Refused("Job", "tiny-rho1-a1", 409, "Conflict", "controlled by another uid"), requeue=5, count=None,
                events=["Warning Conflict"], applied="False Conflict", message="(409 Conflict)"),
    RefusalCase("the record the refused plan wrote is built on, not the one the pass read", INVALID_JOB,
                state(), written=state(ending=ending(), restarts=1, refused=refusal(count=3)), phase="Restarting",
                requeue=240, count=4, restarts=1),
    RefusalCase("the phase is the record's, whatever a trainer wrote", INVALID_JOB, state(ending=ending(), restarts=1),
                status={"phase": "Succeeded"}, phase="Restarting", restarts=1),
]  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS, ids=[c.name for c in REFUSALS])
def test_refusal(case: RefusalCase, make_run: Callable[..., dict[str, Any]]) -> None:
    body = make_run()
    if case.state is not None:
        body["metadata"]["annotations"] = {STATE_ANNOTATION: json.dumps(case.state)}
    body["status"] = copy.deepcopy(case.status)
    written = State.model_validate(case.written) if case.written is not None else None
    plan = refused(body, case.refusal, written, NOW)
    new = {**body["status"], **plan.status}
    assert plan.requeue_after == case.requeue
    assert [f"{e.type} {e.reason}" for e in plan.events] == case.events
    assert new["phase"] == case.phase and case.message in new["message"], new["message"]
    conditions = {c["type"]: f"{c['status']} {c['reason']}" for c in new["conditions"]}
    assert conditions["Applied"] == case.applied
    recorded = [a.state for a in plan.actions if isinstance(a, PatchRun) and a.state is not None]
    assert [(r.refused.count if r.refused else None, r.restarts) for r in recorded] == (
        [(case.count, case.restarts)] if case.count else []
    )


@pytest.mark.parametrize("case", [c for c in REFUSALS if c.count], ids=[c.name for c in REFUSALS if c.count])
def test_after_a_refusal_the_next_pass_waits_out_its_backoff(
    case: RefusalCase, make_run: Callable[..., dict[str, Any]]
) -> None:
    body = make_run()
    body["metadata"]["annotations"] = {STATE_ANNOTATION: json.dumps(case.state or state(0))}
    written = State.model_validate(case.written) if case.written is not None else None
    body, _ = apply_plan(body, Observed(), refused(body, case.refusal, written, NOW))
    again = reconcile(body, Observed(), "2026-01-02T03:04:06Z")
    assert again.actions == []
    assert again.requeue_after == case.requeue - 1 and "retrying in" in again.status["message"]
