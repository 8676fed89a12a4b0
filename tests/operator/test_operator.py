"""The real operator process (`python -m wmtp_operator`, kopf) against an emulated API server (kmock).

The emulator runs no controllers, so the tests play the Job controller and the kubelet: they create an
attempt's pods and move them through their phases, and play trainer rank 0 with the trainer's own Reporter.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from support.emulator import Emulator, OperatorProcess, pod_status, pods_for
from support.waiting import wait_for
from wmtp.checkpoint import step_dir_name
from wmtp.contract import STATUS_PATH
from wmtp.reporting import Reporter

CKPT = f"s3://wmtp/checkpoints/tiny-rho1/{step_dir_name(1000)}"


class Cluster:
    """The emulator seen from one test, with waits that show the operator's log when they time out."""

    def __init__(self, emulator: Emulator, operator: OperatorProcess, namespace: str) -> None:
        self.api, self.operator, self.ns = emulator, operator, namespace

    def until(self, check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
        try:
            return wait_for(check, timeout=timeout, what=what)
        except TimeoutError as err:
            raise AssertionError(f"{err}\n--- operator log (tail) ---\n{self.operator.output()[-4000:]}") from None

    def run(self, name: str) -> dict[str, Any]:
        return self.api.get("WMTPRun", self.ns, name)

    def job(self, name: str) -> dict[str, Any] | None:
        return self.api.get("Job", self.ns, name)

    def start_pods(self, job: dict[str, Any], **status: Any) -> list[str]:
        names = [self.api.create(pod)["metadata"]["name"] for pod in pods_for(job)]
        self.set_pods(names, **status)
        return names

    def set_pods(self, names: list[str], **status: Any) -> None:
        for name in names:
            self.api.patch("Pod", self.ns, name, {"status": pod_status(**status)}, status=True)

    def phase_is(self, name: str, phase: str) -> bool:
        return (self.run(name).get("status") or {}).get("phase") == phase

    def event_reasons(self, name: str) -> list[str]:
        events = self.api.list("Event", self.ns)
        return [e["reason"] for e in events if e["involvedObject"]["name"] == name]


@pytest.fixture
def cluster(emulator: Emulator, operator_process: OperatorProcess, request: pytest.FixtureRequest) -> Cluster:
    # One namespace per test keeps the tests' runs, children and events apart on the shared emulator.
    return Cluster(emulator, operator_process, request.node.name.replace("_", "-")[:40].strip("-"))


def _new_run(body: dict[str, Any], namespace: str) -> dict[str, Any]:
    body = copy.deepcopy(body)
    body["metadata"] = {"name": body["metadata"]["name"], "namespace": namespace}
    return body


def _column(obj: dict[str, Any], json_path: str) -> Any:
    value: Any = obj
    for key in json_path.strip(".").split("."):
        value = (value or {}).get(key)
    return value


def test_run_resumes_from_the_latest_checkpoint_when_a_pod_fails_then_succeeds(
    cluster: Cluster, tiny_run: dict[str, Any], crd: dict[str, Any]
) -> None:
    api, ns = cluster.api, cluster.ns
    uid = api.create(_new_run(tiny_run, ns))["metadata"]["uid"]

    job1 = cluster.until(lambda: cluster.job("tiny-rho1-a1"), "the first attempt's Job")
    children = [api.get("ConfigMap", ns, "tiny-rho1-config"), api.get("Service", ns, "tiny-rho1"), job1]
    for child in children:
        assert child is not None
        (owner,) = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("WMTPRun", "tiny-rho1", uid, True)
    assert cluster.run("tiny-rho1")["status"]["attempt"] == 1

    pods = cluster.start_pods(job1, phase="Pending", pulling=True)
    cluster.until(lambda: cluster.phase_is("tiny-rho1", "Pulling"), "phase Pulling")
    cluster.set_pods(pods, phase="Running")
    cluster.until(lambda: cluster.phase_is("tiny-rho1", "Running"), "phase Running")

    # Rank 0 reports through the trainer's own reporter, as it would from the pod.
    reporter = Reporter(api.url + STATUS_PATH.format(namespace=ns, name="tiny-rho1"))
    assert reporter.report(1000, 2.5, CKPT) and reporter.report(1200, 2.25)

    cluster.set_pods(pods[1:], phase="Failed", exit_code=1)
    job2 = cluster.until(lambda: cluster.job("tiny-rho1-a2"), "the second attempt's Job")
    run = cluster.run("tiny-rho1")
    assert run["spec"]["resumeFrom"] == CKPT
    assert job2["spec"]["template"]["spec"]["containers"][0]["args"][-2:] == ["--resume", CKPT]
    assert (run["status"]["attempt"], run["status"]["restarts"]) == (2, 1)
    cluster.until(lambda: cluster.job("tiny-rho1-a1") is None, "the failed attempt's Job to be deleted")

    pods = cluster.start_pods(job2, phase="Running")
    cluster.until(lambda: cluster.phase_is("tiny-rho1", "Running"), "attempt 2 running")
    cluster.set_pods(pods, phase="Succeeded", exit_code=0)
    cluster.until(lambda: cluster.phase_is("tiny-rho1", "Succeeded"), "phase Succeeded")

    run = cluster.run("tiny-rho1")
    columns = {c["name"]: _column(run, c["jsonPath"]) for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns == {
        "Phase": "Succeeded",
        "Algorithm": "rho1-wmtp",
        "Step": 1200,
        "Restarts": 1,
        "Age": run["metadata"]["creationTimestamp"],
        "Checkpoint": CKPT,
    }
    conditions = {c["type"]: c["status"] for c in run["status"]["conditions"]}
    assert conditions == {"Valid": "True", "Progressing": "False", "Succeeded": "True"}
    reasons = cluster.until(lambda: (r := cluster.event_reasons("tiny-rho1")) and "Succeeded" in r and r, "events")
    assert {"Pending", "Pulling", "Running", "Restarting", "Succeeded"} <= set(reasons)


def test_invalid_recipe_sets_valid_false_with_the_message_and_creates_nothing(
    cluster: Cluster, make_run: Callable[..., dict[str, Any]]
) -> None:
    bad = make_run(**{"metadata.name": "bad-lr", "spec.recipe.optim": {"lr": -1}})
    cluster.api.create(_new_run(bad, cluster.ns))

    def valid_condition() -> dict[str, Any] | None:
        conditions = (cluster.run("bad-lr").get("status") or {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == "Valid"), None)

    valid = cluster.until(valid_condition, "the Valid condition")
    assert valid["status"] == "False" and "optim.lr: Input should be greater than 0" in valid["message"]
    assert cluster.until(lambda: "InvalidSpec" in cluster.event_reasons("bad-lr"), "an InvalidSpec event")
    for kind in ("ConfigMap", "Service", "Job"):
        assert cluster.api.list(kind, cluster.ns, **{"wmtp.io/run": "bad-lr"}) == []


def test_suspend_removes_the_attempt_and_unsuspend_resumes_as_a_new_one(
    cluster: Cluster, tiny_run: dict[str, Any]
) -> None:
    api, ns = cluster.api, cluster.ns
    api.create(_new_run(tiny_run, ns))
    job1 = cluster.until(lambda: cluster.job("tiny-rho1-a1"), "the first attempt")
    cluster.start_pods(job1, phase="Running")
    cluster.until(lambda: cluster.phase_is("tiny-rho1", "Running"), "phase Running")
    api.patch("WMTPRun", ns, "tiny-rho1", {"status": {"step": 1000, "latestCheckpoint": CKPT}}, status=True)

    api.patch("WMTPRun", ns, "tiny-rho1", {"spec": {"suspend": True}})
    cluster.until(lambda: cluster.phase_is("tiny-rho1", "Suspended"), "phase Suspended")
    cluster.until(lambda: cluster.job("tiny-rho1-a1") is None, "the attempt to be deleted")
    assert api.get("ConfigMap", ns, "tiny-rho1-config") and api.get("Service", ns, "tiny-rho1")

    api.patch("WMTPRun", ns, "tiny-rho1", {"spec": {"suspend": False}})
    job2 = cluster.until(lambda: cluster.job("tiny-rho1-a2"), "a new attempt")
    assert job2["spec"]["template"]["spec"]["containers"][0]["args"][-1] == CKPT
    assert cluster.run("tiny-rho1")["status"]["restarts"] == 0


def test_an_operator_restarted_after_a_crash_picks_up_where_the_last_one_stopped(
    emulator: Emulator, operator_process: OperatorProcess, tiny_run: dict[str, Any], tmp_path: Any
) -> None:
    ns = "operator-restart"
    first = Cluster(emulator, operator_process, ns)
    emulator.create(_new_run(tiny_run, ns))
    job1 = first.until(lambda: first.job("tiny-rho1-a1"), "the first attempt")
    pods = first.start_pods(job1, phase="Running")
    first.until(lambda: first.phase_is("tiny-rho1", "Running"), "phase Running")

    operator_process.kill()
    second = Cluster(emulator, OperatorProcess(emulator, tmp_path), ns)
    try:
        second.set_pods(pods[:1], phase="Failed", exit_code=1)
        second.until(lambda: second.job("tiny-rho1-a2"), "the restarted operator to start attempt 2")
        second.until(lambda: second.job("tiny-rho1-a1") is None, "attempt 1 to be deleted")
        status = second.run("tiny-rho1")["status"]
        assert (status["attempt"], status["restarts"], status["phase"]) == (2, 1, "Restarting")
        assert [j["metadata"]["name"] for j in emulator.list("Job", ns)] == ["tiny-rho1-a2"]
    finally:
        second.operator.stop()
