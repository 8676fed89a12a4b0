"""Rows of the reconcile table tests: the run's record and what the cluster shows (Jobs, pods, accounts, the
evaluation), as a pass reads them, and what a plan did once applied."""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

from wmtp import contract
from wmtp.checkpoint import step_dir_name
from wmtp_operator import kueue, render
from wmtp_operator.plan import Create, Delete, Observed, PatchRun, Plan
from wmtp_operator.spec import Defaults
from wmtp_operator.state import STATE_ANNOTATION, State

NOW = "2026-01-02T03:04:05Z"
BEFORE = "2026-01-01T00:00:00Z"
JUST_NOW = "2026-01-02T03:04:00Z"  # 5 s before NOW
UID = "0d2c1b7e-run-uid"
CKPT = f"s3://wmtp/checkpoints/tiny-rho1/{step_dir_name(1000)}"
LATER_CKPT = f"s3://wmtp/checkpoints/tiny-rho1/{step_dir_name(1200)}"


def _meta(name: str, attempt: int, uid: str = UID, **extra: Any) -> dict[str, Any]:
    labels = {render.ATTEMPT_LABEL: str(attempt), render.RUN_UID_LABEL: uid}
    return {"name": name, "uid": f"uid-{name}", "labels": labels, "creationTimestamp": BEFORE, **extra}


def job(
    attempt: int, condition: str | None = None, deleting: bool = False, uid: str = UID, created: str = JUST_NOW
) -> dict:
    meta = _meta(f"tiny-rho1-a{attempt}", attempt, uid, creationTimestamp=created)
    meta["ownerReferences"] = [{"kind": "WMTPRun", "uid": uid, "controller": True}]
    if deleting:
        meta["deletionTimestamp"] = BEFORE
    conditions = [{"type": condition, "status": "True", "reason": "BackoffLimitExceeded"}] if condition else []
    return {"metadata": meta, "spec": {"completions": 2}, "status": {"conditions": conditions}}


QUEUE = "team-a-gpus"


def queued_job(attempt: int = 1, admitted: str | None = None, created: str = JUST_NOW, synced: bool = True) -> dict:
    """An attempt's Job that Kueue manages: suspended by its webhook until admitted (`admitted`: when), then
    resumed, with the Job controller's Suspended=False and startTime once it has `synced`."""
    found = job(attempt, created=created)
    found["metadata"]["labels"][kueue.QUEUE_LABEL] = QUEUE
    found["spec"].update(suspend=admitted is None, parallelism=2)
    resumed = admitted is not None and synced
    found["status"]["conditions"] = [
        {"type": "Suspended", "status": "False" if resumed else "True", "reason": "JobResumed" if resumed else
         "JobSuspended", "message": "Job resumed" if resumed else "Job suspended", "lastTransitionTime": admitted
         if resumed else created}
    ]  # fmt: skip
    if resumed:
        found["status"]["startTime"] = admitted
    return found


def pod(
    attempt: int, index: int, phase: str = "Running", deleting: bool = False, uid: str = UID, **status: Any
) -> dict:
    meta = _meta(f"tiny-rho1-a{attempt}-{index}-x", attempt, uid)
    if deleting:
        meta["deletionTimestamp"] = BEFORE
    return {"metadata": meta, "status": {"phase": phase, **status}}


PULLING = {"initContainerStatuses": [{"name": "pull", "state": {"running": {}}}]}
PULLED = {"initContainerStatuses": [{"name": "pull", "state": {"terminated": {"exitCode": 0}}}]}


