"""WMTPRun status as pydantic models: the CRD's status schema, and the one part the operator reads back.

Trainers may patch the whole status subresource, so the operator never takes its own state from here (that lives
in an annotation on the run, see `state.py`); it rewrites these fields on every pass. The one thing it reads is
`report`, what trainer rank 0 says about its attempt, and that only leniently (`read_report`) and bounded: a field of
the wrong type is dropped, a number must be finite and within MAX_REPORTED_SECONDS or MAX_STEPS_PER_SECOND.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import ConfigDict, Field, create_model

from wmtp import contract
from wmtp.config import MAX_MESSAGE
from wmtp_operator.formats import MAX_URI
from wmtp_operator.sections import Camel

Phase = Literal[
    "Pending", "Queued", "Pulling", "Running", "Restarting", "Suspended", "Evaluating", "Succeeded", "Failed"
]
TERMINAL: frozenset[str] = frozenset({"Succeeded", "Failed"})
# Every condition type the operator writes, in the order the status lists them; a pass drops any other.
CONDITION_TYPES = ("Valid", "Applied", "Started", "SpecApplied", "Progressing", "Evaluated", "Succeeded", "Failed")
_TYPES_IN_WORDS = f"{', '.join(CONDITION_TYPES[:-1])} or {CONDITION_TYPES[-1]}"
# The bounds of what a report may say: no start-up takes a week, no training loop a million steps a second.
MAX_REPORTED_SECONDS = 7 * 24 * 3600.0
MAX_STEPS_PER_SECOND = 1e6


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
    steps_per_second: float | None = Field(None, description="Recent optimizer steps per second (for the ETA).")
    first_step_at: str | None = Field(
        None, max_length=64, description="When this attempt's first optimizer step finished (RFC 3339)."
    )
    load_seconds: float | None = Field(None, description="Process start → models and resume point loaded, seconds.")
    first_step_seconds: float | None = Field(None, description="Loaded → first optimizer step done, seconds.")


def _finite(kind: type) -> dict[str, Any]:
    return {"allow_inf_nan": False} if kind is float else {}


# What `kubectl explain` says of each of contract.EVAL_SPEED_FIELDS (a field without one is described by its name).
SPEED_DESCRIPTIONS = {
    "speedup": "Self-speculative over greedy tokens/s: the median of interleaved rounds.",
    "mean_accepted": "Tokens kept per verifying pass.",
    "tokens_per_pass": "Tokens per forward pass of self-speculative decoding (greedy makes 1).",
    "identical": "Whether both decodings gave the same tokens.",
    "greedy_tokens_per_s": "Greedy decoding's tokens/s, cached, one prompt at a time.",
    "speculative_tokens_per_s": "Self-speculative decoding's tokens/s.",
    "prompts": "Prompts decoded both ways.",
    "speedup_suspect": "The speed-up is more than the passes saved explain: a flaw in the comparison.",
    "pass_cost": "What a verifying pass costs in greedy passes (speedup = tokensPerPass / passCost).",
}

EvalSpeed = create_model(
    "EvalSpeed",
    __base__=Camel,
    __doc__="The speed-up of self-speculative decoding over greedy decoding of the same prompts.",
    __config__=None,
    **{
        name: (
            kind | None,
            Field(None, description=SPEED_DESCRIPTIONS.get(name, name.replace("_", " ")), **_finite(kind)),
        )
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


class Restart(Camel):
    """The last restart that reached training: from the end of an attempt the operator saw (a failure or a
    preemption) to the next attempt's first optimizer step, in parts."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    attempt: int = Field(ge=1, description="The attempt that resumed training.")
    cause: Literal["failure", "preemption"] = Field(description="Why the attempt before it ended.")
    ended_at: str = Field(description="When the operator saw the attempt before it end (RFC 3339).")
    training_at: str = Field(
        description="When its first optimizer step finished, as rank 0 reported it, within what the operator saw "
        "(RFC 3339)."
    )
    seconds: float = Field(ge=0, description="endedAt → trainingAt: the whole restart.")
    stopping_seconds: float | None = Field(
        None, ge=0, description="Waiting for the ended attempt's pods to stop (their SIGTERM saves included), "
        "until the new attempt's Job was created."
    )  # fmt: skip
    scheduling_seconds: float | None = Field(
        None, ge=0, description="Job created → every trainer container started: scheduling, the image and the "
        "models' pull."
    )  # fmt: skip
    resuming_seconds: float | None = Field(
        None, ge=0, description="The last trainer container started → first optimizer step: loading the models and "
        "the checkpoint, the first step."
    )  # fmt: skip
    load_seconds: float | None = Field(
        None, ge=0, description="Of resumingSeconds, rank 0's own measure: process start → models and checkpoint "
        "loaded."
    )  # fmt: skip
    first_step_seconds: float | None = Field(
        None, ge=0, description="Of resumingSeconds, rank 0's own measure: loaded → first optimizer step done."
    )


