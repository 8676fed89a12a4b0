"""The metrics' update functions: what a pass's record and status make of the counters and the run-level gauges.

The operator process's own /metrics during a real restart is scraped in test_operator.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from wmtp_operator.metrics import MAX_REASONS, Metrics, Snapshot, advance, counted, families, result_of
from wmtp_operator.plan import PatchRun, Plan
from wmtp_operator.state import Ending, State
from wmtp_operator.status import Evaluation

CKPT = "s3://wmtp/checkpoints/tiny-rho1/checkpoint_step_00001000"
LATER = "s3://wmtp/checkpoints/tiny-rho1/checkpoint_step_00001200"
UID = "0d2c1b7e-run-uid"


def ended(cause: str = "failure", reason: str = "Error", attempt: int = 1) -> Ending:
    return Ending(attempt=attempt, cause=cause, reason=reason, message="m")  # type: ignore[arg-type]


def body(state: State = State(), phase: str | None = "Running", uid: str = UID) -> dict[str, Any]:
    annotations = {"wmtp.io/state": state.dump()} if state != State() else {}
    return {"metadata": {"uid": uid, "annotations": annotations}, "status": {"phase": phase} if phase else {}}


def plan(written: State | None = None, **status: Any) -> Plan:
    return Plan(actions=[PatchRun(written.patch(), written)] if written else [], status=status)


@dataclass
class Counted:
    name: str
    before: State
    after: State
    expected: list[tuple[str, str, int]] = field(default_factory=list)


COUNTED = [
    Counted("nothing ended", State(attempt=1), State(attempt=1)),
    Counted("a crash recorded with its count", State(attempt=1),
            State(attempt=1, restarts=1, ending=ended()), [("restarts", "Error", 1)]),
    Counted("an eviction: a preemption", State(attempt=1),
            State(attempt=1, preemptions=1, ending=ended("preemption", "EvictionByEvictionAPI")),
            [("preemptions", "EvictionByEvictionAPI", 1)]),
    Counted("ended and the next attempt created in one pass: the reason is the previous ending's", State(attempt=1),
            State(attempt=2, restarts=1, previous=ended(reason="OOMKilled")), [("restarts", "OOMKilled", 1)]),
    Counted("a failure reclassified as a preemption counts the preemption; the restart stays counted",
            State(attempt=1, restarts=1, ending=ended()),
            State(attempt=1, preemptions=1, ending=ended("preemption", "Evicted")), [("preemptions", "Evicted", 1)]),
    Counted("a suspension counts nothing", State(attempt=1), State(attempt=1, ending=ended("suspend", "Suspended"))),
    Counted("a record rebuilt with lower counts counts nothing", State(attempt=3, restarts=2), State(attempt=3)),
]  # fmt: skip


@pytest.mark.parametrize("case", COUNTED, ids=[c.name for c in COUNTED])
def test_restarts_and_preemptions_are_the_counts_the_record_gained(case: Counted) -> None:
    assert counted(case.before, case.after) == case.expected


def test_the_result_label_follows_controller_runtime() -> None:
    assert result_of(({}, Plan())) == "success"
    assert result_of(({}, Plan(requeue_after=3.0))) == "requeue"
    assert result_of(RuntimeError("HTTP 500")) == "error"
    assert result_of(None) == "success"  # the run is gone: nothing to do


def test_a_pass_leaves_the_phase_it_wrote_and_the_record_it_wrote() -> None:
    written = State(attempt=1, restarts=1, ending=ended())
    after, decided = advance(body(State(attempt=1)), plan(written, phase="Restarting"), None, now=100.0)
    assert (after.phase, after.state, decided) == ("Restarting", written, [("restarts", "Error", 1)])
    unchanged, decided = advance(body(written, phase="Restarting"), plan(), after, now=101.0)
    assert (unchanged.phase, unchanged.state, decided) == ("Restarting", written, [])


def test_a_phase_that_is_none_of_the_operators_keeps_the_last_known_one() -> None:
    before = Snapshot(UID, "Running", State(attempt=1), None)
    after, _ = advance(body(State(attempt=1), phase="Exploded"), plan(), before, now=1.0)
    assert after.phase == "Running"


def test_the_checkpoint_time_is_when_a_pass_saw_it_move_and_unknown_before_that() -> None:
    first, _ = advance(body(State(attempt=1, checkpoint=CKPT)), plan(), None, now=50.0)
    assert first.checkpoint_at is None  # accepted before this process started: no guess
    moved, _ = advance(body(State(attempt=1, checkpoint=CKPT)), plan(State(attempt=1, checkpoint=LATER)), first, 60.0)
    assert moved.checkpoint_at == 60.0
    kept, _ = advance(body(State(attempt=1, checkpoint=LATER)), plan(), moved, now=90.0)
    assert kept.checkpoint_at == 60.0
    new_run, _ = advance(body(State(attempt=1, checkpoint=LATER), uid="another"), plan(), kept, now=95.0)
    assert new_run.checkpoint_at is None  # a namesake is another run


def test_a_namesake_starts_from_its_own_record_not_the_old_runs() -> None:
    before = Snapshot(UID, "Running", State(attempt=4, restarts=3), None)
    after, decided = advance(body(State(attempt=1), uid="another"), plan(State(attempt=1, restarts=1,
                             ending=ended())), before, now=1.0)  # fmt: skip
    assert decided == [("restarts", "Error", 1)] and after.uid == "another"


def _values(metrics: list[Any]) -> dict[tuple[str, tuple[str, ...]], float]:
    return {(m.name, tuple(s.labels.values())): s.value for m in metrics for s in m.samples}


def test_run_level_gauges_are_exact_at_scrape_time() -> None:
    scored = Evaluation(phase="Succeeded", job="r-eval", tasks={"humaneval": {"problems": 4, "pass@1": 0.25,
                                                                              "pass@10": 0.5}})  # fmt: skip
    runs = {
        ("a", "training"): Snapshot(UID, "Running", State(attempt=1, checkpoint=CKPT), checkpoint_at=70.0),
        ("a", "unknown"): Snapshot(UID, "Running", State(attempt=1, checkpoint=CKPT), checkpoint_at=None),
        ("b", "done"): Snapshot(UID, "Succeeded", State(attempt=1, checkpoint=CKPT, evaluation=scored), 10.0),
    }
    values = _values(families(runs, now=100.0))
    assert {labels[0]: v for (name, labels), v in values.items() if name == "wmtp_runs"} == {
        "Pending": 0, "Pulling": 0, "Running": 2, "Restarting": 0, "Suspended": 0, "Evaluating": 0, "Succeeded": 1,
        "Failed": 0,
    }  # fmt: skip
    since = {labels: v for (name, labels), v in values.items() if name == "wmtp_seconds_since_checkpoint"}
    assert since == {("a", "training"): 30.0}  # not the run whose checkpoint time is unknown, nor a finished one
    assert {labels: v for (name, labels), v in values.items() if name == "wmtp_eval_pass_at_k"} == {
        ("b", "done", "humaneval", "1"): 0.25,
        ("b", "done", "humaneval", "10"): 0.5,
    }


def _scrape(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_observe_counts_passes_decisions_and_forgets_deleted_runs() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    running = State(attempt=1, checkpoint=CKPT)
    metrics.observe("a", "r", 0.02, (body(running), plan()))
    metrics.observe("a", "r", 0.03, RuntimeError("HTTP 500"))
    crashed = running.model_copy(update={"restarts": 1, "ending": ended()})
    metrics.observe("a", "r", 0.5, (body(running), plan(crashed, phase="Restarting")))
    metrics.observe("a", "r", 0.01, (body(crashed, "Restarting"), Plan(requeue_after=2.0)))  # the same record again
    scraped = _scrape(registry)
    assert {result: scraped[("wmtp_reconcile_total", frozenset({("result", result)}))]
            for result in ("success", "error", "requeue")} == {"success": 2, "error": 1, "requeue": 1}  # fmt: skip
    assert scraped[("wmtp_reconcile_duration_seconds_count", frozenset())] == 4
    assert scraped[("wmtp_reconcile_duration_seconds_sum", frozenset())] == pytest.approx(0.56)
    assert scraped[("wmtp_restarts_total", frozenset({("reason", "Error")}))] == 1
    assert scraped[("wmtp_runs", frozenset({("phase", "Restarting")}))] == 1
    metrics.forget("a", "r")
    assert _scrape(registry)[("wmtp_runs", frozenset({("phase", "Restarting")}))] == 0


def test_reasons_are_bounded_words() -> None:
    metrics = Metrics(CollectorRegistry())
    for i in range(MAX_REASONS + 5):
        metrics.observe("a", f"r{i}", 0.0, (body(State(attempt=1)), plan(State(attempt=1, restarts=1,
                        ending=ended(reason=f"Reason{i}")))))  # fmt: skip
    metrics.observe("a", "odd", 0.0, (body(State(attempt=1)), plan(State(attempt=1, restarts=1,
                    ending=ended(reason="not a {label}")))))  # fmt: skip
    labels = {s.labels["reason"]: s.value for s in metrics.counters["restarts"].collect()[0].samples
              if s.name.endswith("_total")}  # fmt: skip
    assert len(labels) == MAX_REASONS + 1 and labels["Other"] == 6
