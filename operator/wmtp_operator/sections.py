"""The WMTPRun schema's building blocks and the sections that stand alone: the camelCase base, CEL rules, sections
derived from the trainer's config models, and what the pods and the evaluation are given (resources, tolerations,
the model volume, spec.eval). `spec.py` assembles them into the Spec.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from wmtp import contract
from wmtp.config import EvalSettings
from wmtp_operator.formats import DURATION, MAX_URI, NAME, QUANTITY, duration_seconds


def cel(*rules: tuple[str, str], **schema: Any) -> dict[str, Any]:
    return {**schema, "x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]}


def immutable(field: str, why: str = "it defines what is trained") -> tuple[str, str]:
    """A transition rule: `field` may not change once the run exists."""
    return "self == oldSelf", f"spec.{field} is immutable ({why}); create a new WMTPRun instead"


class Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


def derived(
    source: type[BaseModel],
    name: str,
    doc: str,
    *,
    exclude: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
    override: Mapping[str, FieldInfo] | None = None,
    extra: Mapping[str, tuple[Any, FieldInfo]] | None = None,
) -> type[Camel]:
    """A camelCase spec section with the fields of one of the trainer's config models: same names (camelCased),
    types, defaults, bounds and descriptions. `required` fields lose their default and their None; `override`
    adds constraints to a field (merged over the trainer's); `extra` adds operator-only fields."""
    fields: dict[str, Any] = {}
    for field_name, info in source.model_fields.items():
        if field_name in exclude:
            continue
        info = copy.copy(info)
        if field_name in required:
            annotation = Union[tuple(a for a in get_args(info.annotation) if a is not type(None))]  # noqa: UP007
            info = FieldInfo.merge_field_infos(info, default=PydanticUndefined, annotation=annotation)
        if override and field_name in override:
            info = FieldInfo.merge_field_infos(info, override[field_name])
        fields[field_name] = (info.annotation, info)
    fields.update(extra or {})
    return create_model(name, __base__=Camel, __doc__=doc, **fields)


def secret(what: str) -> Any:
    return Field(None, max_length=253, pattern=NAME, description=what)


Uri = Annotated[str, Field(min_length=1, max_length=MAX_URI)]
Quantity = int | Annotated[str, Field(pattern=QUANTITY, max_length=64)]


class Resources(Camel):
    """Compute resources of each trainer pod (the trainer container)."""

    limits: dict[str, Quantity] = Field(
        default_factory=dict, description="Resource limits, e.g. {cpu: 4, memory: 16Gi, nvidia.com/gpu: 8}."
    )
    requests: dict[str, Quantity] = Field(default_factory=dict, description="Resource requests.")


class Toleration(Camel):
    """A toleration copied to every trainer pod."""

    key: str | None = Field(None, description="Taint key to tolerate; empty with operator Exists: all taints.")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal (default Equal).")
    value: str | None = Field(None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; empty: all effects."
    )
    toleration_seconds: int | None = Field(None, description="For NoExecute: how long the pod stays bound.")


class ModelVolume(Camel):
    """Where `wmtp pull` puts the models: per pod (emptyDir) or one PVC shared by all pods and attempts."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "self.type != 'persistentVolumeClaim' || has(self.size)",
                "modelVolume.size is required when modelVolume.type is persistentVolumeClaim",
            )
        )
    )

    type: Literal["emptyDir", "persistentVolumeClaim"] = Field(
        "emptyDir",
        description="emptyDir: each pod pulls into its own volume, every attempt. persistentVolumeClaim: the "
        "operator creates <run>-models (ReadWriteMany); the first puller fills it, later pulls are no-ops.",
    )
    size: Quantity | None = Field(None, description="Volume size, e.g. 80Gi (emptyDir: a limit; PVC: the request).")
    storage_class_name: str | None = Field(
        None, max_length=253, pattern=NAME, description="StorageClass of the PVC. Unset: the default class."
    )


def _eval_schema(schema: dict[str, Any]) -> None:
    """What the API server checks of spec.eval: the rules of `EvalSettings`, in CEL (a task without a bundled copy
    needs its dataset's URI; k at most samples), bounded URIs, and tasks as a set."""
    rules = [
        (f"!('{task}' in self.tasks) || '{task}' in self.datasets",
         f"eval.datasets.{task} is required when eval.tasks lists {task}: there is no bundled copy of it")
        for task in contract.EVAL_TASKS
        if task not in contract.EVAL_BUNDLED
    ]  # fmt: skip
    rules.append(("self.k.all(k, k <= self.samples)", "eval.k: every k of pass@k must be at most eval.samples"))
    schema.update(cel(*rules))
    properties = schema["properties"]
    properties["tasks"]["x-kubernetes-list-type"] = "set"
    properties["datasets"]["additionalProperties"].update(minLength=1, maxLength=MAX_URI)


class Eval(Camel, EvalSettings):
    """`wmtp eval` after training succeeds: pass@k on code tasks and the speed-up of self-speculative decoding, in
    one Job <run>-eval on the final model; results in status.eval and in the training run's MLflow metrics. The
    fields are `wmtp eval`'s options (`wmtp.config.EvalSettings`), and what the Job is given."""

    model_config = ConfigDict(json_schema_extra=_eval_schema)

    timeout: str = Field(
        "2h",
        min_length=2,
        max_length=16,
        pattern=DURATION,
        description="How long the evaluation Job may take, start-up included (its activeDeadlineSeconds), e.g. 2h.",
    )
    resources: Resources | None = Field(None, description="Resources of the evaluation pod. Unset: spec.resources.")

    @property
    def timeout_seconds(self) -> int:
        return duration_seconds(self.timeout)
