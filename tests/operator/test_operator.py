"""The real operator process (`python -m wmtp_operator`, kopf) against an emulated API server (kmock).

The emulator plays the cluster (`support.controllers`): the Job controller creates an attempt's pods, the kubelet
runs them (or makes them wait, as a test asks), the garbage collector follows ownerReferences. The tests play
trainer rank 0 (a patch of `status.report`, as the trainer's reporter does) and the faults: crashes, SIGTERM
saves, evictions, refusals, a pod that cannot start. The operator's /metrics is scraped along the way.
"""

from __future__ import annotations

import copy
import json
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from support.emulator import Emulator, OperatorProcess
from support.kubelet import argv
from support.waiting import wait_for
from wmtp import contract
from wmtp.checkpoint import step_dir_name
from wmtp.config import MAX_MESSAGE

RUN = "tiny-rho1"
CKPT = f"s3://wmtp/checkpoints/{RUN}/{step_dir_name(1000)}"


Scraped = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Cluster:
    """The emulator seen from one test (its own namespace), with waits that show the operator's log on time-out."""

    def __init__(self, emulator: Emulator, operator: OperatorProcess, namespace: str) -> None:
        self.api, self.operator, self.ns = emulator, operator, namespace

    def until(self, check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
        try:
            return wait_for(check, timeout=timeout, what=what)
        except TimeoutError as err:
            raise AssertionError(f"{err}\n--- operator log (tail) ---\n{self.operator.output()[-4000:]}") from None

    def create(self, body: dict[str, Any], name: str = RUN) -> str:
        body = copy.deepcopy(body)
        body["metadata"] = {"name": name, "namespace": self.ns}
        return self.api.create(body)["metadata"]["uid"]

    def run(self, name: str = RUN) -> dict[str, Any]:
        return self.api.get("WMTPRun", self.ns, name)

    def status(self, name: str = RUN) -> dict[str, Any]:
        return self.run(name).get("status") or {}

    def jobs(self) -> list[str]:
        return sorted(job["metadata"]["name"] for job in self.api.list("Job", self.ns))

    def pods(self, attempt: int, name: str = RUN) -> list[dict[str, Any]]:
        return self.api.pods(self.ns, f"{name}-a{attempt}")

    def running(self, attempt: int = 1, name: str = RUN) -> list[dict[str, Any]]:
        self.until(lambda: self.status(name).get("phase") == "Running" and self.status(name)["attempt"] == attempt,
                   f"attempt {attempt} of {name} running")  # fmt: skip
        return self.pods(attempt, name)

    def report(self, attempt: int, step: int, checkpoint: str | None = None, name: str = RUN) -> None:
        """What trainer rank 0 patches: status.report, stamped with its attempt."""
        report = {"attempt": attempt, "step": step, "loss": 2.5, "latestCheckpoint": checkpoint}
        self.api.patch("WMTPRun", self.ns, name, {"status": {contract.REPORT_FIELD: report}}, status=True)

    def events(self, name: str = RUN) -> list[dict[str, Any]]:
        return [e for e in self.api.list("Event", self.ns) if e["involvedObject"]["name"] == name]

    def metrics(self, check: Callable[[Scraped], bool], what: str) -> Scraped:
        """The operator's /metrics once `check` holds: a pass updates them a moment after it writes the status."""

        def scraped() -> Scraped | None:
            found = self.operator.scrape()
            return found if check(found) else None

        return self.until(scraped, what)

    def wait(self, condition: str, timeout: float, name: str = RUN) -> dict[str, Any] | None:
        """`kubectl wait wr/<name> --for=condition=<condition> --timeout=<timeout>s`: the run as soon as the
        condition is True, None when the timeout passes first."""

        def true() -> dict[str, Any] | None:
            run = self.run(name)
            found = [c for c in (run.get("status") or {}).get("conditions", []) if c.get("type") == condition]
            return run if found and found[0].get("status") == "True" else None

        try:
            return wait_for(true, timeout=timeout, what=f"condition {condition}")
        except TimeoutError:
            return None

    def condition(self, type_: str, name: str = RUN) -> str:
        found = next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), {})
        return f"{found.get('status')} {found.get('reason')}"


@pytest.fixture
def cluster(emulator: Emulator, operator_process: OperatorProcess, request: pytest.FixtureRequest) -> Cluster:
    # One namespace per test keeps the tests' runs, children and events apart on the shared emulator.
    name = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())
    return Cluster(emulator, operator_process, f"{name[:40].strip('-')}-{zlib.crc32(name.encode()):08x}")


