"""The WMTPRun schema's building blocks and the sections that stand alone: the camelCase base, CEL rules, sections
derived from the trainer's config models, the inline recipe's schema (the trainer's `Recipe`), and what the pods
and the evaluation are given (resources, tolerations, the model volume, spec.eval). `spec.py` assembles them into
the Spec. What the schema cannot say (map keys, requests against limits) the models check: `Valid=False`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from wmtp import config, contract
from wmtp.config import EvalSettings, Recipe
from wmtp.config.uris import PodLocation, PodRoot, Url
from wmtp_operator.formats import (
    DURATION,
    LABEL_VALUE,
    NAME,
    QUALIFIED_NAME,
    QUANTITY,
    check_duration,
    duration_rule,
    duration_seconds,
    quantity_value,
)


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


# What the operator fills in itself: run.name (the WMTPRun's name) and train.algo (spec.algorithm).
_FILLED_IN = {"Recipe": "run", "RunSection": "name", "TrainSection": "algo"}
MAX_TAGS, MAX_TAG_KEY, MAX_TAG_VALUE = 20, 250, 500


def inline_recipe_schema() -> dict[str, Any]:
    """spec.recipe's schema: the trainer's `Recipe` (unknown keys refused as the trainer refuses them), less what
    the operator fills in; without defaults (the trainer applies its own: the API server would pin today's in
    every stored run); every map and list bounded, MLflow tags tighter than the trainer's own so that the largest
    recipe the schema admits fits `formats.RECIPE` (tests/operator/test_crd.py computes it)."""
    raw = Recipe.model_json_schema()
    defs = raw.pop("$defs")
    for name, field in _FILLED_IN.items():
        node = raw if name == "Recipe" else defs[name]
        node["required"] = [r for r in node.get("required", []) if r != field]
        if not node["required"]:
            del node["required"]
    tags = defs["RunSection"]["properties"]["tags"]
    keys = (f"self.all(k, size(k) <= {MAX_TAG_KEY})", f"recipe.run.tags: keys are at most {MAX_TAG_KEY} characters")
    tags.update(maxProperties=MAX_TAGS, **cel(keys))
    tags["additionalProperties"]["maxLength"] = MAX_TAG_VALUE
    conflict = (
        "!has(self.checkpoint_path)",
        "recipe.checkpointing.checkpoint_path conflicts with spec.checkpoints.basePath: the WMTPRun owns where its "
        "checkpoints go",
    )
    defs["CheckpointingSection"].update(cel(conflict))
    return _without_defaults(_inlined(raw, defs))


def _inlined(node: Any, defs: Mapping[str, Any]) -> Any:
    """`node` with every `$ref` replaced by the definition it names."""
    if isinstance(node, list):
        return [_inlined(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return {key: _inlined(value, defs) for key, value in node.items()}


def _without_defaults(node: Any) -> Any:
    """A schema without `default`s; a field whose default is not None but may be null (`grad_clip: null` turns
    clipping off) becomes nullable, or the API server would drop the null and the default would come back."""
    if isinstance(node, list):
        return [_without_defaults(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {
        key: {name: _without_defaults(sub) for name, sub in value.items()} if key == "properties" else
        _without_defaults(value)
        for key, value in node.items()
        if key != "default"
    }  # fmt: skip
    if node.get("default") is not None and any(branch.get("type") == "null" for branch in node.get("anyOf", [])):
        out["nullable"] = True
    return out


Uri = PodLocation  # a model or a dataset: s3://bucket/key, file:///path or an absolute path in the image
Quantity = Annotated[int, Field(ge=0)] | Annotated[str, Field(pattern=QUANTITY, max_length=64)]
ResourceName = Annotated[str, Field(pattern=QUALIFIED_NAME, max_length=317)]
LabelValue = Annotated[str, Field(pattern=LABEL_VALUE, max_length=63)]


class Resources(Camel):
    """Compute resources of each trainer pod (the trainer container)."""

    limits: dict[ResourceName, Quantity] = Field(
        default_factory=dict,
        description="Resource limits, e.g. {cpu: 4, memory: 16Gi, nvidia.com/gpu: 8}.",
        json_schema_extra={"maxProperties": 16},
    )
    requests: dict[ResourceName, Quantity] = Field(
        default_factory=dict,
        description="Resource requests (extended resources such as GPUs: as in limits, or left out).",
        json_schema_extra={"maxProperties": 16},
    )

    @model_validator(mode="after")
    def _fits(self) -> Resources:
        """What the API server would refuse in the pods: a request above its limit; an extended resource (a GPU)
        requested without an equal limit."""
        for name, request in self.requests.items():
            limit = self.limits.get(name)
            if limit is not None and quantity_value(request) > quantity_value(limit):
                raise ValueError(f"requests.{name} {request} is more than limits.{name} {limit}")
            if "/" in name and not name.startswith("kubernetes.io/") and limit is None:
                raise ValueError(f"requests.{name}: an extended resource needs limits.{name} (equal to the request)")
        return self


class Toleration(Camel):
    """A toleration copied to every trainer pod."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("!has(self.value) || !has(self.operator) || self.operator != 'Exists'",
             "a toleration with operator Exists has no value"),
            ("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
             "tolerationSeconds needs effect NoExecute"),
        )
    )  # fmt: skip

    key: str | None = Field(
        None,
        max_length=317,
        pattern=QUALIFIED_NAME,
        description="Taint key to tolerate; empty with operator Exists: all taints.",
    )
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal (default Equal).")
    value: LabelValue | None = Field(None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; empty: all effects."
    )
    toleration_seconds: int | None = Field(None, description="For NoExecute: how long the pod stays bound.")

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists has no value")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


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
    size: Quantity | None = Field(
        None,
        description="Volume size, e.g. 80Gi (emptyDir: a limit; PVC: the request). The evaluation pod (spec.eval) "
        "pulls the final model into this volume too: a float32 save, 4 bytes a parameter.",
    )
    storage_class_name: str | None = Field(
        None, max_length=253, pattern=NAME, description="StorageClass of the PVC. Unset: the default class."
    )

    @field_validator("size")
    @classmethod
    def _positive(cls, value: int | str | None) -> int | str | None:
        if value is not None and quantity_value(value) <= 0:
            raise ValueError("modelVolume.size must be more than 0")
        return value

    @model_validator(mode="after")
    def _sized_claim(self) -> ModelVolume:
        if self.type == "persistentVolumeClaim" and self.size is None:
            raise ValueError("modelVolume.size is required when modelVolume.type is persistentVolumeClaim")
        return self


