"""The evaluation after training (spec.eval), decided purely: once the training has succeeded, create the Job
<run>-eval, watch it, and record how it ended: its results, read from the termination message `wmtp eval` leaves
(`contract.TERMINATION_EVAL`), or the one line saying why it failed.

The record lives in the run's state annotation (`State.evaluation`), written after the Job's creation and again
when it ends, so an operator restarted at any point neither creates a second Job (the name is fixed, and a Job
of that name this run controls is taken as created) nor loses a result. The training did succeed whatever the
evaluation does: the run ends Succeeded, with condition Evaluated saying how the evaluation went.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic.alias_generators import to_camel

from wmtp import contract
from wmtp_operator import pods as podstat
from wmtp_operator import render
from wmtp_operator.plan import Action, Create, Event, PatchRun, backoff_seconds, say
from wmtp_operator.spec import Run
from wmtp_operator.state import State, seconds_since
from wmtp_operator.status import Condition, Evaluation

Obj = Mapping[str, Any]
_SCORE = re.compile(r"^(problems|pass@[0-9]{1,4})$")


@dataclass
class Decision:
    """What the evaluation adds to a pass over a run whose training succeeded."""

    phase: str  # Evaluating while it runs (or waits to be created), then Succeeded
    message: str  # the evaluation's part of the run's message
    state: State
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    conditions: dict[str, Condition] = field(default_factory=dict)
    requeue: float | None = None
    pending: bool = False  # not over: the run needs more passes


def decide(
    run: Run, state: State, jobs: Sequence[Obj], pods: Sequence[Obj], now: str, generation: int
) -> Decision | None:
    """For a run whose training succeeded; None when there is nothing to evaluate (no spec.eval, none recorded).
    `jobs` and `pods` are this run's evaluation Jobs and pods."""
    record = state.evaluation
    if record is None:
        return None if run.spec.eval is None else _start(run, state, now, generation)
    if record.phase == "Running":
        return _watch(state, record, jobs, pods, now, generation)
    return Decision("Succeeded", _summary(record), state, conditions={"Evaluated": _condition(record, now, generation)})


def _start(run: Run, state: State, now: str, generation: int) -> Decision:
    refused = state.refused
    if refused is not None and refused.generation == generation:
        wait = backoff_seconds(refused.count) - seconds_since(refused.at, now)
        if wait > 0:
            why = f"{refused.message}; retrying in {wait:.0f}s, or at once when the spec changes"
            return Decision("Evaluating", why, state, requeue=wait, pending=True)
    job = render.eval_job(run)
    name = job["metadata"]["name"]
    record = Evaluation(phase="Running", job=name, start_time=now)
    started = state.model_copy(update={"evaluation": record, "refused": None})
    return Decision(
        "Evaluating",
        say(f"evaluating {render.final_model(run)} in Job {name}"),
        started,
        [Create(job), PatchRun(started.patch(), started)],
        conditions={"Applied": _set("Applied", "True", "Created", f"Job {name} exists", now, generation)},
        pending=True,
    )


def _watch(
    state: State, record: Evaluation, jobs: Sequence[Obj], pods: Sequence[Obj], now: str, generation: int
) -> Decision:
    job = next((j for j in jobs if j["metadata"]["name"] == record.job), None)
    mine = sorted(pods, key=lambda p: p["metadata"]["name"])
    ended = outcome(job, mine, record.job)
    if ended is None:
        waiting = next((w for w in map(podstat.waiting, mine) if w), None)
        where = f"; {waiting}" if waiting else ""
        return Decision("Evaluating", say(f"evaluating in Job {record.job}{where}"), state, pending=True)
    said, text = ended
    update: dict[str, Any] = {"phase": "Failed", "message": say(text), "completion_time": now}
    events = []
    if said is not None:
        update.update(phase="Succeeded", **results(said))
        events.append(Event("Normal", "Evaluated", say(text)))
    done = Evaluation.model_validate({**record.model_dump(), **update})
    new = state.model_copy(update={"evaluation": done})
    return Decision(
        "Succeeded",
        _summary(done),
        new,
        [PatchRun(new.patch(), new)],
        events,
        {"Evaluated": _condition(done, now, generation)},
    )


def outcome(job: Obj | None, pods: Sequence[Obj], name: str) -> tuple[dict[str, Any] | None, str] | None:
    """How the evaluation ended: (the termination message, its headline) on success, (None, why) on failure;
    None while it runs."""
    for pod in pods:
        if (pod.get("status") or {}).get("phase") == "Succeeded":
            said = podstat.termination(podstat.container(pod, render.EVALUATION))
            if said.get(contract.TERMINATION_REASON) != contract.STOP_SUCCEEDED:
                return None, f"pod {pod['metadata']['name']} succeeded but left no readable termination message"
            headline = said.get(contract.TERMINATION_MESSAGE)
            return said, headline if isinstance(headline, str) and headline else "evaluated"
    stop = next((s for s in map(podstat.pod_stop, pods) if s and s.how != "deleted"), None)
    if stop is not None:
        return None, stop.message
    if job is None or job["metadata"].get("deletionTimestamp"):
        return None, f"Job {name} was deleted before the evaluation ended"
    failed = podstat.condition(job, "Failed")
    if failed:
        return None, f"Job {name} failed: {failed.get('reason', '')} {failed.get('message', '')}".rstrip()
    return None


def results(said: Mapping[str, Any]) -> dict[str, Any]:
    """The results a termination message holds, every value checked (a pod wrote them): the tasks the contract
    knows with their problem counts and pass@k, the speed fields with their types, the MLflow run id."""
    raw = said.get(contract.TERMINATION_EVAL)
    raw = raw if isinstance(raw, Mapping) else {}
    tasks: dict[str, dict[str, float]] = {}
    found = raw.get("tasks")
    for task, scores in found.items() if isinstance(found, Mapping) else ():
        if task in contract.EVAL_TASKS and isinstance(scores, Mapping):
            kept = [
                (k, float(v)) for k, v in scores.items() if isinstance(k, str) and _SCORE.match(k) and _is(v, float)
            ]
            tasks[task] = dict(kept[: 1 + contract.MAX_EVAL_SCORES])
    speed = raw.get("speed")
    speed = {
        to_camel(key): value
        for key, value in (speed.items() if isinstance(speed, Mapping) else ())
        if key in contract.EVAL_SPEED_FIELDS and _is(value, contract.EVAL_SPEED_FIELDS[key])
    }
    run_id = raw.get("mlflow_run_id")
    valid_id = isinstance(run_id, str) and re.match(contract.MLFLOW_RUN_ID, run_id) is not None
    return {"tasks": tasks, "speed": speed or None, "mlflow_run_id": run_id if valid_id else None}


def _is(value: Any, kind: type) -> bool:
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    if kind is int:
        return isinstance(value, int) and abs(value) < 2**53
    return isinstance(value, int | float) and math.isfinite(value) and abs(value) < 1e300


def _summary(record: Evaluation) -> str:
    return f"evaluation: {record.message}" if record.phase == "Succeeded" else f"evaluation failed: {record.message}"


def _condition(record: Evaluation, now: str, generation: int) -> Condition:
    if record.phase == "Succeeded":
        return _set("Evaluated", "True", "Evaluated", record.message or "", now, generation)
    return _set("Evaluated", "False", "EvaluationFailed", record.message or "", now, generation)


def _set(
    type_: str, status: Literal["True", "False"], reason: str, message: str, now: str, generation: int
) -> Condition:
    return Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=now,
        observed_generation=generation,
    )