def ended(code: int, reason: str = "Error", message: dict[str, Any] | None = None) -> dict[str, Any]:
    terminated: dict[str, Any] = {"exitCode": code, "reason": reason}
    if message is not None:
        terminated["message"] = json.dumps(message)
    return {"containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]}


def waiting(reason: str, message: str = "", container: str = "trainer") -> dict[str, Any]:
    return {"containerStatuses": [{"name": container, "state": {"waiting": {"reason": reason, "message": message}}}]}


EVAL = {"tasks": ["humaneval"], "k": [1]}
EVAL_JOB = "tiny-rho1-eval"
RESULTS = {"tasks": {"humaneval": {"problems": 4, "pass@1": 0.25}},
           "speed": {"speedup": 1.8, "mean_accepted": 2.5, "identical": True}, "mlflow_run_id": "0123abcd"}  # fmt: skip
EVAL_WORDS = {"reason": "Succeeded", "exitCode": 0, "message": "humaneval pass@1 0.250", "eval": RESULTS}
EVAL_FAILED_WORDS = {"reason": "Failed", "exitCode": 2, "message": "--dataset mbpp=URI is needed"}


def eval_job(condition: str | None = None, reason: str = "DeadlineExceeded") -> dict:
    meta = {"name": EVAL_JOB, "uid": "uid-eval", "labels": {render.RUN_UID_LABEL: UID, "wmtp.io/component": "eval"},
            "ownerReferences": [{"kind": "WMTPRun", "uid": UID, "controller": True}],
            "creationTimestamp": BEFORE}  # fmt: skip
    conditions = [{"type": condition, "status": "True", "reason": reason, "message": "too long"}] if condition else []
    return {"metadata": meta, "spec": {"completions": 1}, "status": {"conditions": conditions}}


def eval_pod(phase: str = "Running", words: dict[str, Any] | None = None, code: int = 0, **status: Any) -> dict:
    meta = {"name": f"{EVAL_JOB}-x", "uid": "uid-eval-pod", "creationTimestamp": BEFORE,
            "labels": {render.RUN_UID_LABEL: UID, "wmtp.io/component": "eval"}}  # fmt: skip
    if phase in ("Succeeded", "Failed"):
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
        if words is not None:
            terminated["message"] = json.dumps(words)
        status = {"containerStatuses": [{"name": "eval", "state": {"terminated": terminated}}], **status}
    return {"metadata": meta, "status": {"phase": phase, **status}}


def evaluated(phase: str = "Running", **extra: Any) -> dict[str, Any]:
    """The state of a run whose training succeeded and whose evaluation is recorded as `phase`."""
    record = {"phase": phase, "job": EVAL_JOB, "startTime": BEFORE, **extra}
    return state(final="Succeeded", message="attempt 1 succeeded", completionTime=BEFORE, evaluation=record)


def disrupted(reason: str = "PreemptionByScheduler") -> dict[str, Any]:
    return {"conditions": [{"type": "DisruptionTarget", "status": "True", "reason": reason, "message": "by x"}]}


UNSCHEDULABLE = {
    "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes: Insufficient gpu"}
    ]
}
PREEMPTED_WORDS = {"reason": contract.STOP_PREEMPTED, "step": 1300, "checkpoint": LATER_CKPT}


def forged(type_: str, status: str = "True") -> dict[str, Any]:
    """A condition a trainer wrote into its run's status."""
    return {"type": type_, "status": status, "reason": "Forged", "message": "a trainer's", "lastTransitionTime": BEFORE}


def account(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "team-a", "labels": labels}}


OPTED_IN = {"wmtp.io/trainer": "true"}
OPERATOR_ACCOUNT = "wmtp-operator"
DEFAULTS = Defaults(operator_account=f"team-a/{OPERATOR_ACCOUNT}")  # the chart's WMTP_OPERATOR_SERVICE_ACCOUNT


def state(attempt: int = 1, **extra: Any) -> dict[str, Any]:
    return {"attempt": attempt, "startTime": BEFORE, **extra}


def ending(attempt: int = 1, cause: str = "failure", reason: str = "Error") -> dict[str, Any]:
    return {"attempt": attempt, "cause": cause, "reason": reason, "message": f"pod tiny-rho1-a{attempt}-1-x {reason}"}


