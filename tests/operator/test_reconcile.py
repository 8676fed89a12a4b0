"""The run's state machine, one table row per transition, plus idempotence when a plan is applied and re-run."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from wmtp import contract
from wmtp.checkpoint import step_dir_name
from wmtp_operator import render
from wmtp_operator.plan import Create, Delete, Observed, PatchRun, Plan, Refused
from wmtp_operator.reconcile import reconcile, refused
from wmtp_operator.reconcile.attempt import PULL_FAILURES
from wmtp_operator.spec import Defaults
from wmtp_operator.state import STATE_ANNOTATION, State
from wmtp_operator.status import CONDITION_TYPES

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


def report(attempt: int = 1, step: int = 1200, checkpoint: str | None = CKPT) -> dict[str, Any]:
    return {"attempt": attempt, "step": step, "loss": 2.25, "latestCheckpoint": checkpoint}


@dataclass
class Case:
    name: str
    state: dict[str, Any] | None
    jobs: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)  # what the status says (trainers may write it)
    phase: str | None = None  # expected
    attempt: int | None = None
    restarts: int | None = None
    preemptions: int | None = None
    actions: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    message: str = ""
    conditions: dict[str, str] = field(default_factory=dict)  # type → "status reason"
    now: str = NOW
    account_missing: str | None = None
    account: dict[str, Any] | None = None  # the ServiceAccount spec.serviceAccountName names, as read
    recipe_text: str | None = None


CHILDREN = ["create Service tiny-rho1", "create NetworkPolicy tiny-rho1", "create ServiceAccount tiny-rho1-trainer",
            "create Role tiny-rho1-trainer", "create RoleBinding tiny-rho1-trainer"]  # fmt: skip
CREATE_A1 = ["create ConfigMap tiny-rho1-config", *CHILDREN, "create Job tiny-rho1-a1", "patch state"]
CREATE_A2 = ["create ConfigMap tiny-rho1-config", "create Job tiny-rho1-a2", "patch state"]
RESUME = f"patch resumeFrom={CKPT}"
AUTO = f"patch resumeFrom={contract.RESUME_AUTO}"  # a retry with no accepted checkpoint: never spec.resume's `never`
AT_1200 = {"checkpoint": CKPT}
RUNNING = [pod(1, 0), pod(1, 1)]

CASES = [
    # -------------------------------------------------------------- the happy path
    Case("new run creates attempt 1 with its identity", None, phase="Pending", attempt=1, restarts=0,
         actions=CREATE_A1, events=["Normal Pending"], conditions={"Applied": "True Created"}),
    Case("attempt created, no pods yet: nothing to do", state(), [job(1)], status={"phase": "Pending"},
         phase="Pending"),
    Case("init containers pulling", state(), [job(1)],
         [pod(1, 0, "Pending", **PULLING), pod(1, 1, "Pending", **PULLING)],
         status={"phase": "Pending"}, phase="Pulling", events=["Normal Pulling"], message="2/2 pods pulling"),
    Case("pulled, the trainers starting: still Pulling, never back to Pending", state(), [job(1)],
         [pod(1, 0, "Pending", **PULLED), pod(1, 1, "Pending", **PULLING)], status={"phase": "Pulling"},
         phase="Pulling", message="1/2 pods pulling models, 0/2 running"),
    Case("one trainer running, the other starting", state(), [job(1)], [pod(1, 0), pod(1, 1, "Pending", **PULLED)],
         status={"phase": "Pulling"}, phase="Pulling", message="0/2 pods pulling models, 1/2 running"),
    Case("all pods running", state(), [job(1)], RUNNING, status={"phase": "Pulling"}, phase="Running",
         events=["Normal Running"], message="2/2 pods running", conditions={"Started": "True Started"}),
    Case("all pods succeeded", state(), [job(1)], [pod(1, 0, "Succeeded"), pod(1, 1, "Succeeded")], phase="Succeeded",
         actions=["patch state"], events=["Normal Succeeded"], message="attempt 1 succeeded",
         conditions={"Succeeded": "True Succeeded", "Progressing": "False Succeeded"}),
    Case("success with the trainer's warnings: a Warning Event each and the message says so", state(), [job(1)],
         [pod(1, 0, "Succeeded", **ended(0, "Completed", {"reason": "Succeeded", "warnings": ["registration failed"]})),
          pod(1, 1, "Succeeded")], phase="Succeeded", actions=["patch state"],
         events=["Normal Succeeded", "Warning TrainerWarning"], message="succeeded with warnings: registration failed"),
    Case("Job complete", state(), [job(1, "Complete")], [], phase="Succeeded", actions=["patch state"],
         events=["Normal Succeeded"]),
    Case("a finished run is left alone", state(final="Succeeded", message="attempt 1 succeeded"), [], [],
         status={"phase": "Succeeded"}, phase="Succeeded"),
    # -------------------------------------------------------------- failures, the fence and restarts
    Case("pod fails: ending recorded first, then the Job deleted; the next attempt waits for the other pod",
         state(**AT_1200), [job(1)], [pod(1, 0), pod(1, 1, "Failed", **ended(1))], phase="Restarting", attempt=1,
         restarts=1, actions=["patch state", "delete Job tiny-rho1-a1"], events=["Warning Restarting"],
         message="container trainer Error (exit code 1); restart 1/3; waiting for 1 pod(s) of attempt 1 to stop"),
    Case("the fence holds while a pod of the ended attempt still runs its SIGTERM save",
         state(ending=ending(), restarts=1, **AT_1200), [], [pod(1, 0, deleting=True), pod(1, 1, "Failed")],
         status={"phase": "Restarting"}, phase="Restarting", attempt=1, restarts=1, message="waiting for 1 pod(s)"),
    Case("fence passed: attempt 2 resumes from the accepted checkpoint",
         state(ending=ending(), restarts=1, **AT_1200), [], [pod(1, 1, "Failed")], status={"phase": "Restarting"},
         phase="Restarting", attempt=2, restarts=1, actions=[RESUME, *CREATE_A2], events=["Warning Restarting"],
         message=f"attempt 2 resumes from {CKPT}"),
    Case("pod and Job gone at once: ended and restarted in one pass", state(**AT_1200), [], [], phase="Restarting",
         attempt=2, restarts=1, actions=["patch state", RESUME, *CREATE_A2], events=["Warning Restarting"],
         message="Job tiny-rho1-a1 was deleted"),
    Case("pod deleted by hand is a failure", state(), [job(1)], [pod(1, 0, deleting=True), pod(1, 1)],
         phase="Restarting", restarts=1, preemptions=0, actions=["patch state", "delete Job tiny-rho1-a1"],
         events=["Warning Restarting"], message="was deleted"),
    Case("Job failed, no checkpoint accepted yet", state(), [job(1, "Failed")], RUNNING, phase="Restarting",
         restarts=1, actions=["patch state", "delete Job tiny-rho1-a1"], events=["Warning Restarting"],
         message="BackoffLimitExceeded"),
    Case("backoff exhausted: Failed, the Job kept for its logs", state(restarts=3), [job(1)],
         [pod(1, 0), pod(1, 1, "Failed", **ended(137, "OOMKilled"))], phase="Failed", restarts=3,
         actions=["patch state"], events=["Warning Failed"],
         message="container trainer OOMKilled (exit code 137); backoffLimit 3 reached",
         conditions={"Failed": "True Failed"}),
    Case("the trainer's exit 2 (its input is wrong): Failed at once, no restart, the Job kept for its logs", state(),
         [job(1)], [pod(1, 0), pod(1, 1, "Failed", **ended(2, "Error", {"reason": "Failed", "exitCode": 2,
         "message": "s3://wmtp/checkpoints/tiny-rho1 already holds committed checkpoints"}))], phase="Failed",
         restarts=0, actions=["patch state"], events=["Warning Failed"],
         message="already holds committed checkpoints; the trainer says its input is wrong (exit code 2)"),
    Case("backoffLimit 0 fails at once", state(), [job(1)], [pod(1, 0, "Failed")], spec={"backoffLimit": 0},
         phase="Failed", restarts=0, actions=["patch state"], events=["Warning Failed"], message="failed"),
    Case("Restarting lasts until the new attempt's pods show up", state(2, restarts=1, previous=ending()), [job(2)],
         [], status={"phase": "Restarting"}, phase="Restarting", message="attempt 2 created after attempt 1 failed"),
    Case("Restarting ends when the new attempt runs", state(2, restarts=1, previous=ending()), [job(2)],
         [pod(2, 0), pod(2, 1)], status={"phase": "Restarting"}, phase="Running", events=["Normal Running"]),
    Case("a leftover Job of an earlier attempt is deleted; its failed pods are ignored", state(2, restarts=1),
         [job(1), job(2)], [pod(1, 0, "Failed"), pod(2, 0), pod(2, 1)], status={"phase": "Running"},
         phase="Running", actions=["delete Job tiny-rho1-a1"]),
    Case("operator killed after creating attempt 2 but before recording it: the Job says so",
         state(ending=ending(), restarts=1, **AT_1200), [job(2)], [], status={"phase": "Restarting"},
         phase="Restarting", attempt=2, restarts=1, actions=["patch state"], events=["Warning Restarting"]),
    # -------------------------------------------------------------- preemption
    Case("evicted by the kubelet: a preemption, not a restart", state(restarts=3, **AT_1200), [job(1)],
         [pod(1, 0, "Failed", reason="Evicted", message="low on memory"), pod(1, 1)], phase="Restarting",
         restarts=3, preemptions=1, actions=["patch state", "delete Job tiny-rho1-a1"], events=["Warning Restarting"],
         message="Evicted: low on memory; preemption 1 (not counted as a restart)"),
    Case("DisruptionTarget (the scheduler's preemption)", state(), [job(1)], [pod(1, 0, **disrupted()), pod(1, 1)],
         phase="Restarting", restarts=0, preemptions=1, actions=["patch state", "delete Job tiny-rho1-a1"],
         events=["Warning Restarting"], message="PreemptionByScheduler"),
    Case("the trainer's SIGTERM save (exit 75) is a preemption; its last words name a checkpoint", state(), [job(1)],
         [pod(1, 0, "Failed", **ended(75, "Error", PREEMPTED_WORDS)), pod(1, 1)], phase="Restarting", restarts=0,
         preemptions=1, actions=["patch state", "delete Job tiny-rho1-a1"], events=["Warning Restarting"],
         message="preempted"),
    Case("a crash explains the SIGTERM saves of the pods the Job controller then stopped", state(), [job(1)],
         [pod(1, 0, "Failed", deleting=True, **ended(75, "Error", PREEMPTED_WORDS)), pod(1, 1, "Failed", **ended(1))],
         phase="Restarting", restarts=1, preemptions=0,
         actions=["patch state", "delete Job tiny-rho1-a1", RESUME.replace(CKPT, LATER_CKPT), *CREATE_A2],
         events=["Warning Restarting"], message="tiny-rho1-a1-1-x container trainer Error (exit code 1)"),
    Case("a failure turns out to be a preemption while its pods stop: the counts move",
         state(ending=ending(), restarts=1), [], [pod(1, 0, deleting=True, **disrupted("EvictionByEvictionAPI"))],
         status={"phase": "Restarting"}, phase="Restarting", restarts=0, preemptions=1, actions=["patch state"]),
    Case("the operator's own teardown (exit 75 after its delete) does not make a failure a preemption",
         state(ending=ending(), restarts=1), [], [pod(1, 0, "Failed", deleting=True, **ended(75, "Error"))],
         status={"phase": "Restarting"}, phase="Restarting", restarts=1, preemptions=0,
         actions=[AUTO, *CREATE_A2], events=["Warning Restarting"]),
    # -------------------------------------------------------------- start-up
    Case("image pull back-off: reason in the message, a condition and a Warning Event", state(), [job(1)],
         [pod(1, 0, "Pending", **waiting("ImagePullBackOff", 'Back-off pulling image "x"')), pod(1, 1, "Pending")],
         status={"phase": "Pending"}, phase="Pending", events=["Warning ImagePullBackOff"],
         conditions={"Started": "False ImagePullBackOff"},
         message='0/2 pods running; pod tiny-rho1-a1-0-x: ImagePullBackOff: container trainer: Back-off pulling'),
    Case("pods not started within startupTimeout: the attempt fails with the last reason", state(),
         [job(1, created=BEFORE)], [pod(1, 0, "Pending", **UNSCHEDULABLE), pod(1, 1, "Pending")], phase="Restarting",
         restarts=1, actions=["patch state", "delete Job tiny-rho1-a1"],
         events=["Warning Restarting", "Warning Unschedulable"],
         message="pods did not start within startupTimeout (1800s): pod tiny-rho1-a1-0-x: Unschedulable"),
    *(Case(f"{reason} within imagePullDeadline: waiting, the reason and when the run fails in the status", state(),
           [job(1, created=JUST_NOW)], [pod(1, 0, "Pending", **waiting(reason, 'pulling "x"')), pod(1, 1, "Pending")],
           status={"phase": "Pending"}, phase="Pending", restarts=0, events=[f"Warning {reason}"],
           conditions={"Started": f"False {reason}"},
           message=f"{reason}: container trainer: pulling \"x\"; the run fails at 2026-01-02T03:14:00Z unless the "
                   "image can be pulled")
      for reason in sorted(PULL_FAILURES)),
    *(Case(f"{reason} past imagePullDeadline: Failed, no new attempt, no restart", state(),
           [job(1, created="2026-01-02T02:50:00Z")], [pod(1, 0, "Pending", **waiting(reason, "no")), pod(1, 1)],
           phase="Failed", restarts=0, actions=["patch state", "delete Job tiny-rho1-a1"],
           events=["Warning Failed", f"Warning {reason}"],
           message="not pulled within imagePullDeadline (600s); no retry fixes this",
           conditions={"Failed": "True Failed"})
      for reason in sorted(PULL_FAILURES)),
    Case("a pull failing past startupTimeout but within imagePullDeadline: still waiting, no restart", state(),
         [job(1, created="2026-01-02T02:58:00Z")], [pod(1, 0, "Pending", **waiting("ErrImagePull", "denied"))],
         spec={"startupTimeout": "5m"}, status={"phase": "Pending"}, phase="Pending", restarts=0,
         events=["Warning ErrImagePull"], message="the run fails at 2026-01-02T03:08:00Z"),
    Case("imagePullDeadline counts from when the pod was scheduled: its pull began there", state(),
         [job(1, created=BEFORE)], [pod(1, 0, "Pending", **waiting("ImagePullBackOff", "back-off"), conditions=[
             {"type": "PodScheduled", "status": "True", "lastTransitionTime": JUST_NOW}])],
         spec={"startupTimeout": "48h", "imagePullDeadline": "30s"}, status={"phase": "Pending"}, phase="Pending",
         events=["Warning ImagePullBackOff"], message="the run fails at 2026-01-02T03:04:30Z"),
    Case("an invalid image name fails the run at once, without a restart", state(), [job(1, created=JUST_NOW)],
         [pod(1, 0, "Pending", **waiting("InvalidImageName", "bad"))], phase="Failed", restarts=0,
         actions=["patch state", "delete Job tiny-rho1-a1"], events=["Warning Failed", "Warning InvalidImageName"],
         message="no retry fixes this"),
    Case("a missing Secret within the grace period: waiting, visible", state(), [job(1, created=JUST_NOW)],
         [pod(1, 0, "Pending", **waiting("CreateContainerConfigError", 'secret "s3" not found'))],
         status={"phase": "Pending"}, phase="Pending", events=["Warning CreateContainerConfigError"],
         conditions={"Started": "False CreateContainerConfigError"}),
    Case("a missing Secret past the grace period fails the run", state(), [job(1, created="2026-01-02T03:00:00Z")],
         [pod(1, 0, "Pending", **waiting("CreateContainerConfigError", 'secret "s3" not found'))], phase="Failed",
         restarts=0, actions=["patch state", "delete Job tiny-rho1-a1"],
         events=["Warning Failed", "Warning CreateContainerConfigError"],
         message='secret "s3" not found; still missing after 120s'),
    Case("a missing ServiceAccount past the grace period fails the run", state(),
         [job(1, created="2026-01-02T03:00:00Z")],
         [], spec={"serviceAccountName": "irsa"}, account_missing="irsa", phase="Failed",
         actions=["patch state", "delete Job tiny-rho1-a1"],
         events=["Warning Failed", "Warning ServiceAccountNotFound"],
         message="'irsa' not found"),
    Case("unschedulable: the scheduler's message", state(), [job(1, created=JUST_NOW)],
         [pod(1, 0, "Pending", **UNSCHEDULABLE), pod(1, 1, "Pending", **UNSCHEDULABLE)], status={"phase": "Pending"},
         phase="Pending", events=["Warning Unschedulable"], conditions={"Started": "False Unschedulable"},
         message="pod tiny-rho1-a1-0-x: Unschedulable: 0/3 nodes: Insufficient gpu"),
    # -------------------------------------------------------------- suspend
    Case("suspend ends the attempt without counting it", state(), [job(1)], RUNNING, spec={"suspend": True},
         phase="Suspended", restarts=0, actions=["patch state", "delete Job tiny-rho1-a1"],
         events=["Normal Suspended"]),
    Case("suspended run with its pods gone stays put", state(ending=ending(cause="suspend")), [], [],
         spec={"suspend": True}, status={"phase": "Suspended"}, phase="Suspended"),
    Case("unsuspend resumes from the accepted checkpoint as a new attempt, not a restart",
         state(ending=ending(cause="suspend"), **AT_1200), [], [], status={"phase": "Suspended"}, phase="Pending",
         attempt=2, restarts=0, actions=[RESUME, *CREATE_A2], events=["Normal Pending"]),
    # -------------------------------------------------------------- reports and trust
    Case("the current attempt's report is copied into the status", state(), [job(1)], RUNNING,
         status={"phase": "Running", "report": report()}, phase="Running", actions=["patch state"]),
    Case("a report of an older attempt changes nothing", state(2, restarts=1), [job(2)], [pod(2, 0), pod(2, 1)],
         status={"phase": "Running", "report": report(attempt=1)}, phase="Running"),
    Case("a checkpoint outside the run's root is refused with a Warning", state(), [job(1)], RUNNING,
         status={"phase": "Running", "report": report(checkpoint="s3://evil/tiny-rho1/checkpoint_step_00000001")},
         phase="Running", actions=["patch state"], events=["Warning CheckpointRejected"]),
    Case("a trainer writing phase Succeeded ends nothing: the status is rewritten", state(), [job(1)], RUNNING,
         status={"phase": "Succeeded", "restarts": 0}, phase="Running", events=["Normal Running"]),
    Case("a trainer's Succeeded=True and Failed=True on a running run are dropped, and a type not the operator's",
         state(), [job(1)], RUNNING,
         status={"phase": "Running", "conditions": [forged("Succeeded"), forged("Failed"), forged("Complete")]},
         phase="Running", conditions={"Succeeded": "False Running", "Failed": "False Running"}),
    Case("a trainer's Succeeded=True on a failed run is dropped", state(final="Failed", message="attempt 1 failed"),
         status={"phase": "Failed", "conditions": [forged("Succeeded"), forged("Failed", "False")]}, phase="Failed",
         conditions={"Succeeded": "False Failed", "Failed": "True Failed"}),
    Case("a trainer's Failed=True on a succeeded run is dropped",
         state(final="Succeeded", message="attempt 1 succeeded"), status={"phase": "Succeeded",
         "conditions": [forged("Failed"), forged("Valid", "False")]}, phase="Succeeded",
         conditions={"Succeeded": "True Succeeded", "Failed": "False Succeeded", "Valid": "True Valid"}),
    # -------------------------------------------------------------- identities: opted in, or no Job
    Case("a ServiceAccount labelled wmtp.io/trainer: \"true\" may be named (and is bound, not created)", None,
         spec={"serviceAccountName": "irsa"}, account=account("irsa", **OPTED_IN), phase="Pending", attempt=1,
         actions=[a for a in CREATE_A1 if a != "create ServiceAccount tiny-rho1-trainer"], events=["Normal Pending"],
         conditions={"Valid": "True Valid"}),
    Case("a ServiceAccount not opted in: Valid=False, no Job", None, spec={"serviceAccountName": "deployer"},
         account=account("deployer", **{"wmtp.io/trainer": "yes"}), phase="Pending", attempt=0,
         events=["Normal Pending", "Warning ServiceAccountNotAllowed"],
         conditions={"Valid": "False ServiceAccountNotAllowed"}, message="deployer has not opted in"),
    Case("the operator's own ServiceAccount, even labelled: Valid=False, no Job", None,
         spec={"serviceAccountName": OPERATOR_ACCOUNT}, account=account(OPERATOR_ACCOUNT, **OPTED_IN),
         phase="Pending", attempt=0, events=["Normal Pending", "Warning ServiceAccountNotAllowed"],
         conditions={"Valid": "False ServiceAccountNotAllowed"}, message="is the operator's own ServiceAccount"),
    Case("a ServiceAccount that does not exist: Valid=False, no Job", None, spec={"serviceAccountName": "irsa"},
         account_missing="irsa", phase="Pending", attempt=0,
         events=["Normal Pending", "Warning ServiceAccountNotFound"],
         conditions={"Valid": "False ServiceAccountNotFound"}, message="no such ServiceAccount in namespace team-a"),
    Case("the label removed between attempts: the next one waits", state(ending=ending(), restarts=1), [], [],
         spec={"serviceAccountName": "irsa"}, account=account("irsa"), status={"phase": "Restarting"},
         phase="Restarting", attempt=1, events=["Warning ServiceAccountNotAllowed"],
         conditions={"Valid": "False ServiceAccountNotAllowed"}),
    Case("...and so does the evaluation", state(final="Succeeded", message="attempt 1 succeeded"),
         spec={"eval": EVAL, "serviceAccountName": "irsa"}, account=account("irsa"), status={"phase": "Succeeded"},
         phase="Evaluating", events=["Normal Evaluating", "Warning ServiceAccountNotAllowed"],
         conditions={"Valid": "False ServiceAccountNotAllowed"}, message="irsa has not opted in"),
    # -------------------------------------------------------------- ownership and refusals
    Case("a namesake's Job still being deleted: wait, never touch it", None, [job(1, uid="old-uid", deleting=True)],
         [pod(1, 0, uid="old-uid")], phase="Pending", attempt=0, events=["Normal Pending", "Warning Conflict"],
         conditions={"Applied": "False Conflict"}, message="objects of an earlier WMTPRun named tiny-rho1"),
    Case("a refused child is not retried before its backoff", state(0, refused={"generation": 1, "count": 2,
         "at": JUST_NOW, "reason": "Invalid", "message": "the API server refused Job x (422 Invalid): no"}), [], [],
         status={"phase": "Pending"}, phase="Pending", attempt=0, message="retrying in 55s"),
    Case("a refused child is retried once the spec changed", state(0, refused={"generation": 0, "count": 5,
         "at": JUST_NOW, "reason": "Invalid", "message": "refused"}), [], [], phase="Pending", attempt=1,
         actions=CREATE_A1, events=["Normal Pending"]),
    # -------------------------------------------------------------- edits
    Case("an operational edit applies from the next attempt and the status says so", state(applied={"image": "old"}),
         [job(1)], RUNNING, status={"phase": "Running"}, phase="Running",
         conditions={"SpecApplied": "False NextAttempt"}),
    Case("a recipeRef ConfigMap edited into garbage mid-run: Valid=False, and the failure is still handled",
         state(), [job(1)], [pod(1, 0, "Failed", **ended(1)), pod(1, 1)],
         spec={"recipe": None, "recipeRef": {"name": "r"}}, recipe_text="a: [", phase="Restarting", restarts=1,
         actions=["patch state", "delete Job tiny-rho1-a1"], events=["Warning Restarting", "Warning InvalidSpec"],
         conditions={"Valid": "False InvalidSpec"}, message="not valid YAML"),
    Case("...and the next attempt keeps the ConfigMap the last valid recipe rendered",
         state(ending=ending(), restarts=1), [], [], spec={"recipe": None, "recipeRef": {"name": "r"}},
         recipe_text="a: [", status={"phase": "Restarting"}, phase="Restarting", attempt=2,
         actions=[AUTO, *CREATE_A2[1:]], events=["Warning Restarting", "Warning InvalidSpec"]),
    # -------------------------------------------------------------- evaluation (spec.eval)
    Case("training succeeded with spec.eval: the eval Job, phase Evaluating", state(), [job(1)],
         [pod(1, 0, "Succeeded"), pod(1, 1, "Succeeded")], spec={"eval": EVAL}, status={"phase": "Running"},
         phase="Evaluating", actions=["patch state", f"create Job {EVAL_JOB}", "patch state"],
         events=["Normal Evaluating"], message="attempt 1 succeeded; evaluating s3://wmtp/checkpoints/tiny-rho1/final",
         conditions={"Progressing": "True Evaluating", "Applied": "True Created"}),
    Case("spec.eval added to a succeeded run: evaluated now", state(final="Succeeded", message="attempt 1 succeeded"),
         spec={"eval": EVAL}, status={"phase": "Succeeded"}, phase="Evaluating",
         actions=[f"create Job {EVAL_JOB}", "patch state"], events=["Normal Evaluating"]),
    Case("the evaluation runs: nothing to do", evaluated(), [eval_job()], [eval_pod()], spec={"eval": EVAL},
         status={"phase": "Evaluating"}, phase="Evaluating", message=f"evaluating in Job {EVAL_JOB}"),
    Case("the evaluation's pod cannot start: the kubelet's reason", evaluated(), [eval_job()],
         [eval_pod("Pending", **waiting("ImagePullBackOff", "Back-off pulling", "eval"))], spec={"eval": EVAL},
         status={"phase": "Evaluating"}, phase="Evaluating", message="ImagePullBackOff: container eval: Back-off"),
    Case("the evaluation succeeded: its results, Evaluated", evaluated(), [eval_job("Complete")],
         [eval_pod("Succeeded", EVAL_WORDS)], spec={"eval": EVAL}, status={"phase": "Evaluating"},
         phase="Succeeded", actions=["patch state"], events=["Normal Succeeded", "Normal Evaluated"],
         message="attempt 1 succeeded; evaluation: humaneval pass@1 0.250",
         conditions={"Evaluated": "True Evaluated", "Succeeded": "True Succeeded", "Progressing": "False Succeeded"}),
    Case("the evaluation failed: Succeeded all the same, Warning EvaluationFailed", evaluated(), [eval_job("Failed")],
         [eval_pod("Failed", EVAL_FAILED_WORDS, 2)], spec={"eval": EVAL}, status={"phase": "Evaluating"},
         phase="Succeeded", actions=["patch state"], events=["Normal Succeeded", "Warning EvaluationFailed"],
         message="evaluation failed: pod tiny-rho1-eval-x container eval Error (exit code 2): --dataset mbpp=URI",
         conditions={"Evaluated": "False EvaluationFailed", "Succeeded": "True Succeeded"}),
    Case("an evaluation that succeeded without a readable message failed", evaluated(), [eval_job("Complete")],
         [eval_pod("Succeeded", None)], spec={"eval": EVAL}, status={"phase": "Evaluating"}, phase="Succeeded",
         actions=["patch state"], events=["Normal Succeeded", "Warning EvaluationFailed"],
         message="left no readable termination message", conditions={"Evaluated": "False EvaluationFailed"}),
    Case("the evaluation past its timeout (activeDeadlineSeconds)", evaluated(), [eval_job("Failed")], [],
         spec={"eval": EVAL}, status={"phase": "Evaluating"}, phase="Succeeded", actions=["patch state"],
         events=["Normal Succeeded", "Warning EvaluationFailed"],
         message=f"evaluation failed: Job {EVAL_JOB} failed: DeadlineExceeded too long"),
    Case("the evaluation's Job deleted before it ended", evaluated(), [], [], spec={"eval": EVAL},
         status={"phase": "Evaluating"}, phase="Succeeded", actions=["patch state"],
         events=["Normal Succeeded", "Warning EvaluationFailed"], message="was deleted before the evaluation ended"),
    Case("an evaluated run is left alone (its Job gone by its TTL)",
         evaluated("Succeeded", message="humaneval pass@1 0.250", completionTime=BEFORE), [], [], spec={"eval": EVAL},
         status={"phase": "Succeeded"}, phase="Succeeded", message="evaluation: humaneval pass@1 0.250",
         conditions={"Evaluated": "True Evaluated"}),
    Case("a refused eval Job is not retried before its backoff",
         state(final="Succeeded", message="attempt 1 succeeded", refused={"generation": 1, "count": 1, "at": JUST_NOW,
               "reason": "Invalid", "message": "the API server refused Job tiny-rho1-eval (422 Invalid): x"}),
         spec={"eval": EVAL}, status={"phase": "Succeeded"}, phase="Evaluating", events=["Normal Evaluating"],
         message="(422 Invalid): x; retrying in 25s"),
]  # fmt: skip


def _summary(action: Any) -> str:
    if isinstance(action, Create):
        return f"create {action.obj['kind']} {action.obj['metadata']['name']}"
    if isinstance(action, Delete):
        return f"delete {action.kind} {action.name}"
    assert isinstance(action, PatchRun)
    if action.state is not None:
        return "patch state"
    return f"patch resumeFrom={action.patch['spec']['resumeFrom']}"


def _body(make_run: Callable[..., dict[str, Any]], case: Case) -> dict[str, Any]:
    body = make_run(**{f"spec.{key}": value for key, value in case.spec.items()})
    if case.state is not None:
        body["metadata"]["annotations"] = {STATE_ANNOTATION: json.dumps(case.state)}
    # What the operator wrote last time: the attempt it recorded, unless the case says otherwise.
    body["status"] = (
        {"attempt": case.state.get("attempt", 0), **case.status} if case.state else copy.deepcopy(case.status)
    )
    return body


def _observed(case: Case) -> Observed:
    return Observed(
        copy.deepcopy(case.jobs), copy.deepcopy(case.pods), case.recipe_text, case.account_missing, case.account
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_transition(case: Case, make_run: Callable[..., dict[str, Any]]) -> None:
    body = _body(make_run, case)
    plan = reconcile(body, _observed(case), case.now, DEFAULTS)
    new = {**body["status"], **plan.status}
    assert [_summary(a) for a in plan.actions] == case.actions
    assert [f"{e.type} {e.reason}" for e in plan.events] == case.events
    assert new.get("phase") == case.phase
    for key in ("attempt", "restarts", "preemptions"):
        if getattr(case, key) is not None:
            assert new[key] == getattr(case, key), key
    assert case.message in new.get("message", ""), new.get("message")
    conditions = {c["type"]: f"{c['status']} {c['reason']}" for c in new.get("conditions", [])}
    assert case.conditions.items() <= conditions.items(), conditions
    # The status is the operator's: its own condition types alone, and the verdicts say what the phase says.
    assert set(conditions) <= set(CONDITION_TYPES)
    assert (conditions["Succeeded"].startswith("True"), conditions["Failed"].startswith("True")) == (
        case.phase == "Succeeded",
        case.phase == "Failed",
    )


def _conditions(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status["conditions"]]


@pytest.mark.parametrize("status", ["True", "False"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_conditions_a_trainer_wrote_change_no_condition_and_no_action(
    case: Case, status: str, make_run: Callable[..., dict[str, Any]]
) -> None:
    body = _body(make_run, case)
    clean = reconcile(body, _observed(case), case.now, DEFAULTS)
    expected = _conditions({**body["status"], **clean.status})
    body["status"]["conditions"] = [forged(type_, status) for type_ in (*CONDITION_TYPES, "Ready", "Complete")]
    tampered = reconcile(copy.deepcopy(body), _observed(case), case.now, DEFAULTS)
    assert _conditions({**body["status"], **tampered.status}) == expected
    assert [_summary(a) for a in tampered.actions] == [_summary(a) for a in clean.actions]


def _job_of(plan: Plan) -> dict[str, Any]:
    return next(a.obj for a in plan.actions if isinstance(a, Create) and a.obj["kind"] == "Job")


def _state_of(plan: Plan) -> State:
    written = [a.state for a in plan.actions if isinstance(a, PatchRun) and a.state is not None]
    return written[-1]


def test_the_next_attempt_resumes_from_the_accepted_checkpoint_with_fallback(make_run: Callable[..., Any]) -> None:
    body = make_run(**{"metadata.annotations": {STATE_ANNOTATION: json.dumps(state(ending=ending(), **AT_1200))}})
    plan = reconcile(body, Observed(), NOW)
    args = _job_of(plan)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-3:] == ["--resume", CKPT, contract.RESUME_FALLBACK_FLAG]
    assert plan.status["resumeFrom"] == CKPT and _state_of(plan).resume_from == CKPT
    env = {e["name"]: e.get("value") for e in _job_of(plan)["spec"]["template"]["spec"]["containers"][0]["env"]}
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
    body, observed = _apply(body, Observed([job(1)], [pod(1, 0), crashed]), first)
    # Pass 2, once that pod is gone: attempt 2, from the newest checkpoint any validated source named.
    second = reconcile(body, Observed(observed.jobs, [crashed]), "2026-01-02T03:04:06Z")
    args = _job_of(second)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-3:] == ["--resume", case.resume, contract.RESUME_FALLBACK_FLAG]
    assert {**body["status"], **second.status}["resumeFrom"] == case.resume == _state_of(second).resume_from


def test_the_operators_own_resume_from_patch_is_not_a_user_edit(make_run: Callable[..., Any]) -> None:
    body = make_run(**{"metadata.annotations": {STATE_ANNOTATION: json.dumps(state(ending=ending(), **AT_1200))}})
    first = reconcile(body, Observed(), NOW)
    body, observed = _apply(body, Observed(), first)
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
    args = _job_of(plan)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-len(resume) :] == resume and FOREIGN_CKPT not in args
    valid = next(c for c in plan.status["conditions"] if c["type"] == "Valid")
    assert valid["status"] == "False" and "was not written by the operator and is ignored" in valid["message"]
    assert ("Warning", "InvalidSpec") in [(e.type, e.reason) for e in plan.events]


def test_a_report_is_copied_and_its_checkpoint_kept_where_trainers_cannot_write(make_run: Callable[..., Any]) -> None:
    body = make_run(**{"metadata.annotations": {STATE_ANNOTATION: json.dumps(state())}})
    body["status"] = {"phase": "Running", "report": report()}
    plan = reconcile(body, Observed([job(1)], RUNNING), NOW)
    assert {key: plan.status[key] for key in ("step", "loss", "latestCheckpoint", "progress")} == {
        "step": 1200, "loss": 2.25, "latestCheckpoint": CKPT, "progress": "1200/60"
    }  # fmt: skip
    assert _state_of(plan).checkpoint == CKPT
    # A trainer rewriting latestCheckpoint (or anything else) changes nothing the operator decides on.
    body["metadata"]["annotations"] = {STATE_ANNOTATION: _state_of(plan).dump()}
    body["status"] = {**body["status"], **plan.status, "latestCheckpoint": "s3://evil/x", "restarts": 99}
    again = reconcile(body, Observed([job(1)], RUNNING), NOW)
    assert again.status["latestCheckpoint"] == CKPT and again.status["restarts"] == 0


def test_a_tampered_status_never_breaks_a_pass(make_run: Callable[..., Any]) -> None:
    body = make_run(**{"metadata.annotations": {STATE_ANNOTATION: json.dumps(state())}})
    body["status"] = {
        "phase": 3,
        "conditions": "x",
        "report": {"attempt": "1", "step": [1]},
        "step": "many",
        "loss": {},
    }
    plan = reconcile(body, Observed([job(1)], RUNNING), NOW)
    assert plan.status["phase"] == "Running" and plan.status["step"] is None and plan.status["loss"] is None


def test_a_refusal_records_a_growing_backoff_and_says_what_the_api_server_said(make_run: Callable[..., Any]) -> None:
    body = make_run()
    refusal = Refused("Job", "tiny-rho1-a1", 422, "Invalid", 'Job.batch "tiny-rho1-a1" is invalid: ' + "x" * 5000)
    plan = refused(body, refusal, State(), NOW)
    assert plan.requeue_after == 30 and [e.reason for e in plan.events] == ["Refused"]
    assert plan.status["message"].startswith("the API server refused Job tiny-rho1-a1 (422 Invalid): Job.batch")
    assert len(plan.status["message"]) <= 400
    condition = next(c for c in plan.status["conditions"] if c["type"] == "Applied")
    assert (condition["status"], condition["reason"]) == ("False", "Refused")
    recorded = _state_of(plan)
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
    body, _ = _apply(body, Observed(), refused(body, case.refusal, written, NOW))
    again = reconcile(body, Observed(), "2026-01-02T03:04:06Z")
    assert again.actions == []
    assert again.requeue_after == case.requeue - 1 and "retrying in" in again.status["message"]


def test_credentials_in_a_uri_never_reach_the_status(make_run: Callable[..., Any]) -> None:
    body = make_run(
        **{"spec.mlflow": {"trackingUri": "https://user:hunter2@mlflow.example"}, "spec.recipe.optim": {"lr": -1}}
    )
    body["spec"]["resume"] = "s3://user:hunter2@b/c"
    plan = reconcile(body, Observed(), NOW)
    assert "hunter2" not in json.dumps(plan.status) + json.dumps([e.message for e in plan.events])


def _apply(body: dict[str, Any], observed: Observed, plan: Plan) -> tuple[dict[str, Any], Observed]:
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


@pytest.mark.parametrize("case", [c for c in CASES if c.actions], ids=[c.name for c in CASES if c.actions])
def test_reconciling_again_after_applying_changes_nothing(case: Case, make_run: Callable[..., Any]) -> None:
    body, observed = _body(make_run, case), _observed(case)
    body, observed = _apply(body, observed, reconcile(body, observed, case.now, DEFAULTS))
    again = reconcile(body, observed, "2026-01-02T03:04:06Z", DEFAULTS)
    assert ([_summary(a) for a in again.actions], again.events) == ([], [])
    assert set(again.status) <= {"message", "conditions"}  # progress wording only; no new transition


def test_conditions_keep_their_transition_time_while_their_status_holds(make_run: Callable[..., Any]) -> None:
    body = make_run(**{"metadata.annotations": {STATE_ANNOTATION: json.dumps(state())}})
    body["status"] = {"phase": "Pulling"}
    first = reconcile(body, Observed([job(1)], RUNNING), NOW)
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
        "observedGeneration": 1,
    }
    assert later.status["completionTime"] == "2026-01-03T00:00:00Z"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"spec.recipe.optim": {"lr": -1}}, "optim.lr: Input should be greater than 0"),
        ({"spec.nodes": "x"}, "spec.nodes: Input should be a valid integer"),
        ({"spec.datasets": {"../up": "s3://b/x.jsonl"}}, "spec.datasets.../up.[key]: String should match pattern"),
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
    assert [(e.type, e.reason) for e in plan.events] == [("Normal", "Pending"), ("Warning", "InvalidSpec")]
    body["status"] = plan.status
    again = reconcile(body, Observed(), NOW)
    assert (again.actions, again.events, again.status) == ([], [], {})


def test_evaluation_results_keep_only_what_the_contract_names_with_its_types() -> None:
    from wmtp_operator.reconcile.evaluation import outcome, results

    hostile = {
        "tasks": {"humaneval": {"problems": 164, "pass@1": 0.5, "pass@2": True, "pass@x": 1.0, "rm -rf": 1.0,
                                **{f"pass@{k}": 0.5 for k in range(3, 100)}},
                  "mbpp": {"pass@1": float("nan"), "problems": "many"}, "gsm8k": {"pass@1": 1.0}, "x" * 9: []},
        "speed": {"speedup": float("inf"), "identical": "yes", "prompts": 2.5, "mean_accepted": 2.0, "evil": 1},
        "mlflow_run_id": "../../runs",
    }  # fmt: skip
    found = results({contract.TERMINATION_EVAL: hostile})
    assert set(found["tasks"]) == {"humaneval", "mbpp"} and found["tasks"]["mbpp"] == {}
    humaneval = found["tasks"]["humaneval"]
    assert len(humaneval) == 1 + contract.MAX_EVAL_SCORES and {"pass@2", "pass@x", "rm -rf"}.isdisjoint(humaneval)
    assert found["speed"] == {"meanAccepted": 2.0} and found["mlflow_run_id"] is None
    # More than the kubelet keeps is no message of `wmtp eval`'s: the evaluation failed.
    words = {"reason": "Succeeded", "message": "x" * contract.TERMINATION_MESSAGE_MAX, "eval": {}}
    said, why = outcome(eval_job("Complete"), [eval_pod("Succeeded", words)], EVAL_JOB)
    assert said is None and "no readable termination message" in why
