"""Where the next attempt resumes: the resume point moves only forward, from sources the operator validated; a
resumeFrom it did not write is ignored; a report is copied, never trusted."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from support.reconcile_rows import (
    AT_1200,
    CKPT,
    NOW,
    RUNNING,
    apply_plan,
    ended,
    ending,
    job,
    job_of,
    pod,
    report,
    state,
    state_of,
)
from wmtp import contract
from wmtp.checkpoint import step_dir_name
from wmtp_operator.plan import Observed
from wmtp_operator.reconcile import reconcile
from wmtp_operator.state import STATE_ANNOTATION


def test_the_next_attempt_resumes_from_the_accepted_checkpoint_with_fallback(make_run: Callable[..., Any]) -> None:
    body = make_run(**{"metadata.annotations": {STATE_ANNOTATION: json.dumps(state(ending=ending(), **AT_1200))}})
    plan = reconcile(body, Observed(), NOW)
    args = job_of(plan)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-3:] == ["--resume", CKPT, contract.RESUME_FALLBACK_FLAG]
    assert plan.status["resumeFrom"] == CKPT and state_of(plan).resume_from == CKPT
    env = {e["name"]: e.get("value") for e in job_of(plan)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[contract.ENV_ATTEMPT] == "2"


def ckpt(step: int, run: str = "tiny-rho1") -> str:
    return f"s3://wmtp/checkpoints/{run}/{step_dir_name(step)}"


def last_words(step: int | None, checkpoint: str | None) -> dict[str, Any]:
    """A trainer pod that crashed: its termination message naming `checkpoint`, or none (SIGKILL) when None."""
    if checkpoint is None:
        return ended(137, "Error")
    return ended(1, "Error", {"reason": contract.STOP_FAILED, "step": step, "checkpoint": checkpoint})


@dataclass
class ResumeCase:
    """Attempt 1 fails; the sources that name a checkpoint, each possibly lost, stale or foreign; where attempt 2
    resumes (its --resume, always with the fallback)."""

    name: str
    reported: str | None  # status.report.latestCheckpoint of attempt 1 (None: no report, lost)
    said: str | None  # the crashed pod's termination message (None: SIGKILL, no last words)
    resume: str  # expected
    record: dict[str, Any] = field(default_factory=dict)  # the record before: its accepted checkpoint, resume
    spec: dict[str, Any] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)


RESUME_CASES = [
    ResumeCase("report and last words agree", ckpt(1000), ckpt(1000), ckpt(1000)),
    ResumeCase("report lost: the last words'", None, ckpt(1300), ckpt(1300)),
    ResumeCase("last words lost (SIGKILL): the report's", ckpt(1000), None, ckpt(1000)),
    ResumeCase("a stale report never moves the resume point back behind the last words", ckpt(1000), ckpt(1300),
               ckpt(1300)),
    ResumeCase("last words older than the report: the report's", ckpt(1300), ckpt(1000), ckpt(1300)),
    ResumeCase("an accepted checkpoint newer than both stays", ckpt(1000), ckpt(1000), ckpt(1500),
               record={"checkpoint": ckpt(1500)}),
    ResumeCase("the checkpoint the attempt started from, newer than both, stays", ckpt(1000), None, ckpt(1500),
               record={"resumeFrom": ckpt(1500)}),
    ResumeCase("spec.resume step_N the attempt started from counts as that checkpoint", None, None, ckpt(900),
               record={"resumeFrom": "step_900"}, spec={"resume": "step_900"}),
    ResumeCase("a foreign report is refused: the last words'", ckpt(9000, "other"), ckpt(1000), ckpt(1000),
               events=["Warning CheckpointRejected"]),
    ResumeCase("foreign last words are refused: the report's", ckpt(1000), "s3://evil/tiny-rho1/checkpoint_step_9",
               ckpt(1000), events=["Warning CheckpointRejected"]),
    ResumeCase("all lost after spec.resume never: auto with the fallback, never `never`", None, None, "auto",
               record={"resumeFrom": "never"}, spec={"resume": "never"}),
    ResumeCase("all lost after resuming another run's checkpoint: that one again", None, None, ckpt(500, "other"),
               record={"resumeFrom": ckpt(500, "other")}, spec={"resume": ckpt(500, "other")}),
]  # fmt: skip


@pytest.mark.parametrize("case", RESUME_CASES, ids=[c.name for c in RESUME_CASES])
def test_the_resume_point_only_moves_forward(case: ResumeCase, make_run: Callable[..., Any]) -> None:
    body = make_run(**{f"spec.{key}": value for key, value in case.spec.items()})
    body["metadata"]["annotations"] = {STATE_ANNOTATION: json.dumps(state(**case.record))}
    body["status"] = {"attempt": 1, "phase": "Running"}
    if case.reported is not None:
        body["status"]["report"] = report(checkpoint=case.reported)
    crashed = pod(1, 1, "Failed", **last_words(1300, case.said))
    # Pass 1: the attempt ends; its other pod still saves (the fence), and the stale report is still there.
    first = reconcile(body, Observed([job(1)], [pod(1, 0), crashed]), NOW)
    assert [f"{e.type} {e.reason}" for e in first.events] == ["Warning Restarting", *case.events]
    body, observed = apply_plan(body, Observed([job(1)], [pod(1, 0), crashed]), first)
    # Pass 2, once that pod is gone: attempt 2, from the newest checkpoint any validated source named.
    second = reconcile(body, Observed(observed.jobs, [crashed]), "2026-01-02T03:04:06Z")
    args = job_of(second)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-3:] == ["--resume", case.resume, contract.RESUME_FALLBACK_FLAG]
    assert {**body["status"], **second.status}["resumeFrom"] == case.resume == state_of(second).resume_from


def test_the_operators_own_resume_from_patch_is_not_a_user_edit(make_run: Callable[..., Any]) -> None:
    body = make_run(**{"metadata.annotations": {STATE_ANNOTATION: json.dumps(state(ending=ending(), **AT_1200))}})
    first = reconcile(body, Observed(), NOW)
    body, observed = apply_plan(body, Observed(), first)
    body["metadata"]["generation"] += 1  # the API server bumps it for the resumeFrom patch
    again = reconcile(body, Observed(observed.jobs, [pod(2, 0), pod(2, 1)]), NOW)
    conditions = {c["type"]: c for c in again.status["conditions"]}
    assert conditions["SpecApplied"]["status"] == "True"
    assert again.status["observedGeneration"] == body["metadata"]["generation"]


FOREIGN_CKPT = f"s3://wmtp/checkpoints/someone-else/{step_dir_name(5000)}"


@pytest.mark.parametrize(
    ("recorded", "resume"),
    [
        (None, ["--resume", "auto"]),
        (state(ending=ending(), **AT_1200), ["--resume", CKPT, contract.RESUME_FALLBACK_FLAG]),
    ],
    ids=["first attempt", "after an accepted checkpoint"],
)
def test_a_resume_from_the_operator_did_not_write_is_ignored_with_a_warning(
    recorded: dict[str, Any] | None, resume: list[str], make_run: Callable[..., Any]
) -> None:
    body = make_run(**{"spec.resumeFrom": FOREIGN_CKPT})  # no admission policy stopped it
    if recorded is not None:
        body["metadata"]["annotations"] = {STATE_ANNOTATION: json.dumps(recorded)}
    plan = reconcile(body, Observed(), NOW)
    args = job_of(plan)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-len(resume) :] == resume and FOREIGN_CKPT not in args
    valid = next(c for c in plan.status["conditions"] if c["type"] == "Valid")
    assert valid["status"] == "False" and "was not written by the operator and is ignored" in valid["message"]
    assert ("Warning", "InvalidSpec") in [(e.type, e.reason) for e in plan.events]


def test_a_report_is_copied_and_its_checkpoint_kept_where_trainers_cannot_write(make_run: Callable[..., Any]) -> None:
    body = make_run(**{"metadata.annotations": {STATE_ANNOTATION: json.dumps(state())}})
    body["status"] = {"phase": "Running", "report": report()}
    plan = reconcile(body, Observed([job(1)], RUNNING), NOW)
    assert {key: plan.status[key] for key in ("step", "loss", "latestCheckpoint", "progress")} == {
        "step": 1200, "loss": 2.25, "latestCheckpoint": CKPT, "progress": "100% (1200/60)"
    }  # fmt: skip
    assert state_of(plan).checkpoint == CKPT
    # A trainer rewriting latestCheckpoint (or anything else) changes nothing the operator decides on.
    body["metadata"]["annotations"] = {STATE_ANNOTATION: state_of(plan).dump()}
    body["status"] = {**body["status"], **plan.status, "latestCheckpoint": "s3://evil/x", "restarts": 99}
    again = reconcile(body, Observed([job(1)], RUNNING), NOW)
    assert again.status["latestCheckpoint"] == CKPT and again.status["restarts"] == 0