def report(attempt: int = 1, step: int = 1200, checkpoint: str | None = CKPT, **extra: Any) -> dict[str, Any]:
    return {"attempt": attempt, "step": step, "loss": 2.25, "latestCheckpoint": checkpoint, **extra}


# A restart as the record and the cluster show it: attempt 1 ended at ENDED, attempt 2's Job was created 3 s later,
# its trainers started 17 and 20 s after that, and rank 0 finished its first step 18.5 s later still.
ENDED, A2_CREATED, A2_STARTED = "2026-01-02T03:03:00Z", "2026-01-02T03:03:03Z", "2026-01-02T03:03:23Z"
FIRST_STEP = {"firstStepAt": "2026-01-02T03:03:41.5Z", "loadSeconds": 15.0, "firstStepSeconds": 2.5}


def trainer_started(at: str) -> dict[str, Any]:
    return {"containerStatuses": [{"name": "trainer", "state": {"running": {"startedAt": at}}}]}


RESTARTED = state(2, restarts=1, previous={**ending(), "at": ENDED})
A2_RUNNING = [pod(2, 0, **trainer_started("2026-01-02T03:03:20Z")), pod(2, 1, **trainer_started(A2_STARTED))]


CHILDREN = ["create Service tiny-rho1", "create NetworkPolicy tiny-rho1", "create ServiceAccount tiny-rho1-trainer",
            "create Role tiny-rho1-trainer", "create RoleBinding tiny-rho1-trainer"]  # fmt: skip
CREATE_A1 = ["create ConfigMap tiny-rho1-config", *CHILDREN, "create Job tiny-rho1-a1", "patch state"]
CREATE_A2 = ["create ConfigMap tiny-rho1-config", "create Job tiny-rho1-a2", "patch state"]
RESUME = f"patch resumeFrom={CKPT}"
AUTO = f"patch resumeFrom={contract.RESUME_AUTO}"  # a retry with no accepted checkpoint: never spec.resume's `never`
AT_1200 = {"checkpoint": CKPT}
RUNNING = [pod(1, 0), pod(1, 1)]


def summary(action: Any) -> str:
    if isinstance(action, Create):
        return f"create {action.obj['kind']} {action.obj['metadata']['name']}"
    if isinstance(action, Delete):
        return f"delete {action.kind} {action.name}"
    assert isinstance(action, PatchRun)
    if action.state is not None:
        return "patch state"
    return f"patch resumeFrom={action.patch['spec']['resumeFrom']}"


def job_of(plan: Plan) -> dict[str, Any]:
    return next(a.obj for a in plan.actions if isinstance(a, Create) and a.obj["kind"] == "Job")


def state_of(plan: Plan) -> State:
    written = [a.state for a in plan.actions if isinstance(a, PatchRun) and a.state is not None]
    return written[-1]


def apply_plan(body: dict[str, Any], observed: Observed, plan: Plan) -> tuple[dict[str, Any], Observed]:
    """What the cluster looks like after the plan is applied (created Jobs exist, deleted ones are gone)."""
    body = copy.deepcopy(body)
    body["status"] = {**(body.get("status") or {}), **plan.status}
    jobs = {j["metadata"]["name"]: j for j in observed.jobs}
    for action in plan.actions:
        if isinstance(action, PatchRun) and action.state is not None:
            body["metadata"]["annotations"] = {STATE_ANNOTATION: action.state.dump()}
        elif isinstance(action, PatchRun):
            body["spec"] = {**body["spec"], **action.patch["spec"]}
        elif isinstance(action, Delete):
            jobs.pop(action.name, None)
        elif action.obj["kind"] == "Job":
            created = copy.deepcopy(action.obj)
            created["metadata"]["creationTimestamp"] = NOW
            jobs[created["metadata"]["name"]] = created
    return body, dataclasses.replace(observed, jobs=list(jobs.values()))