def sample(scraped: Scraped, name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def total(scraped: Scraped, name: str) -> float:
    """A counter summed over its labels."""
    return sum(value for (sample_name, _), value in scraped.items() if sample_name == name)


def _column(obj: dict[str, Any], json_path: str) -> Any:
    value: Any = obj
    for key in json_path.strip(".").split("."):
        value = (value or {}).get(key)
    return value


def test_a_run_resumes_from_its_reported_checkpoint_after_a_crash_then_succeeds(
    cluster: Cluster, tiny_run: dict[str, Any], crd: dict[str, Any]
) -> None:
    api, ns = cluster.api, cluster.ns
    before = cluster.operator.scrape()
    api.kubelet(ns, start="pull")
    uid = cluster.create(tiny_run)
    cluster.until(lambda: cluster.status().get("phase") == "Pulling", "phase Pulling")
    kinds = ("ConfigMap", "Service", "NetworkPolicy", "ServiceAccount", "Role", "RoleBinding", "Job")
    for kind in kinds:
        (child,) = api.list(kind, ns)
        (owner,) = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("WMTPRun", RUN, uid, True)
    pods = cluster.pods(1)
    for pod in pods:
        api.set_status(
            ns, pod, {"phase": "Running", "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}
        )
    cluster.running()
    api.kubelet(ns, start="run")  # the next attempt's pods run at once

    cluster.report(1, 1000, CKPT)
    cluster.until(lambda: cluster.status().get("latestCheckpoint") == CKPT, "the reported checkpoint accepted")
    age_of = {"namespace": ns, "run": RUN}
    age = cluster.metrics(lambda m: ("wmtp_seconds_since_checkpoint", frozenset(age_of.items())) in m, "its age")
    api.exit(ns, pods[1], 1)
    pods = cluster.running(2)
    restarted = cluster.metrics(lambda m: sample(m, "wmtp_runs", phase="Running") == sample(before, "wmtp_runs",
                                phase="Running") + 1, "attempt 2 counted as running")  # fmt: skip
    assert sample(restarted, "wmtp_restarts_total", reason="Error") - sample(before, "wmtp_restarts_total",
                                                                               reason="Error") == 1  # fmt: skip
    assert total(restarted, "wmtp_preemptions_total") == total(before, "wmtp_preemptions_total")
    assert sample(restarted, "wmtp_seconds_since_checkpoint", **age_of) >= sample(
        age, "wmtp_seconds_since_checkpoint", **age_of)  # fmt: skip
    for counter in ("wmtp_reconcile_total", "wmtp_reconcile_duration_seconds_count"):
        assert total(before, counter) < total(age, counter) < total(restarted, counter)
    assert sample(restarted, "wmtp_reconcile_total", result="error") == sample(before, "wmtp_reconcile_total",
                                                                                result="error")  # fmt: skip
    run = cluster.run()
    assert run["spec"]["resumeFrom"] == CKPT
    assert (run["status"]["attempt"], run["status"]["restarts"], run["status"]["preemptions"]) == (2, 1, 0)
    trainer = api.get("Job", ns, f"{RUN}-a2")["spec"]["template"]["spec"]["containers"][0]
    assert trainer["args"][-3:] == ["--resume", CKPT, contract.RESUME_FALLBACK_FLAG]
    default = cluster.operator.env["WMTP_DEFAULT_MLFLOW_URI"]  # the chart's MLflow server
    assert {"name": "MLFLOW_TRACKING_URI", "value": default} in trainer["env"]
    assert cluster.jobs() == [f"{RUN}-a2"]

    cluster.report(2, 1200)
    for pod in pods:
        api.exit(ns, pod, 0)
    cluster.until(lambda: cluster.status().get("phase") == "Succeeded", "phase Succeeded")
    run = cluster.run()
    columns = {c["name"]: _column(run, c["jsonPath"]) for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns == {
        "Phase": "Succeeded",
        "Algorithm": "rho1-wmtp",
        "Progress": "1200/60",
        "Loss": 2.5,
        "Restarts": 1,
        "Age": run["metadata"]["creationTimestamp"],
        "Preemptions": 0,
        "Checkpoint": CKPT,
        "Message": "attempt 2 succeeded",
        "Eval": None,
    }
    conditions = {c["type"]: c["status"] for c in run["status"]["conditions"]}
    assert conditions["Succeeded"] == "True" and conditions["Progressing"] == "False"
    reasons = cluster.until(lambda: {e["reason"] for e in cluster.events()} >= {"Succeeded"} and cluster.events(), "")
    assert {"Pending", "Pulling", "Running", "Restarting", "Succeeded"} <= {e["reason"] for e in reasons}
    # Deleting a run never needs the operator: no finalizer, and none of kopf's bookkeeping.
    assert not run["metadata"].get("finalizers")
    assert set(run["metadata"].get("annotations") or {}) == {"wmtp.io/state"}
    succeeded = cluster.metrics(lambda m: sample(m, "wmtp_runs", phase="Succeeded") == sample(
        before, "wmtp_runs", phase="Succeeded") + 1, "the run counted as succeeded")  # fmt: skip
    assert sample(succeeded, "wmtp_runs", phase="Running") == sample(before, "wmtp_runs", phase="Running")
    assert ("wmtp_seconds_since_checkpoint", frozenset(age_of.items())) not in succeeded
    api.delete("WMTPRun", ns, RUN)
    cluster.metrics(lambda m: sample(m, "wmtp_runs", phase="Succeeded") == sample(before, "wmtp_runs",
                    phase="Succeeded"), "the deleted run no longer counted")  # fmt: skip


def _reported_then(inject: Callable[[Cluster, list[dict[str, Any]]], None]) -> Callable[[Cluster], None]:
    def step(cluster: Cluster) -> None:
        pods = cluster.running()
        cluster.report(1, 1000, CKPT)
        cluster.until(lambda: cluster.status().get("latestCheckpoint") == CKPT, "the checkpoint accepted")
        inject(cluster, pods)

    return step


def _scheduler_preempts(cluster: Cluster, pods: list[dict[str, Any]]) -> None:
    disruption = {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                  "message": "Preempted by a pod on node n"}  # fmt: skip
    cluster.api.set_status(cluster.ns, pods[0], {"conditions": [disruption]})
    cluster.api.delete("Pod", cluster.ns, pods[0]["metadata"]["name"])


def _trainer_writes_phase(cluster: Cluster) -> None:
    cluster.running()
    cluster.api.patch("WMTPRun", cluster.ns, RUN, {"status": {"phase": "Succeeded", "restarts": 7}}, status=True)
    time.sleep(0.5)  # the operator rewrites its fields at once


def _pull_fails_for_long(cluster: Cluster) -> None:
    pods = cluster.until(lambda: cluster.pods(1), "attempt 1's pods")
    time.sleep(2.5)  # past startupTimeout: a new attempt would not pull the image either, so none starts
    cluster.until(lambda: "unless the image can be pulled" in cluster.status().get("message", ""), "the deadline")
    status = cluster.status()
    assert (status["phase"], status["restarts"], cluster.jobs()) == ("Pending", 0, [f"{RUN}-a1"])
    assert cluster.condition("Started") == "False ImagePullBackOff"
    # The pods were scheduled, and began pulling, longer ago than imagePullDeadline.
    then = (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    for pod in pods:
        scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": then}
        cluster.api.set_status(cluster.ns, pod, {"conditions": [scheduled]})


def _stale_and_foreign_reports(cluster: Cluster) -> None:
    pods = cluster.running()
    cluster.api.exit(cluster.ns, pods[0], 1)
    cluster.running(2)
    cluster.report(1, 99999, CKPT)  # attempt 1 again, from a pod that should be gone
    cluster.report(2, 5, "s3://elsewhere/tiny-rho1/checkpoint_step_00000005")
    cluster.until(lambda: any(e["reason"] == "CheckpointRejected" for e in cluster.events()), "CheckpointRejected")


@dataclass
class Fault:
    name: str
    inject: Callable[[Cluster], None]
    phase: str
    restarts: int
    preemptions: int
    jobs: list[str]
    events: set[str] = field(default_factory=set)
    conditions: dict[str, str] = field(default_factory=dict)
    message: str = ""
    kubelet: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)
    attempt: int | None = None


A1, A2 = [f"{RUN}-a1"], [f"{RUN}-a2"]
FAULTS = [
    Fault("trainer crash: a restart, resumed from the checkpoint",
          _reported_then(lambda c, pods: c.api.exit(c.ns, pods[1], 1)), "Running", 1, 0, A2, {"Restarting"}, attempt=2),
    Fault("SIGTERM save (exit 75, Preempted): a preemption",
          _reported_then(lambda c, pods: c.api.exit(c.ns, pods[0], 75, {"reason": "Preempted", "step": 1000})),
          "Running", 0, 1, A2, {"Restarting"}, attempt=2),
    Fault("node drain (Eviction API): a preemption", _reported_then(lambda c, pods: c.api.evict(c.ns, pods[0])),
          "Running", 0, 1, A2, attempt=2),
    Fault("node pressure (kubelet eviction): a preemption",
          _reported_then(lambda c, pods: c.api.evict_by_kubelet(c.ns, pods[1])), "Running", 0, 1, A2, attempt=2,
          spec={"backoffLimit": 0}),
    Fault("the scheduler's preemption: a preemption", _reported_then(_scheduler_preempts), "Running", 0, 1, A2,
          attempt=2),
    Fault("a pod deleted by hand whose trainer dies without saving: a restart",
          _reported_then(lambda c, pods: c.api.delete("Pod", c.ns, pods[0]["metadata"]["name"])), "Running", 1, 0, A2,
          kubelet={"sigterm_exit": 143}, attempt=2),
    Fault("past backoffLimit: Failed, the Job kept for its logs",
          _reported_then(lambda c, pods: c.api.exit(c.ns, pods[1], 1)), "Failed", 0, 0, A1, {"Failed"},
          {"Failed": "True Failed"}, "backoffLimit 0 reached", spec={"backoffLimit": 0}),
    Fault("image pull back-off: visible, waited out past startupTimeout, Failed at imagePullDeadline, no restart",
          _pull_fails_for_long, "Failed", 0, 0, [], {"ImagePullBackOff", "Failed"}, {"Failed": "True Failed"},
          "not pulled within imagePullDeadline (30s); no retry fixes this",
          kubelet={"waiting": ("ImagePullBackOff", 'Back-off pulling image "ghcr.io/wmtp/wmtp-trainer:0.1.0"')},
          spec={"startupTimeout": "2s", "imagePullDeadline": "30s", "backoffLimit": 1}),
    Fault("invalid image name: Failed at once, no restart", lambda c: None, "Failed", 0, 0, [],
          {"InvalidImageName", "Failed"}, {"Failed": "True Failed"}, "no retry fixes this",
          kubelet={"waiting": ("InvalidImageName", "couldn't parse image name")}),
    Fault("missing Secret past the grace period: Failed, no restart", lambda c: None, "Failed", 0, 0, [],
          {"CreateContainerConfigError", "Failed"}, message='secret "wmtp-s3" not found',
          kubelet={"waiting": ("CreateContainerConfigError", 'secret "wmtp-s3" not found')},
          spec={"startupTimeout": "2s"}),
    Fault("a ServiceAccount that does not exist: Valid=False, no Job", lambda c: time.sleep(0.5), "Pending", 0, 0,
          [], {"ServiceAccountNotFound"}, {"Valid": "False ServiceAccountNotFound"}, "no such ServiceAccount",
          spec={"serviceAccountName": "irsa-s3"}),
    Fault("unschedulable: the scheduler's message",
          lambda c: c.until(lambda: c.condition("Started") == "False Unschedulable", "Started"), "Pending", 0, 0, A1,
          {"Unschedulable"},
          {"Started": "False Unschedulable"}, "Unschedulable: 0/4 nodes are available: 4 Insufficient cpu.",
          kubelet={"unschedulable": "0/4 nodes are available: 4 Insufficient cpu."}),
    Fault("a trainer writing phase Succeeded ends nothing", _trainer_writes_phase, "Running", 0, 0, A1,
          conditions={"Progressing": "True Running"}),
    Fault("reports of an older attempt, or of a checkpoint elsewhere, change nothing", _stale_and_foreign_reports,
          "Running", 1, 0, A2, {"CheckpointRejected"}, attempt=2),
]  # fmt: skip


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault(fault: Fault, cluster: Cluster, make_run: Callable[..., dict[str, Any]]) -> None:
    before = cluster.operator.scrape()
    cluster.api.kubelet(cluster.ns, **fault.kubelet)
    cluster.create(make_run(**{f"spec.{key}": value for key, value in fault.spec.items()}))
    fault.inject(cluster)

    def settled() -> bool:
        status = cluster.status()
        counts = (status.get("phase"), status.get("restarts"), status.get("preemptions"), cluster.jobs())
        return counts == (fault.phase, fault.restarts, fault.preemptions, fault.jobs) and (
            fault.attempt is None or status.get("attempt") == fault.attempt
        )

    cluster.until(settled, f"{fault.phase}, restarts {fault.restarts}, preemptions {fault.preemptions}, {fault.jobs}")
    status = cluster.status()
    assert fault.message in status["message"] and len(status["message"]) <= MAX_MESSAGE
    for type_, expected in fault.conditions.items():
        assert cluster.condition(type_) == expected, type_
    cluster.until(lambda: fault.events <= {e["reason"] for e in cluster.events()}, f"events {fault.events}")
    counts = {"wmtp_restarts_total": fault.restarts, "wmtp_preemptions_total": fault.preemptions}
    # The record's counts, never a trainer's: one that writes restarts 7 counts nothing.
    cluster.metrics(lambda m: {c: total(m, c) - total(before, c) for c in counts} == counts, f"counters {counts}")
    if fault.inject is _stale_and_foreign_reports:
        assert status["step"] == 5 and "latestCheckpoint" not in status
    elif fault.attempt == 2:
        assert status["resumeFrom"] == CKPT == status["latestCheckpoint"]


def test_kubectl_wait_for_a_verdict_returns_for_the_operators_verdict_never_for_a_trainers(
    cluster: Cluster, tiny_run: dict[str, Any]
) -> None:
    cluster.create(tiny_run)
    pods = cluster.running()
    forged = [{"type": kind, "status": "True", "reason": "Forged", "message": "by a trainer",
               "lastTransitionTime": "2026-01-01T00:00:00Z"}
              for kind in ("Succeeded", "Failed", "Complete")]  # fmt: skip
    patch = {"status": {"phase": "Succeeded", "conditions": forged}}
    written = int(cluster.api.patch("WMTPRun", cluster.ns, RUN, patch, status=True)["metadata"]["resourceVersion"])
    # The operator's next pass rewrites the status whole: from then on no verdict is True while the run runs.
    cluster.until(lambda: int(cluster.run()["metadata"]["resourceVersion"]) > written, "the operator's next write")
    assert cluster.wait("Succeeded", timeout=1.5) is None and cluster.wait("Failed", timeout=0.5) is None
    status = cluster.status()
    assert status["phase"] == "Running" and "Complete" not in {c["type"] for c in status["conditions"]}
    for pod in pods:
        cluster.api.exit(cluster.ns, pod, 0)
    run = cluster.wait("Succeeded", timeout=15)
    assert run is not None and run["status"]["phase"] == "Succeeded"
    assert cluster.condition("Failed") == "False Succeeded"
    assert run["status"]["observedGeneration"] == run["metadata"]["generation"]


def _account(cluster: Cluster, name: str, **labels: str) -> None:
    body = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": cluster.ns}}
    cluster.api.create({**body, "metadata": {**body["metadata"], "labels": labels}})


def test_a_run_may_name_only_a_service_account_that_opted_in_and_never_the_operators(
    cluster: Cluster, make_run: Callable[..., dict[str, Any]]
) -> None:
    _account(cluster, "deployer")  # a privileged identity that never agreed to train
    _account(cluster, "irsa", **{"wmtp.io/trainer": "true"})
    cluster.create(make_run(**{"spec.serviceAccountName": "deployer"}), name="borrower")
    cluster.create(make_run(**{"spec.serviceAccountName": "irsa"}), name="opted-in")
    cluster.running(name="opted-in")
    job = cluster.api.get("Job", cluster.ns, "opted-in-a1")
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "irsa"
    cluster.until(lambda: cluster.condition("Valid", "borrower") == "False ServiceAccountNotAllowed", "Valid=False")
    assert "deployer has not opted in" in cluster.status("borrower")["message"]
    assert cluster.api.list("Job", cluster.ns, **{"wmtp.io/run": "borrower"}) == []
    cluster.until(lambda: "ServiceAccountNotAllowed" in {e["reason"] for e in cluster.events("borrower")}, "Event")
    # The operator's own, in its own namespace: refused even when someone labelled it.
    namespace, name = cluster.operator.env["WMTP_OPERATOR_SERVICE_ACCOUNT"].split("/")
    own = Cluster(cluster.api, cluster.operator, namespace)
    _account(own, name, **{"wmtp.io/trainer": "true"})
    own.create(make_run(**{"spec.serviceAccountName": name}), name="usurper")
    own.until(lambda: own.condition("Valid", "usurper") == "False ServiceAccountNotAllowed", "Valid=False")
    assert "is the operator's own ServiceAccount" in own.status("usurper")["message"]
    assert cluster.api.list("Job", namespace) == []


def test_a_refused_child_is_the_runs_status_and_an_event_without_a_retry_storm(
    cluster: Cluster, tiny_run: dict[str, Any]
) -> None:
    message = 'Job.batch "tiny-rho1-a1" is invalid: spec.template.spec.containers[0].image: Invalid value'
    cluster.api.refuse("Job", 422, "Invalid", message, namespace=cluster.ns)
    cluster.create(tiny_run)
    cluster.until(lambda: cluster.condition("Applied") == "False Refused", "Applied=False Refused")
    status = cluster.status()
    assert status["message"].startswith(f"the API server refused Job {RUN}-a1 (422 Invalid): {message}")
    cluster.until(lambda: "Refused" in {e["reason"] for e in cluster.events()}, "a Refused event")
    time.sleep(2)  # the next try is 30 s away: no blind retries meanwhile
    assert cluster.api.calls("create", "Job", cluster.ns) == 1 and cluster.jobs() == []
    assert len([e for e in cluster.events() if e["reason"] == "Refused"]) == 1


def test_a_forbidden_role_stops_the_attempt_before_its_job(cluster: Cluster, tiny_run: dict[str, Any]) -> None:
    cluster.api.refuse("Role", 403, "Forbidden", 'roles.rbac.authorization.k8s.io is forbidden: attempt to grant '
                       'extra privileges', namespace=cluster.ns)  # fmt: skip
    cluster.create(tiny_run)
    cluster.until(lambda: cluster.condition("Applied") == "False Refused", "Applied=False Refused")
    assert "(403 Forbidden): roles.rbac.authorization.k8s.io is forbidden" in cluster.status()["message"]
    assert cluster.jobs() == [] and cluster.api.calls("create", "Job", cluster.ns) == 0


def test_attempts_are_fenced_until_the_ended_attempts_pods_have_stopped(
    cluster: Cluster, tiny_run: dict[str, Any]
) -> None:
    cluster.api.kubelet(cluster.ns, hold_terminating=True)
    cluster.create(tiny_run)
    pods = cluster.running()
    cluster.api.exit(cluster.ns, pods[1], 1)  # the Job controller stops pod 0: it saves, and the kubelet holds it
    cluster.until(lambda: "waiting for 1 pod(s) of attempt 1 to stop" in cluster.status().get("message", ""), "fence")
    time.sleep(1)
    assert cluster.jobs() == [] and cluster.status()["phase"] == "Restarting"
    cluster.report(1, 1100, CKPT)  # its SIGTERM save, reported before it stops: still attempt 1's, still accepted
    cluster.until(lambda: cluster.status().get("latestCheckpoint") == CKPT, "the save accepted")
    cluster.api.release(cluster.ns)
    cluster.running(2)
    assert cluster.run()["spec"]["resumeFrom"] == CKPT and cluster.status()["restarts"] == 1


def test_suspend_removes_the_attempt_and_unsuspend_resumes_as_a_new_one(
    cluster: Cluster, tiny_run: dict[str, Any]
) -> None:
    cluster.create(tiny_run)
    cluster.running()
    cluster.report(1, 1000, CKPT)
    cluster.api.patch("WMTPRun", cluster.ns, RUN, {"spec": {"suspend": True}})
    cluster.until(lambda: cluster.status().get("phase") == "Suspended" and cluster.jobs() == [], "Suspended")
    assert cluster.api.get("ConfigMap", cluster.ns, f"{RUN}-config")
    cluster.api.patch("WMTPRun", cluster.ns, RUN, {"spec": {"suspend": False}})
    cluster.running(2)
    assert cluster.status()["restarts"] == 0 and cluster.run()["spec"]["resumeFrom"] == CKPT


def test_an_operational_edit_applies_from_the_next_attempt_and_the_status_says_so(
    cluster: Cluster, tiny_run: dict[str, Any]
) -> None:
    cluster.create(tiny_run)
    pods = cluster.running()
    cluster.api.patch("WMTPRun", cluster.ns, RUN, {"spec": {"image": "ghcr.io/wmtp/wmtp-trainer:0.2.0", "nodes": 3}})
    generation = cluster.run()["metadata"]["generation"]
    cluster.until(lambda: cluster.condition("SpecApplied") == "False NextAttempt", "SpecApplied=False")
    status = cluster.status()
    assert status["phase"] == "Running" and status["observedGeneration"] == generation
    assert "spec.image, spec.nodes" in next(c for c in status["conditions"] if c["type"] == "SpecApplied")["message"]
    cluster.api.exit(cluster.ns, pods[0], 1)
    cluster.until(
        lambda: cluster.status().get("attempt") == 2 and cluster.condition("SpecApplied") == "True Current", ""
    )
    job = cluster.api.get("Job", cluster.ns, f"{RUN}-a2")
    assert job["spec"]["completions"] == 3
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/wmtp/wmtp-trainer:0.2.0"


BOMBS = {
    "nested lists": "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
        f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n" for i in range(8)
    ),
    "nested mappings": "a: &a {k0: x, k1: x, k2: x, k3: x}\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} {{k0: *{chr(97 + i)}, k1: *{chr(97 + i)}, k2: *{chr(97 + i)}, "
        f"k3: *{chr(97 + i)}}}\n" for i in range(12)
    ),
    "merge keys": "a: &a {k0: x, k1: [x, x, x, x, x, x]}\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} {{<<: *{chr(97 + i)}, m: [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]}}\n" for i in range(10)
    ),
    "recursive": "a: &a [*a]\n",
    "deep nesting": "a: " + "[" * 5000 + "]" * 5000 + "\n",
    "long line, broken at its end": "a: [" + "x, " * 10_000 + "\n",
    "larger than a recipe may be": "a: '" + "x" * 40_000 + "'\n",
}  # fmt: skip


