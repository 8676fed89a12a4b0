"""The operator's Prometheus metrics: every definition, and how one reconcile pass updates them.

Names follow controller-runtime's where it has one (`wmtp_reconcile_total{result}`,
`wmtp_reconcile_duration_seconds`); the run-level ones are this operator's own. Where each number comes from:

- restarts and preemptions: the operator's own record (`wmtp.io/state`), which carries the counts its decisions
  write, never the status a trainer may overwrite and never a log line. A counter goes up by what a run's count
  rose between the last record this process knew (read or written) and the one the pass leaves, labelled with the
  reason the ending recorded; the first record seen of a run is the baseline (counters start at 0 with the process).
- runs by phase and pass@k: one snapshot per run, replaced by each pass and dropped when the run is deleted, read
  at scrape time, so the gauges are exact rather than a running sum of increments.
- seconds since checkpoint: neither the record nor the status holds when a checkpoint was made, so this is the
  time since this process saw a pass accept a new one (rank 0's report triggers that pass at once). A run whose
  checkpoint has not moved since the operator started has no series until it does, rather than a guess.

Label values that come from a cluster (reasons) are CamelCase words or `Other`, and at most MAX_REASONS of them.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, get_args

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wmtp_operator.plan import PatchRun, Plan
from wmtp_operator.state import State
from wmtp_operator.status import Phase

PHASES: tuple[str, ...] = get_args(Phase)
TRAINING = ("Pending", "Pulling", "Running", "Restarting")  # the phases in which checkpoints are expected to move
RESULTS = ("success", "error", "requeue")
MAX_REASONS = 32
# A pass is mostly API calls (read timeout 30 s): controller-runtime's range, coarser.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_REASON = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
_PASS_AT = re.compile(r"pass@([0-9]{1,4})")
Outcome = tuple[Mapping[str, Any], Plan] | BaseException | None  # a pass's (body, plan), its error, or: deleted


@dataclass(frozen=True)
class Snapshot:
    """One run as its last pass left it."""

    uid: str
    phase: str | None
    state: State
    checkpoint_at: float | None  # when this process saw the accepted checkpoint move (Unix time)


def result_of(outcome: Outcome) -> str:
    """controller-runtime's result label: error, requeue (the pass asked to look again soon), or success."""
    if isinstance(outcome, BaseException):
        return "error"
    return "requeue" if outcome is not None and outcome[1].requeue_after is not None else "success"


def record_after(body: Mapping[str, Any], plan: Plan) -> State:
    """The record the pass leaves: the last one its plan writes, else the one it read."""
    written = [action.state for action in plan.actions if isinstance(action, PatchRun) and action.state]
    return written[-1] if written else State.load(body.get("metadata") or {})[0]


def counted(before: State, after: State) -> list[tuple[str, str, int]]:
    """(restarts|preemptions, reason, how many) the operator decided between two records of one run. The reason is
    the recorded ending's of that cause: the current one, or the one the current attempt was started after."""
    found = []
    for field, cause in (("restarts", "failure"), ("preemptions", "preemption")):
        more = getattr(after, field) - getattr(before, field)
        if more > 0:
            ending = next((e for e in (after.ending, after.previous) if e is not None and e.cause == cause), None)
            found.append((field, ending.reason if ending else "", more))
    return found


def advance(
    body: Mapping[str, Any], plan: Plan, before: Snapshot | None, now: float
) -> tuple[Snapshot, list[tuple[str, str, int]]]:
    """The run after a pass, and the restarts and preemptions decided since the last record known (`before`'s; for
    a run not seen yet, the one the pass read). The phase is the one the pass wrote (one that is none of the
    operator's, from a refused pass's unchanged status, keeps the last known one)."""
    meta = body.get("metadata") or {}
    uid = str(meta.get("uid", ""))
    before = before if before is not None and before.uid == uid else None  # a namesake is another run
    known = before.state if before else State.load(meta)[0]
    phase = {**(body.get("status") or {}), **plan.status}.get("phase")
    if phase not in PHASES:
        phase = before.phase if before else None
    state = record_after(body, plan)
    if state.checkpoint and state.checkpoint != known.checkpoint:
        checkpoint_at: float | None = now
    else:
        checkpoint_at = before.checkpoint_at if before and state.checkpoint else None
    return Snapshot(uid, phase, state, checkpoint_at), counted(known, state)


