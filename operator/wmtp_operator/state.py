"""The operator's own record of a run, kept where trainers cannot write: an annotation on the WMTPRun.

Trainer pods may patch the run's status subresource, and a status patch cannot touch metadata, so the attempt
counter, restarts, preemptions, the accepted checkpoint and the run's end live in `wmtp.io/state` and the status
is rewritten from them on every pass. Each change of this record is one merge patch, written before the actions
it announces (an ending before the Job's deletion, a new attempt after its Job exists), so an operator killed
between any two calls redoes the rest and counts nothing twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wmtp import contract
from wmtp.config import DOCUMENT, MAX_MESSAGE, clip, parse_json, redact_uri
from wmtp_operator.formats import MAX_URI
from wmtp_operator.sections import Camel
from wmtp_operator.spec import Run, Spec
from wmtp_operator.status import Evaluation, parse_time

STATE_ANNOTATION = f"{contract.GROUP}/state"
# What defines the training: fixed when the first attempt starts (the CRD refuses edits; the content of a
# recipeRef ConfigMap it cannot see, so the operator compares hashes).
DEFINITION = ("algorithm", "models", "datasets", "recipe", "checkpoints.basePath")
# Spec fields that act at once rather than on the next attempt, or that only the operator writes.
_NOT_OPERATIONAL = {"resume_from", "suspend", "backoff_limit", "startup_timeout", "image_pull_deadline", "algorithm",
                    "recipe", "recipe_ref", "models", "datasets", "eval"}  # fmt: skip

Cause = Literal["failure", "preemption", "suspend"]
# The record is small; anyone who may edit the run may edit its annotations, so it is read as untrusted text.
STATE_LIMITS = DOCUMENT.within(max_bytes=65536, max_depth=8)


class Ending(Camel):
    """Why an attempt ended; the next one waits until the ended attempt's pods are gone."""

    model_config = ConfigDict(frozen=True)

    attempt: int = Field(ge=1)
    cause: Cause
    reason: str = Field(max_length=64)
    message: str = Field(max_length=MAX_MESSAGE)


class Refusal(Camel):
    """The API server refused to create a child; retried with a growing delay until the spec changes."""

    model_config = ConfigDict(frozen=True)

    generation: int
    count: int = Field(ge=1)
    at: str
    reason: str = Field(max_length=64)
    message: str = Field(max_length=MAX_MESSAGE)


class State(Camel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    attempt: int = Field(0, ge=0)
    restarts: int = Field(0, ge=0)
    preemptions: int = Field(0, ge=0)
    checkpoint: str | None = Field(None, max_length=MAX_URI)  # the latest accepted checkpoint
    resume_from: str | None = Field(None, max_length=MAX_URI)  # what the current attempt started from
    ending: Ending | None = None  # the current attempt ended; the fence before the next one
    previous: Ending | None = None  # why the current attempt was started
    final: Literal["Succeeded", "Failed"] | None = None
    message: str | None = Field(None, max_length=MAX_MESSAGE)  # the final message
    start_time: str | None = None
    completion_time: str | None = None
    definition: dict[str, str] = Field(default_factory=dict)
    applied: dict[str, str] = Field(default_factory=dict)  # the operational fields the current attempt uses
    rejected: str | None = Field(None, max_length=MAX_URI)  # the last reported checkpoint refused (warned once)
    refused: Refusal | None = None
    evaluation: Evaluation | None = None  # spec.eval's Job, once created, and how it ended

    @classmethod
    def load(cls, metadata: Mapping[str, Any]) -> tuple[State, str | None]:
        """The recorded state, and a problem when the annotation is there but unreadable (then a fresh state:
        the attempt number is recovered from the run's Jobs)."""
        text = (metadata.get("annotations") or {}).get(STATE_ANNOTATION)
        if not text:
            return cls(), None
        try:
            return cls.model_validate(parse_json(text, STATE_LIMITS)), None
        except (ValueError, ValidationError):
            return cls(), f"annotation {STATE_ANNOTATION} is unreadable; it was rebuilt from the run's Jobs"

    def dump(self) -> str:
        return json.dumps(self.model_dump(by_alias=True, exclude_defaults=True), separators=(",", ":"))

    def patch(self) -> dict[str, Any]:
        return {"metadata": {"annotations": {STATE_ANNOTATION: self.dump()}}}


def trusted_resume_from(run: Run | None, state: State) -> tuple[Run | None, str | None]:
    """The run with spec.resumeFrom only as this operator wrote it, and why not when it differs.

    The operator writes there only what the record says an attempt resumes from (`launch.resume_point`): the
    checkpoint it accepted (`state.checkpoint`), the one the current attempt started from (`state.resume_from`), or
    auto. A value that is none of them came from someone else (without the chart's admission policy, anyone who may
    edit the run): it is treated as unset, and the returned words go to the status and a Warning Event."""
    if run is None or run.spec.resume_from is None:
        return run, None
    value, spec = run.spec.resume_from, run.spec
    if value in (state.checkpoint, state.resume_from, contract.RESUME_AUTO):
        return run, None
    ignored = replace(run, spec=spec.model_copy(update={"resume_from": None}))
    why = f"spec.resumeFrom {redact_uri(value)!r} was not written by the operator and is ignored (set spec.resume)"
    return ignored, clip(why)


def fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def definition_of(spec: Spec, recipe: BaseModel) -> dict[str, str]:
    """Hashes of what defines the training, the recipe as rendered (inline or from its ConfigMap)."""
    values = {
        "algorithm": spec.algorithm,
        "models": spec.models.model_dump(),
        "datasets": spec.datasets,
        "recipe": recipe.model_dump(mode="json"),
        "checkpoints.basePath": spec.checkpoints.base_path,
    }
    return {key: fingerprint(values[key]) for key in DEFINITION}


def operational_of(spec: Spec) -> dict[str, str]:
    """Hashes of the fields a new attempt takes from the spec, by their camelCase names."""
    dumped = spec.model_dump(mode="json")
    return {
        info.alias or name: fingerprint(dumped[name])
        for name, info in Spec.model_fields.items()
        if name not in _NOT_OPERATIONAL
    }


def changed(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """Keys whose hashes differ (a key missing on one side counts as changed, unless `old` is empty)."""
    return sorted(key for key in new if old and old.get(key) != new[key])


def seconds_since(then: str | None, now: str) -> float:
    start, end = parse_time(then), parse_time(now)
    return (end - start).total_seconds() if start and end else 0.0