@pytest.mark.parametrize("shape", BOMBS, ids=list(BOMBS))
def test_an_alias_bomb_in_a_recipe_config_map_is_refused_briefly_while_other_runs_go_on(
    shape: str, cluster: Cluster, make_run: Callable[..., dict[str, Any]]
) -> None:
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bomb", "namespace": cluster.ns},
                  "data": {"recipe.yaml": BOMBS[shape]}}  # fmt: skip
    cluster.api.create(config_map)
    cluster.create(make_run(**{"spec.recipe": None, "spec.recipeRef": {"name": "bomb"}}), name="bombed")
    cluster.create(make_run(), name="neighbour")
    cluster.until(lambda: cluster.condition("Valid", "bombed") == "False InvalidSpec", "Valid=False")
    status = cluster.status("bombed")
    assert "recipeRef ConfigMap bomb key recipe.yaml" in status["message"] and len(status["message"]) <= MAX_MESSAGE
    assert all(len(e["message"]) <= MAX_MESSAGE for e in cluster.events("bombed"))
    cluster.running(name="neighbour")
    assert cluster.api.list("Job", cluster.ns, **{"wmtp.io/run": "bombed"}) == []


def test_a_recipe_edited_into_garbage_mid_run_is_reported_and_failures_are_still_handled(
    cluster: Cluster, make_run: Callable[..., dict[str, Any]], tiny_run: dict[str, Any]
) -> None:
    recipe = json.dumps(tiny_run["spec"]["recipe"])
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "recipes", "namespace": cluster.ns},
                  "data": {"recipe.yaml": recipe}}  # fmt: skip
    cluster.api.create(config_map)
    cluster.create(make_run(**{"spec.recipe": None, "spec.recipeRef": {"name": "recipes"}}))
    pods = cluster.running()
    rendered = cluster.api.get("ConfigMap", cluster.ns, f"{RUN}-config")
    cluster.api.patch("ConfigMap", cluster.ns, "recipes", {"data": {"recipe.yaml": BOMBS["nested lists"]}})
    cluster.api.exit(cluster.ns, pods[1], 1)
    cluster.running(2)
    assert cluster.condition("Valid") == "False InvalidSpec" and cluster.status()["restarts"] == 1
    assert cluster.api.get("ConfigMap", cluster.ns, f"{RUN}-config")["data"] == rendered["data"]


