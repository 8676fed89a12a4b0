"""The operator SIGKILLed right after each API call of a restart, and started again: the run ends exactly where an
uninterrupted restart ends (attempt 2 running from the accepted checkpoint, one restart counted, one Job)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.emulator import Call, Emulator, OperatorProcess, kill_on
from support.waiting import wait_for
from wmtp import contract
from wmtp.checkpoint import step_dir_name
from wmtp_operator.state import STATE_ANNOTATION

RUN = "tiny-rho1"
CKPT = f"s3://wmtp/checkpoints/{RUN}/{step_dir_name(1000)}"


def _writes_state(call: Call) -> bool:
    return call.kind == "WMTPRun" and STATE_ANNOTATION in ((call.data or {}).get("metadata") or {}).get(
        "annotations", {}
    )


def _nth(n: int, matches: Callable[[Call], bool]) -> Callable[[Call], bool]:
    seen = [0]

    def counted(call: Call) -> bool:
        if matches(call):
            seen[0] += 1
        return seen[0] == n and matches(call)

    return counted


# Every call the operator makes for one restart, in order: the kill lands right after it.
BOUNDARIES = {
    "the ending recorded": _nth(1, _writes_state),
    "attempt 1's Job deleted": lambda c: c.verb == "delete" and c.kind == "Job",
    "the status saying Restarting": lambda c: c.kind == "WMTPRun" and c.subresource == "status",
    "spec.resumeFrom written": lambda c: c.kind == "WMTPRun" and "resumeFrom" in ((c.data or {}).get("spec") or {}),
    "the ConfigMap updated": lambda c: c.verb == "update" and c.kind == "ConfigMap",
    "attempt 2's Job created": lambda c: c.verb == "create" and c.kind == "Job",
    "attempt 2 recorded": _nth(2, _writes_state),
}


class Operators:
    """One operator at a time; each test kills the current one and starts its successor."""

    def __init__(self, emulator: Emulator, workdir: Path) -> None:
        self.emulator, self.workdir = emulator, workdir
        self.current = OperatorProcess(emulator, workdir)

    def restart(self) -> OperatorProcess:
        self.current.process.wait(timeout=30)  # killed by the hook
        self.current = OperatorProcess(self.emulator, self.workdir)
        return self.current


def running(
    emulator: Emulator, operators: Operators, ns: str, body: dict[str, Any]
) -> tuple[Callable[[], dict[str, Any]], Callable[[Callable[[], Any], str], Any]]:
    """The run created in `ns` and its attempt 1 running; then its status, and a wait that shows the current
    operator's log when it times out."""

    def status() -> dict[str, Any]:
        return (emulator.get("WMTPRun", ns, RUN) or {}).get("status") or {}

    def until(check: Callable[[], Any], what: str) -> Any:
        try:
            return wait_for(check, timeout=20, what=what)
        except TimeoutError as err:
            raise AssertionError(f"{err}\n{operators.current.output()[-3000:]}") from None

    emulator.create({**body, "metadata": {"name": RUN, "namespace": ns}})
    until(lambda: status().get("phase") == "Running", "attempt 1 running")
    return status, until


@pytest.fixture(scope="module")
def operators(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operators]:
    chain = Operators(emulator, tmp_path_factory.mktemp("operators"))
    yield chain
    chain.current.stop()


@pytest.mark.parametrize("boundary", BOUNDARIES, ids=list(BOUNDARIES))
def test_an_operator_killed_at_any_point_of_a_restart_ends_where_an_uninterrupted_one_does(
    boundary: str, operators: Operators, emulator: Emulator, tiny_run: dict[str, Any]
) -> None:
    ns = f"killed-{zlib.crc32(boundary.encode()):08x}"

    status, until = running(emulator, operators, ns, tiny_run)
    report = {"attempt": 1, "step": 1000, "loss": 2.5, "latestCheckpoint": CKPT}
    emulator.patch("WMTPRun", ns, RUN, {"status": {contract.REPORT_FIELD: report}}, status=True)
    until(lambda: status().get("latestCheckpoint") == CKPT, "the checkpoint accepted")

    emulator.after(lambda call: call.namespace == ns and BOUNDARIES[boundary](call), kill_on(operators.current))
    pods = emulator.pods(ns, f"{RUN}-a1")
    emulator.exit(ns, pods[1], 1)
    operators.restart()

    until(lambda: status().get("phase") == "Running" and status().get("attempt") == 2, "attempt 2 running")
    final = status()
    assert (final["restarts"], final["preemptions"], final["resumeFrom"]) == (1, 0, CKPT)
    assert [job["metadata"]["name"] for job in emulator.list("Job", ns)] == [f"{RUN}-a2"]
    assert emulator.get("WMTPRun", ns, RUN)["spec"]["resumeFrom"] == CKPT
    for kind in ("ConfigMap", "Service", "NetworkPolicy", "ServiceAccount", "Role", "RoleBinding"):
        assert len(emulator.list(kind, ns)) == 1, kind


def _evaluation(phase: str) -> Callable[[Call], bool]:
    """A write of the state recording the evaluation as `phase`."""

    def matches(call: Call) -> bool:
        if not _writes_state(call):
            return False
        recorded = json.loads(call.data["metadata"]["annotations"][STATE_ANNOTATION])
        return (recorded.get("evaluation") or {}).get("phase") == phase

    return matches


EVAL_BOUNDARIES = {
    "the eval Job created": lambda c: c.verb == "create" and (c.data or {}).get("metadata", {}).get("name") == EVAL_JOB,
    "the evaluation recorded": _evaluation("Running"),
    "its results recorded": _evaluation("Succeeded"),
}
EVAL_JOB = f"{RUN}-eval"


@pytest.mark.parametrize("boundary", EVAL_BOUNDARIES, ids=list(EVAL_BOUNDARIES))
def test_an_operator_killed_during_the_evaluation_creates_one_eval_job_and_keeps_its_results(
    boundary: str, operators: Operators, emulator: Emulator, tiny_run: dict[str, Any]
) -> None:
    ns = f"killed-eval-{zlib.crc32(boundary.encode()):08x}"

    spec = {**tiny_run["spec"], "eval": {"tasks": ["humaneval"], "speedPrompts": 0}}
    status, until = running(emulator, operators, ns, {**tiny_run, "spec": spec})
    emulator.after(lambda call: call.namespace == ns and EVAL_BOUNDARIES[boundary](call), kill_on(operators.current))
    for pod in emulator.pods(ns, f"{RUN}-a1"):
        emulator.exit(ns, pod, 0)
    if boundary != "its results recorded":
        operators.restart()
    until(lambda: status().get("phase") == "Evaluating", "phase Evaluating")
    (pod,) = until(lambda: emulator.pods(ns, EVAL_JOB), "the evaluation's pod")
    results = {"tasks": {"humaneval": {"problems": 164, "pass@1": 0.125}}, "speed": None, "mlflow_run_id": None}
    words = {"reason": contract.STOP_SUCCEEDED, "exitCode": 0, "message": "humaneval pass@1 0.125", "eval": results}
    emulator.exit(ns, pod, 0, words)
    if boundary == "its results recorded":
        operators.restart()
    until(lambda: status().get("phase") == "Succeeded", "phase Succeeded")
    assert status()["eval"]["tasks"] == results["tasks"] and status()["eval"]["message"] == "humaneval pass@1 0.125"
    assert sorted(job["metadata"]["name"] for job in emulator.list("Job", ns)) == [f"{RUN}-a1", EVAL_JOB]
    assert len(emulator.pods(ns, EVAL_JOB)) == 1