def scores(state: State) -> list[tuple[str, str, float]]:
    """(task, k, pass@k) of a succeeded evaluation, from the record (its values checked when it was written)."""
    evaluation = state.evaluation
    if evaluation is None or evaluation.phase != "Succeeded":
        return []
    return [
        (task, match.group(1), value)
        for task, values in sorted(evaluation.tasks.items())
        for key, value in sorted(values.items())
        if (match := _PASS_AT.fullmatch(key))
    ]


def families(runs: Mapping[tuple[str, str], Snapshot], now: float) -> list[Metric]:
    """The run-level metrics at scrape time."""
    by_phase = GaugeMetricFamily("wmtp_runs", "WMTPRuns by phase.", labels=["phase"])
    for phase in PHASES:
        by_phase.add_metric([phase], sum(1 for run in runs.values() if run.phase == phase))
    since = GaugeMetricFamily(
        "wmtp_seconds_since_checkpoint",
        "Seconds since the operator accepted the run's latest checkpoint (runs in a training phase).",
        labels=["namespace", "run"],
    )
    pass_at_k = GaugeMetricFamily(
        "wmtp_eval_pass_at_k", "pass@k of the final model's evaluation.", labels=["namespace", "run", "task", "k"]
    )
    for (namespace, name), run in sorted(runs.items()):
        if run.checkpoint_at is not None and run.phase in TRAINING:
            since.add_metric([namespace, name], max(0.0, now - run.checkpoint_at))
        for task, k, value in scores(run.state):
            pass_at_k.add_metric([namespace, name, task, k], value)
    return [by_phase, since, pass_at_k]


class Metrics(Collector):
    """The metrics of one operator process: `observe` after every pass, `forget` once a run is gone."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.reconciles = Counter("wmtp_reconcile", "Reconcile passes by result.", ["result"], registry=registry)
        self.duration = Histogram(
            "wmtp_reconcile_duration_seconds", "How long a reconcile pass took.", buckets=BUCKETS, registry=registry
        )
        self.counters = {
            "restarts": Counter("wmtp_restarts", "Restarts the operator decided, by reason.", ["reason"],
                                registry=registry),
            "preemptions": Counter("wmtp_preemptions", "Preemptions the operator decided, by reason.", ["reason"],
                                   registry=registry),
        }  # fmt: skip
        for result in RESULTS:
            self.reconciles.labels(result)
        self._runs: dict[tuple[str, str], Snapshot] = {}
        self._reasons: dict[str, set[str]] = {field: set() for field in self.counters}
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, namespace: str, name: str, seconds: float, outcome: Outcome) -> None:
        """After one pass over a run: its result and duration; the run's counts, phase and checkpoint."""
        self.reconciles.labels(result_of(outcome)).inc()
        self.duration.observe(seconds)
        if outcome is not None and not isinstance(outcome, BaseException):
            body, plan = outcome
            key = (namespace, name)
            after, decided = advance(body, plan, self._runs.get(key), time.time())
            for field, reason, more in decided:
                self.counters[field].labels(self._label(field, reason)).inc(more)
            with self._lock:
                self._runs[key] = after

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._runs.pop((namespace, name), None)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            runs = dict(self._runs)
        return families(runs, time.time())

    def _label(self, field: str, reason: str) -> str:
        """A reason as a label: a CamelCase word, one of the first MAX_REASONS seen, else Other."""
        seen = self._reasons[field]
        if not _REASON.fullmatch(reason) or (reason not in seen and len(seen) >= MAX_REASONS):
            return "Other"
        seen.add(reason)
        return reason


def serve(port: int) -> None:
    """/metrics on `port` (all addresses), from a daemon thread."""
    start_http_server(port)
