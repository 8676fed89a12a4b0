"""The run's state machine, one table row per transition, plus idempotence when a plan is applied and re-run."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from support.reconcile_rows import (
    A2_CREATED,
    A2_RUNNING,
    AT_1200,
    AUTO,
    BEFORE,
    CKPT,
    CREATE_A1,
    CREATE_A2,
    DEFAULTS,
    EVAL,
    EVAL_FAILED_WORDS,
    EVAL_JOB,
    EVAL_WORDS,
    FIRST_STEP,
    JUST_NOW,
    LATER_CKPT,
    NOW,
    OPERATOR_ACCOUNT,
    OPTED_IN,
    PREEMPTED_WORDS,
    PULLED,
    PULLING,
    QUEUE,
    RESTARTED,
    RESUME,
    RUNNING,
    UNSCHEDULABLE,
    account,
    apply_plan,
    disrupted,
    ended,
    ending,
    eval_job,
    eval_pod,
    evaluated,
    forged,
    job,
    pod,
    queued_job,
    report,
    state,
    state_of,
    summary,
    waiting,
)
from wmtp import contract
from wmtp_operator.plan import Delete, Observed
from wmtp_operator.reconcile import reconcile
from wmtp_operator.reconcile.attempt import PULL_FAILURES
from wmtp_operator.state import STATE_ANNOTATION
from wmtp_operator.status import CONDITION_TYPES


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
    Case("the first step after a restart: timed once, in the record", RESTARTED, [job(2, created=A2_CREATED)],
         A2_RUNNING, status={"phase": "Running", "report": report(2, 1001, None, **FIRST_STEP)}, phase="Running",
         actions=["patch state"]),
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
    # -------------------------------------------------------------- Kueue: queued, admitted, preempted
    Case("Kueue holds the new attempt's Job: Queued, no Warning, nothing counted", state(), [queued_job()], [],
         spec={"queueName": QUEUE}, status={"phase": "Pending"}, phase="Queued", restarts=0, preemptions=0,
         events=["Normal Queued"], conditions={"Started": "False Queued", "Progressing": "True Queued"},
         message=f"attempt 1 queued: Job tiny-rho1-a1 waits for Kueue to admit it in LocalQueue {QUEUE}, quota for "
                 "its 2 pod(s) at once; kubectl get workloads -n team-a -l kueue.x-k8s.io/job-uid=uid-tiny-rho1-a1"),
    Case("queued for longer than startupTimeout: still Queued, no restart", state(), [queued_job(created=BEFORE)],
         [], spec={"queueName": QUEUE}, status={"phase": "Queued"}, phase="Queued", restarts=0),
    Case("admitted long after its creation: startupTimeout counts from the admission", state(),
         [queued_job(admitted=JUST_NOW, created=BEFORE)], [pod(1, 0, "Pending", **UNSCHEDULABLE), pod(1, 1, "Pending")],
         spec={"queueName": QUEUE}, status={"phase": "Queued"}, phase="Pending", restarts=0,
         events=["Normal Pending", "Warning Unschedulable"], conditions={"Started": "False Unschedulable"}),
    Case("admitted but not yet synced by the Job controller (no startTime): counts from now", state(),
         [queued_job(admitted=JUST_NOW, created=BEFORE, synced=False)], [], spec={"queueName": QUEUE},
         status={"phase": "Queued"}, phase="Pending", restarts=0, events=["Normal Pending"]),
    Case("pods not started within startupTimeout of the admission: the attempt fails", state(),
         [queued_job(admitted="2026-01-02T02:30:00Z", created=BEFORE)], [pod(1, 0, "Pending", **UNSCHEDULABLE)],
         spec={"queueName": QUEUE}, status={"phase": "Pending"}, phase="Restarting", restarts=1,
         actions=["patch state", "delete Job tiny-rho1-a1"], events=["Warning Restarting", "Warning Unschedulable"],
         message="pods did not start within startupTimeout (1800s)"),
    Case("the pods of a Job Kueue admitted run: the record notes it (its preemption would take them away)", state(),
         [queued_job(admitted=JUST_NOW)], RUNNING, spec={"queueName": QUEUE}, status={"phase": "Pulling"},
         phase="Running", actions=["patch state"], events=["Normal Running"]),
    Case("Kueue suspends the running attempt (a preemption): counted as one, never against backoffLimit",
         state(ran=True, restarts=3, **AT_1200), [queued_job(created=BEFORE)],
         [pod(1, 0, deleting=True), pod(1, 1, deleting=True)], spec={"queueName": QUEUE},
         status={"phase": "Running"}, phase="Restarting", restarts=3, preemptions=1,
         actions=["patch state", "delete Job tiny-rho1-a1"], events=["Warning Restarting"],
         message="was suspended by Kueue after its pods started (preempted or evicted; kubectl get workloads"),
    Case("...seen before the record noted that its pods ran: its pods that ran, being deleted, say so", state(),
         [queued_job(created=BEFORE)], [pod(1, 0, deleting=True), pod(1, 1, deleting=True)],
         spec={"queueName": QUEUE}, status={"phase": "Running"}, phase="Restarting", restarts=0, preemptions=1,
         actions=["patch state", "delete Job tiny-rho1-a1"], events=["Warning Restarting"],
         message="preemption 1 (not counted as a restart)"),
    Case("a Job read suspended, its pods read running a moment later (its admission between): queued, nothing ended",
         state(), [queued_job()], RUNNING, spec={"queueName": QUEUE}, status={"phase": "Queued"}, phase="Queued",
         restarts=0, preemptions=0),
    Case("...and the next attempt, a new Job and Workload, resumes from the latest checkpoint",
         state(ending=ending(cause="preemption", reason="EvictionByKueue"), preemptions=1, **AT_1200), [], [],
         spec={"queueName": QUEUE}, status={"phase": "Restarting"}, phase="Restarting", attempt=2, restarts=0,
         preemptions=1, actions=[RESUME, *CREATE_A2], events=["Warning Restarting"],
         message=f"attempt 2 resumes from {CKPT}"),
    Case("a Kueue Job's pods being deleted while the Job still shows admitted: not a failure yet, looked at again",
         state(ran=True), [queued_job(admitted=JUST_NOW)], [pod(1, 0, deleting=True), pod(1, 1, deleting=True)],
         spec={"queueName": QUEUE}, status={"phase": "Running"}, phase="Running", restarts=0, preemptions=0),
    Case("...and a pod deleted by hand (the Job not suspended) that ends without a save: a restart, as ever",
         state(ran=True), [queued_job(admitted=JUST_NOW)],
         [pod(1, 0, "Failed", deleting=True, **ended(143)), pod(1, 1)],
         spec={"queueName": QUEUE}, status={"phase": "Running"}, phase="Restarting", restarts=1, preemptions=0,
         actions=["patch state", "delete Job tiny-rho1-a1"], events=["Warning Restarting"], message="exit code 143"),
    Case("admitted, then suspended again before a pod ran: queued again, the same Job kept", state(),
         [queued_job(created=BEFORE)], [pod(1, 0, "Failed", deleting=True), pod(1, 1, "Pending", deleting=True)],
         spec={"queueName": QUEUE}, status={"phase": "Pending"}, phase="Queued", restarts=0, preemptions=0,
         events=["Normal Queued"]),
    Case("the evaluation's Job held by Kueue: Evaluating, queued", evaluated(), [{**eval_job(), "spec": {
         "completions": 1, "suspend": True}}], [], spec={"eval": EVAL, "queueName": QUEUE},
         status={"phase": "Evaluating"}, phase="Evaluating", message="queued until Kueue admits it"),
    Case("the evaluation's Job preempted by Kueue: its pods' ends are not the evaluation's, it runs again",
         evaluated(), [{**eval_job(), "spec": {"completions": 1, "suspend": True}}],
         [eval_pod("Failed", None, 143, **{"reason": "Evicted"})], spec={"eval": EVAL, "queueName": QUEUE},
         status={"phase": "Evaluating"}, phase="Evaluating"),
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
    assert [summary(a) for a in plan.actions] == case.actions
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
    assert [summary(a) for a in tampered.actions] == [summary(a) for a in clean.actions]


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


def test_credentials_in_a_uri_never_reach_the_status(make_run: Callable[..., Any]) -> None:
    body = make_run(
        **{"spec.mlflow": {"trackingUri": "https://user:hunter2@mlflow.example"}, "spec.recipe.optim": {"lr": -1}}
    )
    body["spec"]["resume"] = "s3://user:hunter2@b/c"
    plan = reconcile(body, Observed(), NOW)
    assert "hunter2" not in json.dumps(plan.status) + json.dumps([e.message for e in plan.events])


@pytest.mark.parametrize("case", [c for c in CASES if c.actions], ids=[c.name for c in CASES if c.actions])
def test_reconciling_again_after_applying_changes_nothing(case: Case, make_run: Callable[..., Any]) -> None:
    body, observed = _body(make_run, case), _observed(case)
    body, observed = apply_plan(body, observed, reconcile(body, observed, case.now, DEFAULTS))
    again = reconcile(body, observed, "2026-01-02T03:04:06Z", DEFAULTS)
    assert ([summary(a) for a in again.actions], again.events) == ([], [])
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
        "speed": {"speedup": float("inf"), "identical": "yes", "prompts": 2.5, "mean_accepted": 2.0, "evil": 1,
                  "speedup_suspect": 1, "pass_cost": "1.5"},
        "mlflow_run_id": "../../runs",
    }  # fmt: skip
    found = results({contract.TERMINATION_EVAL: hostile})
    assert set(found["tasks"]) == {"humaneval", "mbpp"} and found["tasks"]["mbpp"] == {}
    humaneval = found["tasks"]["humaneval"]
    assert len(humaneval) == 1 + contract.MAX_EVAL_SCORES and {"pass@2", "pass@x", "rm -rf"}.isdisjoint(humaneval)
    assert found["speed"] == {"meanAccepted": 2.0} and found["mlflow_run_id"] is None
    # What the speed report flags comes through with its type: a suspect speed-up and the pass cost behind it.
    flagged = results({contract.TERMINATION_EVAL: {"speed": {"speedup_suspect": True, "pass_cost": 0.2}}})
    assert flagged["speed"] == {"speedupSuspect": True, "passCost": 0.2}
    # More than the kubelet keeps is no message of `wmtp eval`'s: the evaluation failed.
    words = {"reason": "Succeeded", "message": "x" * contract.TERMINATION_MESSAGE_MAX, "eval": {}}
    said, why = outcome(eval_job("Complete"), [eval_pod("Succeeded", words)], EVAL_JOB)
    assert said is None and "no readable termination message" in why


def test_a_deletion_that_kueues_suspension_may_explain_is_looked_at_again_soon(make_run: Callable[..., Any]) -> None:
    """The pass read the Job before Kueue suspended it and the pods after the Job controller began deleting them:
    the next look decides (a preemption then), soon even if no pod changes."""
    from wmtp_operator.reconcile.queue import RECHECK_SECONDS

    body = make_run(**{"spec.queueName": QUEUE, "metadata.annotations": {STATE_ANNOTATION: json.dumps(state())}})
    deleting = [pod(1, 0, deleting=True), pod(1, 1, deleting=True)]
    plan = reconcile(body, Observed([queued_job(admitted=JUST_NOW)], deleting), NOW)
    assert plan.requeue_after == RECHECK_SECONDS and not any(isinstance(a, Delete) for a in plan.actions)
    body, _ = apply_plan(body, Observed([queued_job(admitted=JUST_NOW)], deleting), plan)
    suspended = reconcile(body, Observed([queued_job()], deleting), NOW)
    assert state_of(suspended).preemptions == 1 and state_of(suspended).restarts == 0