class Status(Camel):
    """Observed state, written by the operator; trainer rank 0 writes `report` alone."""

    model_config = ConfigDict(extra="ignore")

    phase: Phase | None = Field(
        None,
        description="Pending, Queued (Kueue holds the attempt's Job until it admits it), Pulling, Running, "
        "Restarting, Suspended, Evaluating (training succeeded; spec.eval runs), Succeeded, Failed.",
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description=f"{', '.join(CONDITION_TYPES[:-1])} and {CONDITION_TYPES[-1]}.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    attempt: int | None = Field(None, description="Current attempt (its Job is <run>-a<attempt>); 0: none yet.")
    restarts: int | None = Field(None, description="Attempts started after a failure (counted against backoffLimit).")
    preemptions: int | None = Field(
        None,
        description="Attempts started after a preemption: an eviction, a disruption, a SIGTERM save, or Kueue "
        "suspending an attempt that had started.",
    )
    step: int | None = Field(None, description="Last optimizer step reported by trainer rank 0.")
    max_steps: int | None = Field(None, description="The recipe's train.max_steps.")
    progress: str | None = Field(None, description="Percent done and step/maxSteps, e.g. 45% (450/1000).")
    progress_percent: int | None = Field(None, description="step/maxSteps in percent, 0 to 100, rounded down.")
    eta: str | None = Field(
        None, description="Estimated time remaining while Running (e.g. 1h23m), from rank 0's recent steps per "
        "second as of its last report."
    )  # fmt: skip
    loss: float | None = Field(None, description="Last training loss reported by trainer rank 0.")
    latest_checkpoint: str | None = Field(None, description="Latest committed checkpoint reported by rank 0.")
    resume_from: str | None = Field(None, description="Checkpoint (or resume mode) the current attempt started from.")
    start_time: str | None = Field(None, description="When the first attempt was created (RFC 3339).")
    completion_time: str | None = Field(None, description="When the run succeeded or failed (RFC 3339).")
    observed_generation: int | None = Field(None, description="The .metadata.generation last reconciled.")
    message: str | None = Field(None, description="What is happening, or why the run failed.")
    eval: Evaluation | None = Field(None, description="The evaluation of the final model, when spec.eval asks for one.")
    last_restart: Restart | None = Field(
        None, description="The last restart after a failure or a preemption that reached training, in seconds."
    )
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
    steps_per_second: float | None = None  # > 0 and at most MAX_STEPS_PER_SECOND
    first_step_at: datetime | None = None  # timezone-aware; where it lies is the reader's to bound
    load_seconds: float | None = None  # within [0, MAX_REPORTED_SECONDS]
    first_step_seconds: float | None = None


def read_report(status: Mapping[str, Any]) -> Reported | None:
    """`status.report`, or None when it is missing or malformed (a trainer writes it; it decides nothing)."""
    raw = status.get(contract.REPORT_FIELD)
    if not isinstance(raw, Mapping):
        return None
    attempt, step, loss, checkpoint, rate, first_at, load, first = (raw.get(key) for key in contract.REPORTED_FIELDS)
    if not _integer(attempt):
        return None
    first_step_at = parse_time(first_at) if isinstance(first_at, str) and len(first_at) <= 64 else None
    return Reported(
        attempt,
        step if _integer(step) else None,
        _number(loss),
        checkpoint if isinstance(checkpoint, str) and 0 < len(checkpoint) <= MAX_URI else None,
        rate if (rate := _number(rate)) is not None and 0 < rate <= MAX_STEPS_PER_SECOND else None,
        first_step_at if first_step_at is not None and first_step_at.tzinfo is not None else None,
        *(value if (value := _number(v)) is not None and 0 <= value <= MAX_REPORTED_SECONDS else None
          for v in (load, first)),
    )  # fmt: skip


def _number(value: Any) -> float | None:
    """A finite JSON number as a float, else None."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    number = float(value) if abs(value) < 2**1023 else math.inf  # an int too large for a float is no OverflowError
    return number if math.isfinite(number) else None


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


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC, to the millisecond when there are any."""
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return text.replace(".000Z", "Z")