def test_a_run_recreated_under_the_same_name_never_adopts_the_old_runs_children(
    cluster: Cluster, tiny_run: dict[str, Any]
) -> None:
    old_uid = cluster.create(tiny_run)
    cluster.running()
    old_config = cluster.api.get("ConfigMap", cluster.ns, f"{RUN}-config")
    cluster.api.pause_gc()
    try:
        cluster.api.delete("WMTPRun", cluster.ns, RUN)  # no finalizer: gone at once, its children await the GC
        new_uid = cluster.create(tiny_run)
        cluster.until(lambda: cluster.condition("Applied") == "False Conflict", "Applied=False Conflict")
        time.sleep(1)
        (job,) = cluster.api.list("Job", cluster.ns)
        assert job["metadata"]["ownerReferences"][0]["uid"] == old_uid
        assert cluster.api.get("ConfigMap", cluster.ns, f"{RUN}-config") == old_config
    finally:
        cluster.api.resume_gc()
    cluster.running()
    for kind in ("ConfigMap", "Job", "Role"):
        (child,) = cluster.api.list(kind, cluster.ns)
        assert child["metadata"]["ownerReferences"][0]["uid"] == new_uid, kind


def test_a_succeeded_run_says_what_the_trainer_warned_about(cluster: Cluster, tiny_run: dict[str, Any]) -> None:
    cluster.create(tiny_run)
    pods = cluster.running()
    warning = "the final model was saved but its MLflow registration failed: 503 Service Unavailable"
    for pod in pods:
        cluster.api.exit(cluster.ns, pod, 0, {"reason": "Succeeded", "step": 60, "warnings": [warning]})
    cluster.until(lambda: cluster.status().get("phase") == "Succeeded", "Succeeded")
    assert warning in cluster.status()["message"]
    cluster.until(
        lambda: any(e["reason"] == "TrainerWarning" and warning in e["message"] for e in cluster.events()), ""
    )


