"""What a restart and progress look like in the status: the restart timed from the ending to the first step,
the progress as a percentage with an ETA from rank 0's step rate."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from support.reconcile_rows import (
    A2_CREATED,
    A2_RUNNING,
    A2_STARTED,
    BEFORE,
    ENDED,
    FIRST_STEP,
    NOW,
    RESTARTED,
    RUNNING,
    ended,
    ending,
    job,
    pod,
    report,
    state,
    state_of,
)
from wmtp_operator.plan import Observed, PatchRun
from wmtp_operator.reconcile import reconcile
from wmtp_operator.state import STATE_ANNOTATION, State


@dataclass
class RestartCase:
    """Attempt 2 runs after attempt 1 ended at ENDED; rank 0 reports its first step (`first`, over FIRST_STEP) and
    what status.lastRestart then says (None: nothing timed)."""

    name: str
    first: dict[str, Any] = field(default_factory=dict)
    expected: dict[str, Any] | None = None  # lastRestart's fields that are checked
    record: dict[str, Any] = field(default_factory=dict)  # over RESTARTED
    pods: list[dict[str, Any]] = field(default_factory=lambda: A2_RUNNING)


TIMED = {"attempt": 2, "cause": "failure", "endedAt": ENDED, "trainingAt": "2026-01-02T03:03:41.500Z",
         "seconds": 41.5, "stoppingSeconds": 3.0, "schedulingSeconds": 20.0, "resumingSeconds": 18.5,
         "loadSeconds": 15.0, "firstStepSeconds": 2.5}  # fmt: skip
PREVIOUS = {"attempt": 1, "cause": "preemption", "endedAt": BEFORE, "trainingAt": BEFORE, "seconds": 9.0}
RESTART_CASES = [
    RestartCase("a failure: the whole restart and its parts", expected=TIMED),
    RestartCase("a preemption", record={"previous": {**ending(cause="preemption"), "at": ENDED}},
                expected={**TIMED, "cause": "preemption"}),
    RestartCase("one trainer has not started: the total alone (and rank 0's split within it)",
                pods=[A2_RUNNING[0], pod(2, 1, "Pending")],
                expected={"seconds": 41.5, "stoppingSeconds": 3.0, "loadSeconds": 15.0, "schedulingSeconds": None}),
    RestartCase("no first step yet", first={"firstStepAt": None}),
    RestartCase("after a suspend: no restart", record={"previous": {**ending(cause="suspend"), "at": ENDED}}),
    RestartCase("an ending recorded without its time (an older operator): not timed", record={"previous": ending()}),
    RestartCase("timed already: kept, never timed again", record={"lastRestart": {**TIMED, "seconds": 40.0}},
                expected={**TIMED, "seconds": 40.0}),
    RestartCase("the previous restart's timing is replaced", record={"lastRestart": PREVIOUS}, expected=TIMED),
    # ------------------------------------------------------------ what rank 0 may not make the operator write
    RestartCase("a first step in the future: no later than now (a pass's time is cut to the second)",
                first={"firstStepAt": "9999-12-31T23:59:59Z"},
                expected={"trainingAt": "2026-01-02T03:04:06Z", "seconds": 66.0, "resumingSeconds": 43.0}),
    RestartCase("a first step before the failure: no earlier than the trainers started",
                first={"firstStepAt": "1970-01-01T00:00:00Z"},
                expected={"trainingAt": A2_STARTED, "seconds": 23.0, "resumingSeconds": 0.0, "loadSeconds": 0.0,
                          "firstStepSeconds": 0.0}),
    RestartCase("a time without a zone is no time", first={"firstStepAt": "2026-01-02T03:03:41"}),
    RestartCase("a first step that is not a time", first={"firstStepAt": 1767322961}),
    RestartCase("a first step past the length bound", first={"firstStepAt": "2026-01-02T03:03:41Z" + " " * 64}),
    RestartCase("rank 0's split longer than the part it saw is cut to it",
                first={"loadSeconds": 5000.0, "firstStepSeconds": 5000.0},
                expected={"resumingSeconds": 18.5, "loadSeconds": 18.5, "firstStepSeconds": 0.0}),
    *(RestartCase(f"rank 0's split as {value!r}: dropped", first={"loadSeconds": value, "firstStepSeconds": value},
                  expected={"seconds": 41.5, "loadSeconds": None, "firstStepSeconds": None})
      for value in (-3.0, float("nan"), float("inf"), 1e308, 10**400, "15", True, [15])),
]  # fmt: skip


@pytest.mark.parametrize("case", RESTART_CASES, ids=[c.name for c in RESTART_CASES])
def test_a_restart_is_timed_from_the_ending_to_the_first_step_within_what_the_operator_saw(
    case: RestartCase, make_run: Callable[..., Any]
) -> None:
    record = {**RESTARTED, **case.record}
    body = make_run(**{"metadata.annotations": {STATE_ANNOTATION: json.dumps(record)}})
    first_step = report(2, 1001, None, **{**FIRST_STEP, **case.first})
    body["status"] = {"attempt": 2, "phase": "Running", "report": first_step}
    plan = reconcile(body, Observed([job(2, created=A2_CREATED)], case.pods), NOW)
    timed = plan.status.get("lastRestart", body["status"].get("lastRestart"))
    if case.expected is None:
        assert timed is None and not any(isinstance(a, PatchRun) for a in plan.actions)
        return
    assert timed is not None and {key: timed.get(key) for key in case.expected} == case.expected
    assert all(value >= 0 for key, value in timed.items() if key.endswith("econds")), timed
    recorded = State.load(body["metadata"])[0] if not plan.actions else state_of(plan)
    assert recorded.last_restart is not None and recorded.last_restart.seconds == timed["seconds"]


def test_an_ending_records_when_the_operator_saw_it(make_run: Callable[..., Any]) -> None:
    body = make_run(**{"metadata.annotations": {STATE_ANNOTATION: json.dumps(state())}})
    plan = reconcile(body, Observed([job(1)], [pod(1, 0), pod(1, 1, "Failed", **ended(1))]), NOW)
    ending = state_of(plan).ending
    assert ending is not None and ending.at == NOW


@dataclass
class ProgressCase:
    name: str
    step: Any
    rate: Any
    progress: str | None
    percent: int | None
    eta: str | None
    phase: str = "Running"
    max_steps: int = 60


PROGRESS_CASES = [
    ProgressCase("half way at 0.5 steps/s", 30, 0.5, "50% (30/60)", 50, "1m0s"),
    ProgressCase("hours left", 1, 1 / 300, "1% (1/60)", 1, "4h55m"),
    ProgressCase("rounded down: 100% only once done", 59, 2.0, "98% (59/60)", 98, "1s"),
    ProgressCase("done", 60, 2.0, "100% (60/60)", 100, "0s"),
    ProgressCase("no rate reported yet: no ETA", 30, None, "50% (30/60)", 50, None),
    ProgressCase("no step reported yet", None, None, "0% (0/60)", 0, None),
    ProgressCase("a step past maxSteps is 100%", 1200, 1.0, "100% (1200/60)", 100, "0s"),
    ProgressCase("no ETA while Restarting: the rate is the ended attempt's", 30, 0.5, "50% (30/60)", 50, None,
                 phase="Restarting"),
    # ------------------------------------------------------------ hostile rates: no ETA, never an error
    *(ProgressCase(f"a rate of {rate!r}", 30, rate, "50% (30/60)", 50, None)
      for rate in (0, -1.0, float("inf"), float("nan"), 1e7, 10**400, "fast", True)),
    ProgressCase("an estimate past a year is none", 0, 1e-9, "0% (0/60)", 0, None),
]  # fmt: skip


@pytest.mark.parametrize("case", PROGRESS_CASES, ids=[c.name for c in PROGRESS_CASES])
def test_progress_shows_a_percentage_and_an_eta_from_rank_0s_step_rate(
    case: ProgressCase, make_run: Callable[..., Any]
) -> None:
    body = make_run(**{"metadata.annotations": {STATE_ANNOTATION: json.dumps(state())}})
    body["status"] = {"attempt": 1, "phase": "Running", "report": report(step=case.step, stepsPerSecond=case.rate)}
    pods = RUNNING if case.phase == "Running" else [pod(1, 0), pod(1, 1, "Failed", **ended(1))]
    plan = reconcile(body, Observed([job(1)], pods), NOW)
    status = {**body["status"], **plan.status}
    assert status["phase"] == case.phase
    assert (status["progress"], status["progressPercent"], status.get("eta")) == (case.progress, case.percent, case.eta)