MIN_EVAL_TIMEOUT = "1m"


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
    tasks = list(contract.EVAL_TASKS)
    rules.append(
        (f"!has(self.datasets) || self.datasets.all(task, task in {tasks})", f"eval.datasets: keys are {tasks}")
    )
    schema.update(cel(*rules))
    properties = schema["properties"]
    properties["tasks"]["x-kubernetes-list-type"] = "set"
    properties["timeout"].update(cel(duration_rule("eval.timeout", MIN_EVAL_TIMEOUT)))


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
    resources: Resources | None = Field(
        None,
        description="Resources of the evaluation pod. Unset: spec.resources with at most one of each */gpu resource "
        "(`wmtp eval` decodes on one GPU).",
    )

    @property
    def timeout_seconds(self) -> int:
        return duration_seconds(self.timeout)

    @field_validator("timeout")
    @classmethod
    def _bounded(cls, value: str) -> str:
        return check_duration(value, "eval.timeout", MIN_EVAL_TIMEOUT)


# The sections the trainer's config also has, derived from its own models. A location's CEL rule: the shape of
# `wmtp.config.uris.PodRoot`.
URI_RULE = "self.matches('^(s3|file)://.+') || self.startsWith('/')"

Checkpoints = derived(
    config.CheckpointPaths,
    "Checkpoints",
    "Where and how often the trainer saves checkpoints; they must outlive pods, so use s3:// or a shared mount.",
    extra={  # required, and where every pod sees the same place: never a relative path
        "base_path": (
            PodRoot,
            Field(
                description="Checkpoint store root: this run's checkpoints go to <basePath>/<run name>/.",
                json_schema_extra=cel(
                    (URI_RULE, "checkpoints.basePath must be s3://…, file://… or an absolute path"),
                    immutable("checkpoints.basePath", "the run's checkpoints live there"),
                ),
            ),
        )
    },
)

S3 = derived(
    config.S3Settings,
    "S3",
    "S3 endpoint and credentials for pulls, datasets and checkpoints.",
    # Keys never go into a spec: the pods read them from the Secret named here.
    exclude=("access_key_id", "secret_access_key"),
    extra={
        "credentials_secret": (
            str | None,
            secret(
                "Secret in the run's namespace with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(AWS_SESSION_TOKEN optional). Unset: the operator's default, else the pod's own identity (IRSA, "
                "node role)."
            ),
        )
    },
)


def _server(field: str) -> tuple[Any, Any]:
    """An MLflow URI of the spec: a server the pods reach, http(s) only (the trainer also takes local stores)."""
    return Url | None, Field(None, description=config.MLflowSettings.model_fields[field].description)


MLflow = derived(
    config.MLflowSettings,
    "MLflow",
    "MLflow tracking for metrics and the final model.",
    exclude=("registered_model",),  # the operator names it after the run's namespace (render.files)
    extra={
        "tracking_uri": _server("tracking_uri"),
        "registry_uri": _server("registry_uri"),
        "credentials_secret": (
            str | None,
            secret(
                "Secret in the run's namespace with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
                "MLFLOW_TRACKING_TOKEN (each optional): how the trainer authenticates to the tracking server. "
                "Credentials never belong in trackingUri."
            ),
        ),
    },
)

Distributed = derived(
    config.DistributedSettings,
    "Distributed",
    "The process group of the run's trainer processes (the operator enables it when there is more than one).",
    exclude=("enabled",),
)
FSDP = derived(
    config.FSDPSettings,
    "FSDP",
    "Sharding of model and optimizer (the operator enables it when there is more than one trainer process).",
    exclude=("enabled",),
)
Devices = derived(
    config.Devices,
    "Devices",
    "What the trainer does with its accelerators: precision, sharding and memory trade-offs, timeouts.",
    exclude=("compute_backend", "mixed_precision", "distributed", "fsdp"),
    extra={
        "mixed_precision": (
            config.Devices.model_fields["mixed_precision"].annotation | None,
            Field(None, description="bf16 or no. Unset: bf16 when the pods request GPUs, else no."),
        ),
        "distributed": (
            Distributed,
            Field(
                default_factory=Distributed, description="Process group settings.", json_schema_extra={"default": {}}
            ),
        ),
        "fsdp": (FSDP, Field(default_factory=FSDP, description="FSDP settings.", json_schema_extra={"default": {}})),
    },
)