def test_expansion_attempts_in_a_spec_reach_the_pod_as_text(
    cluster: Cluster, make_run: Callable[..., dict[str, Any]]
) -> None:
    tags = {"leak": "${AWS_SECRET_ACCESS_KEY}", "cmd": "$(AWS_SECRET_ACCESS_KEY)"}
    cluster.create(make_run(**{"spec.resume": "/$(AWS_SECRET_ACCESS_KEY)", "spec.recipe.run": {"tags": tags}}))
    cluster.running()
    job = cluster.api.get("Job", cluster.ns, f"{RUN}-a1")
    trainer = job["spec"]["template"]["spec"]["containers"][0]
    command = argv(trainer, {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "NODE_RANK": "0"})
    assert command[-2:] == ["--resume", "/$(AWS_SECRET_ACCESS_KEY)"] and "s3cr3t" not in " ".join(command)
    recipe = cluster.api.get("ConfigMap", cluster.ns, f"{RUN}-config")["data"]["recipe.yaml"]
    assert recipe.startswith(contract.RENDERED_MARKER) and "$(AWS_SECRET_ACCESS_KEY)" in recipe


EVAL = {"tasks": ["humaneval", "mbpp"], "k": [1], "limit": 4, "speedPrompts": 2,
        "datasets": {"mbpp": "s3://wmtp/data/mbpp.jsonl"}}  # fmt: skip


