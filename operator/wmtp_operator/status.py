"""WMTPRun status as pydantic models: the CRD's status schema, and the one part the operator reads back.

Trainers may patch the whole status subresource, so the operator never takes its own state from here (that lives
in an annotation on the run, see `state.py`); it rewrites these fields on every pass. The one thing it reads is
`report`, what trainer rank 0 says about its attempt, and that only leniently (`read_report`) and bounded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import ConfigDict, Field, create_model

from wmtp import contract
from wmtp.config import MAX_MESSAGE
from wmtp_operator.formats import MAX_URI
from wmtp_operator.sections import Camel

Phase = Literal["Pending", "Pulling", "Running", "Restarting", "Suspended", "Evaluating", "Succeeded", "Failed"]
TERMINAL: frozenset[str] = frozenset({"Succeeded", "Failed"})
# Every condition type the operator writes, in the order the status lists them; a pass drops any other.
CONDITION_TYPES = ("Valid", "Applied", "Started", "SpecApplied", "Progressing", "Evaluated", "Succeeded", "Failed")
_TYPES_IN_WORDS = f"{', '.join(CONDITION_TYPES[:-1])} or {CONDITION_TYPES[-1]}"


class Condition(Camel):
    """A standard condition (metav1.Condition)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: str = Field(description=f"{_TYPES_IN_WORDS}.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason for the last transition.")
    message: str = Field(description="Human-readable details.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="The .metadata.generation it was set for.")


class Report(Camel):
    """What trainer rank 0 reports about its attempt (the only status field trainers write)."""

    model_config = ConfigDict(extra="ignore")

    attempt: int | None = Field(None, description="The attempt of the reporting pod ($WMTP_ATTEMPT).")
    step: int | None = Field(None, description="Last optimizer step.")
    loss: float | None = Field(None, description="Last training loss.")
    latest_checkpoint: str | None = Field(
        None, max_length=MAX_URI, description="Latest committed checkpoint of this attempt."
    )


def _finite(kind: type) -> dict[str, Any]:
    return {"allow_inf_nan": False} if kind is float else {}


EvalSpeed = create_model(
    "EvalSpeed",
    __base__=Camel,
    __doc__="The speed-up of self-speculative decoding over greedy decoding of the same prompts.",
    __config__=None,
    **{
        name: (kind | None, Field(None, description=name.replace("_", " "), **_finite(kind)))
        for name, kind in contract.EVAL_SPEED_FIELDS.items()
    },
)


class Evaluation(Camel):
    """The evaluation of the final model (spec.eval): its Job, how it went, the headline results."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    phase: Literal["Running", "Succeeded", "Failed"] = Field(description="Running, Succeeded or Failed.")
    job: str = Field(max_length=253, description="The evaluation Job.")
    message: str | None = Field(
        None, max_length=MAX_MESSAGE, description="The results in one line, or why the evaluation failed."
    )
    tasks: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Task → its number of problems and pass@k scores, e.g. {humaneval: {problems: 164, pass@1: 0.25}}.",
        json_schema_extra={"maxProperties": len(contract.EVAL_TASKS)},
    )
    speed: EvalSpeed | None = Field(None, description="Self-speculative against greedy decoding.")  # type: ignore[valid-type]
    mlflow_run_id: str | None = Field(
        None, pattern=contract.MLFLOW_RUN_ID, description="The MLflow run holding the metrics (the training run's)."
    )
    start_time: str | None = Field(None, description="When the evaluation Job was created (RFC 3339).")
    completion_time: str | None = Field(None, description="When the evaluation ended (RFC 3339).")


class Status(Camel):
    """Observed state, written by the operator; trainer rank 0 writes `report` alone."""

    model_config = ConfigDict(extra="ignore")

    phase: Phase | None = Field(
        None,
        description="Pending, Pulling, Running, Restarting, Suspended, Evaluating (training succeeded; spec.eval "
        "runs), Succeeded, Failed.",
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description=f"{', '.join(CONDITION_TYPES[:-1])} and {CONDITION_TYPES[-1]}.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    attempt: int | None = Field(None, description="Current attempt (its Job is <run>-a<attempt>); 0: none yet.")
    restarts: int | None = Field(None, description="Attempts started after a failure (counted against backoffLimit).")
    preemptions: int | None = Field(
        None, description="Attempts started after a preemption: an eviction, a disruption or a SIGTERM save."
    )
    step: int | None = Field(None, description="Last optimizer step reported by trainer rank 0.")
    max_steps: int | None = Field(None, description="The recipe's train.max_steps.")
    progress: str | None = Field(None, description="step/maxSteps.")
    loss: float | None = Field(None, description="Last training loss reported by trainer rank 0.")
    latest_checkpoint: str | None = Field(None, description="Latest committed checkpoint reported by rank 0.")
    resume_from: str | None = Field(None, description="Checkpoint (or resume mode) the current attempt started from.")
    start_time: str | None = Field(None, description="When the first attempt was created (RFC 3339).")
    completion_time: str | None = Field(None, description="When the run succeeded or failed (RFC 3339).")
    observed_generation: int | None = Field(None, description="The .metadata.generation last reconciled.")
    message: str | None = Field(None, description="What is happening, or why the run failed.")
    eval: Evaluation | None = Field(None, description="The evaluation of the final model, when spec.eval asks for one.")
    report: Report | None = Field(
        None,
        description=f"Written by trainer rank 0 alone: {', '.join(contract.REPORTED_FIELDS)}. The operator copies "
        "what it accepts into the fields above.",
    )


@dataclass(frozen=True)
class Reported:
    """A report as the operator reads it: every field checked, nothing trusted but its shape."""

    attempt: int
    step: int | None
    loss: float | None
    checkpoint: str | None


def read_report(status: Mapping[str, Any]) -> Reported | None:
    """`status.report`, or None when it is missing or malformed (a trainer writes it; it decides nothing)."""
    raw = status.get(contract.REPORT_FIELD)
    if not isinstance(raw, Mapping):
        return None
    attempt, step, loss, checkpoint = (raw.get(key) for key in contract.REPORTED_FIELDS)
    if not _integer(attempt):
        return None
    return Reported(
        attempt,
        step if _integer(step) else None,
        float(loss) if isinstance(loss, int | float) and not isinstance(loss, bool) and math.isfinite(loss) else None,
        checkpoint if isinstance(checkpoint, str) and 0 < len(checkpoint) <= MAX_URI else None,
    )


def checkpoint_step(uri: str, base_path: str, run_name: str) -> int | None:
    """The step of `uri` when it is one of this run's step checkpoints, <basePath>/<run>/checkpoint_step_N (a plain
    path and its file:// form are the same place); None for anything else."""

    def norm(text: str) -> str:
        return f"file://{text}" if text.startswith("/") else text

    root = f"{norm(base_path).rstrip('/')}/{run_name}/{contract.CHECKPOINT_PREFIX}"
    found = re.fullmatch(re.escape(root) + r"([0-9]{1,15})/?", norm(uri))
    return int(found.group(1)) if found else None


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53


def held_since(conditions: Any, condition: Condition) -> Condition:
    """`condition` with the lastTransitionTime of the one of its type in `conditions` (the status as found) while
    its status holds; that time is all a pass takes from there, and only when it is one."""
    previous = get_condition(conditions, condition.type)
    since = previous.get("lastTransitionTime")
    if previous.get("status") != condition.status or not isinstance(since, str) or parse_time(since) is None:
        return condition
    return condition.model_copy(update={"last_transition_time": since})


def get_condition(conditions: Any, type_: str) -> Mapping[str, Any]:
    """The condition of that type, or {} (also when a trainer wrote something that is not a condition list)."""
    if not isinstance(conditions, list):
        return {}
    return next((c for c in conditions if isinstance(c, Mapping) and c.get("type") == type_), {})


def parse_time(text: str | None) -> datetime | None:
    """An RFC 3339 time, or None."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
    except ValueError:
        return None
