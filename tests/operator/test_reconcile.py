"""The run's state machine, one table row per transition, plus idempotence when a plan is applied and re-run."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from wmtp.checkpoint import step_dir_name
from wmtp_operator import render
from wmtp_operator.reconcile import Create, Delete, Observed, PatchSpec, Plan, reconcile

NOW = "2026-01-02T03:04:05Z"
BEFORE = "2026-01-01T00:00:00Z"
CKPT = f"s3://wmtp/checkpoints/tiny-rho1/{step_dir_name(1000)}"


def job(attempt: int, condition: str | None = None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"tiny-rho1-a{attempt}", "labels": {render.ATTEMPT_LABEL: str(attempt)}}
    if deleting:
        meta["deletionTimestamp"] = BEFORE
    conditions = [{"type": condition, "status": "True", "reason": "BackoffLimitExceeded"}] if condition else []
    return {"metadata": meta, "status": {"conditions": conditions}}


def pod(attempt: int, index: int, phase: str = "Running", **status: Any) -> dict[str, Any]:
    deleting = status.pop("deleting", False)
    meta: dict[str, Any] = {"name": f"tiny-rho1-a{attempt}-{index}-x", "labels": {render.ATTEMPT_LABEL: str(attempt)}}
    if deleting:
        meta["deletionTimestamp"] = BEFORE
    return {"metadata": meta, "status": {"phase": phase, **status}}


PULLING = {"initContainerStatuses": [{"name": "pull", "state": {"running": {}}}]}


def crashed(code: int, reason: str) -> dict[str, Any]:
    return {"containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": code, "reason": reason}}}]}


def running(attempt: int = 1, restarts: int = 0, phase: str = "Running", **extra: Any) -> dict[str, Any]:
    return {"phase": phase, "attempt": attempt, "restarts": restarts, "startTime": BEFORE, **extra}


@dataclass
class Case:
    name: str
    status: dict[str, Any] | None
    jobs: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)
    phase: str | None = None  # expected; None: unchanged
    attempt: int | None = None
    restarts: int | None = None
    actions: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    message: str = ""


CREATE_A1 = ["create ConfigMap tiny-rho1-config", "create Service tiny-rho1", "create Job tiny-rho1-a1"]
CREATE_A2 = ["create ConfigMap tiny-rho1-config", "create Service tiny-rho1", "create Job tiny-rho1-a2"]
RESUME = f'patch {{"spec": {{"resumeFrom": "{CKPT}"}}}}'
FAILED_AT_1200 = {"step": 1200, "latestCheckpoint": CKPT}

RESTART = ["Warning Restarting"]
CASES = [
    Case("new run creates attempt 1", None, phase="Pending", attempt=1, restarts=0, actions=CREATE_A1,
         events=["Normal Pending"]),
    Case("attempt created, no pods yet: nothing to do", running(phase="Pending"), [job(1)]),
    Case("init containers pulling", running(phase="Pending"), [job(1)], [pod(1, 0, "Pending", **PULLING),
         pod(1, 1, "Pending", **PULLING)], phase="Pulling", events=["Normal Pulling"], message="2/2 pods pulling"),
    Case("one pod trains, one still pulls", running(phase="Pulling"), [job(1)],
         [pod(1, 0), pod(1, 1, "Pending", **PULLING)], phase="Pulling"),
    Case("all pods running", running(phase="Pulling"), [job(1)], [pod(1, 0), pod(1, 1)], phase="Running",
         events=["Normal Running"], message="2/2 pods running"),
    Case("pod of attempt 1 fails at step 1200 with checkpoint_step_00001000 committed",
         running(**FAILED_AT_1200), [job(1)], [pod(1, 0), pod(1, 1, "Failed", **crashed(1, "Error"))],
         phase="Restarting", attempt=2, restarts=1, actions=[RESUME, "delete Job tiny-rho1-a1", *CREATE_A2],
         events=RESTART, message="container trainer Error (exit code 1); restart 1/3 resumes from s3://"),
    Case("evicted pod", running(**FAILED_AT_1200), [job(1)],
         [pod(1, 0, "Failed", reason="Evicted", message="low on memory"), pod(1, 1)], phase="Restarting",
         attempt=2, restarts=1, actions=[RESUME, "delete Job tiny-rho1-a1", *CREATE_A2], events=RESTART,
         message="Evicted: low on memory"),
    Case("pod deleted", running(**FAILED_AT_1200), [job(1)], [pod(1, 0, deleting=True), pod(1, 1)],
         phase="Restarting", attempt=2, actions=[RESUME, "delete Job tiny-rho1-a1", *CREATE_A2], events=RESTART,
         message="was deleted"),
    Case("pod disrupted (preempted)", running(), [job(1)],
         [pod(1, 0, conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}])],
         phase="Restarting", attempt=2, actions=["delete Job tiny-rho1-a1", *CREATE_A2], events=RESTART,
         message="PreemptionByScheduler"),
    Case("Job failed, no checkpoint reported yet: resume as specified", running(), [job(1, "Failed")],
         [pod(1, 0), pod(1, 1)], phase="Restarting", attempt=2, restarts=1,
         actions=["delete Job tiny-rho1-a1", *CREATE_A2], events=RESTART,
         message="BackoffLimitExceeded; restart 1/3 resumes from auto"),
    Case("Job already deleted", running(**FAILED_AT_1200), [], [pod(1, 0), pod(1, 1)], phase="Restarting",
         attempt=2, restarts=1, actions=[RESUME, *CREATE_A2], events=RESTART, message="Job tiny-rho1-a1 was deleted"),
    Case("Job being deleted", running(**FAILED_AT_1200), [job(1, deleting=True)], [pod(1, 0), pod(1, 1)],
         phase="Restarting", attempt=2, actions=[RESUME, *CREATE_A2], events=RESTART),
    Case("backoff exhausted: Failed with the pod's reason, the failed Job kept for its logs",
         running(attempt=4, restarts=3), [job(4)], [pod(4, 0), pod(4, 1, "Failed", **crashed(137, "OOMKilled"))],
         phase="Failed", attempt=4, restarts=3, events=["Warning Failed"],
         message="container trainer OOMKilled (exit code 137); backoffLimit 3 reached"),
    Case("backoffLimit 0 fails at once", running(), [job(1)], [pod(1, 0, "Failed")], spec={"backoffLimit": 0},
         phase="Failed", restarts=0, events=["Warning Failed"], message="pod tiny-rho1-a1-0-x failed"),
    Case("all pods succeeded", running(), [job(1)], [pod(1, 0, "Succeeded"), pod(1, 1, "Succeeded")],
         phase="Succeeded", events=["Normal Succeeded"], message="attempt 1 succeeded"),
    Case("Job complete", running(), [job(1, "Complete")], [], phase="Succeeded", events=["Normal Succeeded"]),
    Case("a finished run is left alone", running(phase="Succeeded"), [], []),
    Case("suspend deletes the attempt and keeps the rest", running(), [job(1)], [pod(1, 0), pod(1, 1)],
         spec={"suspend": True}, phase="Suspended", actions=["delete Job tiny-rho1-a1"], events=["Normal Suspended"]),
    Case("suspended run with its Job gone stays put", running(phase="Suspended"), [], [pod(1, 0, deleting=True)],
         spec={"suspend": True}),
    Case("unsuspend resumes from the latest checkpoint as a new attempt, not a restart",
         running(phase="Suspended", **FAILED_AT_1200), [], [], phase="Pending", attempt=2, restarts=0,
         actions=[RESUME, *CREATE_A2], events=["Normal Pending"]),
    Case("Restarting lasts until the new attempt's pods show up", running(2, 1, "Restarting"), [job(2)], []),
    Case("an attempt that fails while still Restarting restarts again, with its own event",
         running(2, 1, "Restarting"), [job(2)], [pod(2, 0, "Failed")], phase="Restarting", attempt=3, restarts=2,
         actions=["delete Job tiny-rho1-a2", "create ConfigMap tiny-rho1-config", "create Service tiny-rho1",
                  "create Job tiny-rho1-a3"], events=RESTART, message="attempt 2 failed"),
    Case("Restarting ends when the new attempt runs", running(2, 1, "Restarting"), [job(2)], [pod(2, 0), pod(2, 1)],
         phase="Running", events=["Normal Running"]),
    Case("a leftover Job of an earlier attempt is deleted; its failed pods are ignored", running(2, 1),
         [job(1), job(2)], [pod(1, 0, "Failed"), pod(2, 0), pod(2, 1)], actions=["delete Job tiny-rho1-a1"]),
    Case("operator restarted after creating attempt 2 but before saving the status: redo, same result",
         running(**FAILED_AT_1200), [job(2)], [pod(1, 0, "Failed"), pod(1, 1)], phase="Restarting", attempt=2,
         restarts=1, actions=[RESUME, *CREATE_A2], events=RESTART),
]  # fmt: skip


def _summary(action: Any) -> str:
    if isinstance(action, Create):
        return f"create {action.obj['kind']} {action.obj['metadata']['name']}"
    if isinstance(action, Delete):
        return f"delete {action.kind} {action.name}"
    assert isinstance(action, PatchSpec)
    return f"patch {json.dumps(action.patch)}"


def _body(make_run: Callable[..., dict[str, Any]], case: Case) -> dict[str, Any]:
    body = make_run(**{f"spec.{key}": value for key, value in case.spec.items()})
    if case.status is not None:
        body["status"] = case.status
    return body


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_transition(case: Case, make_run: Callable[..., dict[str, Any]]) -> None:
    body = _body(make_run, case)
    plan = reconcile(body, Observed(case.jobs, case.pods), NOW)
    old = body.get("status") or {}
    new = {**old, **plan.status}
    assert [_summary(a) for a in plan.actions] == case.actions
    assert [f"{e.type} {e.reason}" for e in plan.events] == case.events
    assert new.get("phase") == (case.phase or old.get("phase"))
    if case.attempt is not None:
        assert new["attempt"] == case.attempt
    if case.restarts is not None:
        assert new["restarts"] == case.restarts
    assert case.message in new.get("message", "")
    if case.phase is None and not case.actions:
        assert set(plan.status) <= {"message", "conditions", "observedGeneration", "maxSteps", "resumeFrom"}


def _job_of(plan: Plan) -> dict[str, Any]:
    return next(a.obj for a in plan.actions if isinstance(a, Create) and a.obj["kind"] == "Job")


def test_the_next_attempt_resumes_from_the_patched_checkpoint(make_run: Callable[..., dict[str, Any]]) -> None:
    body = make_run()
    body["status"] = running(**FAILED_AT_1200)
    plan = reconcile(body, Observed([job(1)], [pod(1, 0, "Failed")]), NOW)
    args = _job_of(plan)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-2:] == ["--resume", CKPT]
    assert plan.status["resumeFrom"] == CKPT


def test_status_fields_the_trainer_owns_are_never_written(make_run: Callable[..., dict[str, Any]]) -> None:
    body = make_run()
    body["status"] = running(**FAILED_AT_1200, loss=1.5)
    plan = reconcile(body, Observed([job(1)], [pod(1, 0, "Failed")]), NOW)
    assert not {"step", "loss", "latestCheckpoint"} & set(plan.status)


def _apply(body: dict[str, Any], observed: Observed, plan: Plan) -> tuple[dict[str, Any], Observed]:
    """What the cluster looks like after the plan is applied (created Jobs exist, deleted ones are gone)."""
    body = {**body, "status": {**(body.get("status") or {}), **plan.status}}
    jobs = {j["metadata"]["name"]: j for j in observed.jobs}
    for action in plan.actions:
        if isinstance(action, PatchSpec):
            body["spec"] = {**body["spec"], **action.patch["spec"]}
        elif isinstance(action, Delete):
            jobs.pop(action.name, None)
        elif action.obj["kind"] == "Job":
            jobs[action.obj["metadata"]["name"]] = action.obj
    return body, Observed(list(jobs.values()), observed.pods)


@pytest.mark.parametrize("case", [c for c in CASES if c.actions], ids=[c.name for c in CASES if c.actions])
def test_reconciling_again_after_applying_changes_nothing(case: Case, make_run: Callable[..., Any]) -> None:
    body, observed = _body(make_run, case), Observed(case.jobs, case.pods)
    body, observed = _apply(body, observed, reconcile(body, observed, NOW))
    again = reconcile(body, observed, "2026-01-02T03:05:00Z")
    assert (again.actions, again.events) == ([], [])
    assert set(again.status) <= {"message", "conditions"}  # progress wording only; no new transition


def test_conditions_keep_their_transition_time_while_their_status_holds(make_run: Callable[..., Any]) -> None:
    body = make_run()
    body["status"] = running(phase="Pulling")
    first = reconcile(body, Observed([job(1)], [pod(1, 0), pod(1, 1)]), NOW)
    body["status"] = {**body["status"], **first.status}
    later = reconcile(
        body, Observed([job(1)], [pod(1, 0, "Succeeded"), pod(1, 1, "Succeeded")]), "2026-01-03T00:00:00Z"
    )
    conditions = {c["type"]: c for c in later.status["conditions"]}
    assert conditions["Valid"]["lastTransitionTime"] == NOW
    assert conditions["Progressing"]["status"] == "False"
    assert conditions["Succeeded"] == {
        "type": "Succeeded",
        "status": "True",
        "reason": "Succeeded",
        "message": "attempt 1 succeeded",
        "lastTransitionTime": "2026-01-03T00:00:00Z",
    }
    assert later.status["completionTime"] == "2026-01-03T00:00:00Z"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"spec.recipe.optim": {"lr": -1}}, "optim.lr: Input should be greater than 0"),
        ({"spec.nodes": "x"}, "spec.nodes: Input should be a valid integer"),
        (
            {"spec.recipe.checkpointing": {"checkpoint_path": "/var/tmp/ckpt"}},
            "checkpointing.checkpoint_path conflicts with spec.checkpoints.basePath; the WMTPRun owns where its "
            "checkpoints go: remove checkpointing.checkpoint_path from the recipe",
        ),
    ],
)
def test_invalid_input_sets_valid_false_creates_nothing_and_warns_once(
    overrides: dict[str, Any], message: str, make_run: Callable[..., Any]
) -> None:
    body = make_run(**overrides)
    plan = reconcile(body, Observed(), NOW)
    valid = next(c for c in plan.status["conditions"] if c["type"] == "Valid")
    assert plan.actions == []
    assert (valid["status"], valid["reason"]) == ("False", "InvalidSpec") and message in valid["message"]
    assert plan.status["phase"] == "Pending" and message in plan.status["message"]
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "InvalidSpec")]
    body["status"] = plan.status
    assert reconcile(body, Observed(), NOW) == Plan()