def _trained_with_eval(cluster: Cluster, make_run: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Training of a run with spec.eval succeeds; returns the evaluation's pod once the phase says Evaluating."""
    cluster.create(make_run(**{"spec.eval": EVAL}))
    pods = cluster.running()
    cluster.report(1, 60)
    for pod in pods:
        cluster.api.exit(cluster.ns, pod, 0, {"reason": contract.STOP_SUCCEEDED, "step": 60})
    cluster.until(lambda: cluster.status().get("phase") == "Evaluating", "phase Evaluating")
    return cluster.until(lambda: cluster.api.pods(cluster.ns, f"{RUN}-eval"), "the evaluation's pod")[0]


def _columns(run: dict[str, Any], crd: dict[str, Any]) -> dict[str, Any]:
    return {c["name"]: _column(run, c["jsonPath"]) for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}


def test_a_run_with_spec_eval_trains_then_evaluates_and_shows_the_results_in_status(
    cluster: Cluster, make_run: Callable[..., dict[str, Any]], crd: dict[str, Any]
) -> None:
    from wmtp.eval.command import headline
    from wmtp.eval.runner import summary
    from wmtp.reporting import Termination

    api, ns = cluster.api, cluster.ns
    pod = _trained_with_eval(cluster, make_run)
    assert _columns(cluster.run(), crd)["Phase"] == "Evaluating" and cluster.jobs() == [f"{RUN}-a1", f"{RUN}-eval"]
    job = api.get("Job", ns, f"{RUN}-eval")
    (owner,) = job["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["controller"], job["spec"]["backoffLimit"]) == (
        "WMTPRun", RUN, True, 0
    )  # fmt: skip
    (evaluator,) = job["spec"]["template"]["spec"]["containers"]
    command = argv(evaluator, {})
    assert command[:4] == ["wmtp", "eval", "--model", f"s3://wmtp/checkpoints/{RUN}/final"]
    assert command[command.index("--tasks") + 1] == "humaneval,mbpp" and "mbpp=s3://wmtp/data/mbpp.jsonl" in command
    assert evaluator["terminationMessagePath"] == contract.TERMINATION_LOG
    default = cluster.operator.env["WMTP_DEFAULT_MLFLOW_URI"]
    assert {"name": "MLFLOW_TRACKING_URI", "value": default} in evaluator["env"]

    # What `wmtp eval` leaves behind: its own termination message, made by its own code.
    report = {
        "model": f"s3://wmtp/checkpoints/{RUN}/final",
        "tasks": {"humaneval": {"problems": 4, "pass@1": 0.25}, "mbpp": {"problems": 4, "pass@1": 0.5}},
        "speed": {"prompts": 2, "tokens": 64, "identical": True, "greedy_tokens_per_s": 100.0, "heads": 4,
                  "speculative_tokens_per_s": 180.0, "speedup": 1.8, "tokens_per_pass": 2.0, "mean_accepted": 2.5},
        "mlflow_run_id": "0123456789abcdef0123456789abcdef",
    }  # fmt: skip
    words = Termination(contract.STOP_SUCCEEDED, 0, headline(report), eval=summary(report)).to_json()
    api.exit(ns, pod, 0, json.loads(words))
    cluster.until(lambda: cluster.status().get("phase") == "Succeeded", "phase Succeeded")
    status = cluster.status()
    assert status["eval"]["phase"] == "Succeeded" and status["eval"]["job"] == f"{RUN}-eval"
    assert status["eval"]["tasks"] == {
        "humaneval": {"problems": 4, "pass@1": 0.25},
        "mbpp": {"problems": 4, "pass@1": 0.5},
    }
    assert status["eval"]["speed"] == {
        "speedup": 1.8, "meanAccepted": 2.5, "tokensPerPass": 2.0, "identical": True, "greedyTokensPerS": 100.0,
        "speculativeTokensPerS": 180.0, "prompts": 2,
    }  # fmt: skip
    assert status["eval"]["mlflowRunId"] == report["mlflow_run_id"]
    line = "humaneval pass@1 0.250, mbpp pass@1 0.500, self-speculative decoding 1.80× greedy"
    columns = _columns(cluster.run(), crd)
    assert (columns["Phase"], columns["Eval"]) == ("Succeeded", line)
    assert columns["Message"] == f"attempt 1 succeeded; evaluation: {line}"
    assert cluster.condition("Evaluated") == "True Evaluated"
    scores = {"humaneval": 0.25, "mbpp": 0.5}
    cluster.metrics(lambda m: {task: sample(m, "wmtp_eval_pass_at_k", namespace=ns, run=RUN, task=task, k="1")
                               for task in scores} == scores, "pass@1 exported")  # fmt: skip
    cluster.until(
        lambda: any(e["reason"] == "Evaluated" and e["message"] == line for e in cluster.events()), "Evaluated"
    )
    assert {"Evaluating", "Succeeded"} <= {e["reason"] for e in cluster.events()}


def test_a_failed_evaluation_leaves_the_run_succeeded_with_a_warning(
    cluster: Cluster, make_run: Callable[..., dict[str, Any]], crd: dict[str, Any]
) -> None:
    pod = _trained_with_eval(cluster, make_run)
    said = "s3://wmtp/data/mbpp.jsonl: not found"
    cluster.api.exit(cluster.ns, pod, 3, {"reason": contract.STOP_FAILED, "exitCode": 3, "message": said})
    cluster.until(lambda: (cluster.status().get("eval") or {}).get("phase") == "Failed", "the evaluation failed")
    status = cluster.status()
    assert status["phase"] == "Succeeded" and cluster.condition("Evaluated") == "False EvaluationFailed"
    assert status["eval"]["message"] == f"pod {pod['metadata']['name']} container eval Error (exit code 3): {said}"
    assert _columns(cluster.run(), crd)["Eval"] == status["eval"]["message"]
    cluster.until(
        lambda: any(e["type"] == "Warning" and e["reason"] == "EvaluationFailed" and said in e["message"]
                    for e in cluster.events()), "a Warning EvaluationFailed"
    )  # fmt: skip
    assert cluster.jobs() == [f"{RUN}-a1", f"{RUN}-eval"]


def _nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


def test_a_deep_recipe_and_a_bracket_bomb_for_last_words_stop_nothing(
    cluster: Cluster, make_run: Callable[..., dict[str, Any]]
) -> None:
    # kopf decodes every object it lists and watches before any handler: ~990 levels used to end kopf.run.
    deep = make_run()
    deep["metadata"] = {"name": "deep", "namespace": cluster.ns}
    deep["spec"]["recipe"]["optim"] = {"lr": _nested(990)}  # set after the copies: deepcopy recurses
    cluster.api.create(deep)
    cluster.create(make_run(), name="bombed")
    pods = cluster.running(name="bombed")
    last_words = {"exitCode": 1, "reason": "Error", "message": "[" * 4000}  # what a trainer could write there
    failed = {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": last_words}}]}
    cluster.api.set_status(cluster.ns, pods[0], failed)
    cluster.until(lambda: cluster.status("bombed").get("restarts") == 1, "the bombed run restarted")
    cluster.until(lambda: cluster.condition("Valid", "deep") == "False InvalidSpec", "the deep run refused")
    assert "spec.recipe: nested more than 16 levels deep" in cluster.status("deep")["message"]
    cluster.create(make_run(), name="neighbour")
    for pod in cluster.running(name="neighbour"):
        cluster.api.exit(cluster.ns, pod, 0, {"reason": "Succeeded", "step": 60})
    cluster.until(lambda: cluster.status("neighbour").get("phase") == "Succeeded", "the neighbour succeeded")
    assert cluster.operator.alive() and cluster.api.list("Job", cluster.ns, **{"wmtp.io/run": "deep"}) == []
    cluster.api.delete("WMTPRun", cluster.ns, "deep")


def test_a_child_too_large_for_the_api_server_is_the_runs_status_once(
    cluster: Cluster, tiny_run: dict[str, Any]
) -> None:
    cluster.api.refuse("ConfigMap", 413, "RequestEntityTooLarge", "the request is too large", namespace=cluster.ns)
    cluster.create(tiny_run)
    cluster.until(lambda: cluster.condition("Applied") == "False Refused", "Applied=False Refused")
    assert "(413 RequestEntityTooLarge)" in cluster.status()["message"]
    time.sleep(2)  # backing off: no retry every few seconds
    assert cluster.api.calls("create", "ConfigMap", cluster.ns) == 1
    assert [e["reason"] for e in cluster.events()].count("Refused") == 1
