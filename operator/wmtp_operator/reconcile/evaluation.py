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
from dataclasses import dataclass
from typing import Any

from pydantic.alias_generators import to_camel

from wmtp import contract
from wmtp_operator import pods as podstat
from wmtp_operator import render
from wmtp_operator.plan import Create, Decision, Event, say, write
from wmtp_operator.reconcile.launch import ACCOUNT_RETRY_SECONDS, account_refused, backoff
from wmtp_operator.reconcile.view import View
from wmtp_operator.spec import Run
from wmtp_operator.state import State
from wmtp_operator.status import Condition, Evaluation

Obj = Mapping[str, Any]
_SCORE = re.compile(r"^(problems|pass@[0-9]{1,4})$")


@dataclass(frozen=True, kw_only=True)
class EvalDecision(Decision):
    """What the evaluation adds to a pass over a run whose training succeeded."""

    message: str  # the evaluation's part of the run's message
    pending: bool = False  # not over: the run is Evaluating and needs more passes


def decide(view: View, run: Run, state: State) -> EvalDecision | None:
    """For a run whose training succeeded; None when there is nothing to evaluate (no spec.eval, none recorded)."""
    record = state.evaluation
    if record is None:
        return None if run.spec.eval is None else _start(view, run, state)
    if record.phase == "Running":
        return _watch(view, state, record)
    return EvalDecision(state=state, conditions=(_condition(view, record),), message=_summary(record))


def _start(view: View, run: Run, state: State) -> EvalDecision:
    waiting = backoff(view, state)
    if waiting is not None:
        return EvalDecision(state=state, requeue=waiting[0], message=waiting[1], pending=True)
    refused = account_refused(view)  # the evaluation's pod runs as the trainer pods do
    if refused is not None:
        invalid = view.condition("Valid", "False", *refused)
        return EvalDecision(
            state=state, conditions=(invalid,), requeue=ACCOUNT_RETRY_SECONDS, message=refused[1], pending=True
        )
    job = render.eval_job(run)
    name = job["metadata"]["name"]
    record = Evaluation(phase="Running", job=name, start_time=view.now)
    started = state.model_copy(update={"evaluation": record, "refused": None})
    return EvalDecision(
        state=started,
        actions=(Create(job), write(started)),
        message=say(f"evaluating {render.final_model(run)} in Job {name}"),
        pending=True,
    )


def _watch(view: View, state: State, record: Evaluation) -> EvalDecision:
    job = next((j for j in view.eval_jobs if j["metadata"]["name"] == record.job), None)
    mine = sorted(view.eval_pods, key=lambda p: p["metadata"]["name"])
    ended = outcome(job, mine, record.job)
    if ended is None:
        waiting = next((w for w in map(podstat.waiting, mine) if w), None)
        where = f"; {waiting}" if waiting else ""
        return EvalDecision(state=state, message=say(f"evaluating in Job {record.job}{where}"), pending=True)
    said, text = ended
    update: dict[str, Any] = {"phase": "Failed", "message": say(text), "completion_time": view.now}
    events: tuple[Event, ...] = ()
    if said is not None:
        update.update(phase="Succeeded", **results(said))
        events = (Event("Normal", "Evaluated", say(text)),)
    done = Evaluation.model_validate({**record.model_dump(), **update})
    new = state.model_copy(update={"evaluation": done})
    return EvalDecision(
        state=new, actions=(write(new),), events=events, conditions=(_condition(view, done),), message=_summary(done)
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


def _condition(view: View, record: Evaluation) -> Condition:
    if record.phase == "Succeeded":
        return view.condition("Evaluated", "True", "Evaluated", record.message or "")
    return view.condition("Evaluated", "False", "EvaluationFailed", record.message or "")
