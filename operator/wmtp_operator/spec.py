"""WMTPRun spec and status as pydantic models: the source the CRD's openAPIV3Schema is generated from.

Field descriptions become `kubectl explain` text; `x-kubernetes-validations` hold the CEL rules the API server
enforces. The operator parses every body it reads through these models too, so the two cannot drift apart
(`crd.py` renders them; a test checks that `crds/wmtpruns.yaml` is up to date). The sections the trainer's
config also has (checkpoints, MLflow, S3) are derived from the trainer's own models, and the algorithms and
the models each one needs come from `wmtp.contract`: names, defaults, bounds and descriptions exist once.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from wmtp import config, contract

Phase = Literal["Pending", "Pulling", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]
TERMINAL: frozenset[str] = frozenset({"Succeeded", "Failed"})
# A quantity such as "8Gi" or 4: the API server's int-or-string.
Quantity = int | str

# Checkpoint references: the keywords the trainer's --resume understands, step_N, or a checkpoint URI.
_RESUME_RULE = (
    "self in ['auto', 'never', 'latest'] || self.matches('^step_[0-9]+$') || self.matches('^(s3|file)://.+')"
    " || self.startsWith('/')"
)
_URI_RULE = "self.matches('^(s3|file)://.+') || self.startsWith('/')"


def _cel(rule: str, message: str) -> dict[str, Any]:
    return {"x-kubernetes-validations": [{"rule": rule, "message": message}]}


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


class RecipeRef(Camel):
    """A recipe YAML stored in a ConfigMap of the run's namespace."""

    name: str = Field(min_length=1, description="Name of the ConfigMap that holds the recipe.")
    key: str = Field("recipe.yaml", min_length=1, description="Key of the ConfigMap's data holding the recipe YAML.")


def _needed_by(role: str) -> str:
    return ", ".join(name for name in contract.BUILTIN_ALGORITHMS if role in contract.algorithm(name).frozen)


class Models(Camel):
    """Model URIs (s3://, file:// or a path inside the image). s3:// models are pulled into the model volume."""

    base: str = Field(min_length=1, description="Base causal LM to train (an HF model directory).")
    ref: str | None = Field(
        None, min_length=1, description=f"URI of {contract.MODEL_ROLES['ref']}; required by {_needed_by('ref')}."
    )
    rm: str | None = Field(
        None, min_length=1, description=f"URI of {contract.MODEL_ROLES['rm']}; required by {_needed_by('rm')}."
    )


def _model_rules() -> list[dict[str, str]]:
    """One CEL rule per algorithm and frozen model it needs, from the contract."""
    return [
        {
            "rule": f"self.algorithm != '{name}' || has(self.models.{role})",
            "message": f"models.{role} is required when algorithm is {name} ({contract.MODEL_ROLES[role]})",
        }
        for name in contract.BUILTIN_ALGORITHMS
        for role in contract.algorithm(name).frozen
    ]


Checkpoints = derived(
    config.CheckpointPaths,
    "Checkpoints",
    "Where and how often the trainer saves checkpoints; they must outlive pods, so use s3:// or a shared mount.",
    required=("base_path",),
    override={
        "base_path": Field(
            max_length=1024,
            description="Checkpoint store root: this run's checkpoints go to <basePath>/<run name>/.",
            json_schema_extra=_cel(_URI_RULE, "checkpoints.basePath must be s3://…, file://… or an absolute path"),
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
            Field(
                None,
                description="Secret in the run's namespace with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(AWS_SESSION_TOKEN optional). Unset: the operator's default, else the pod's own identity (IRSA, "
                "node role).",
            ),
        )
    },
)

MLflow = derived(config.MLflowSettings, "MLflow", "MLflow tracking for metrics and the final model.")


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
        json_schema_extra=_cel(
            "self.type != 'persistentVolumeClaim' || has(self.size)",
            "modelVolume.size is required when modelVolume.type is persistentVolumeClaim",
        )
    )

    type: Literal["emptyDir", "persistentVolumeClaim"] = Field(
        "emptyDir",
        description="emptyDir: each pod pulls into its own volume, every attempt. persistentVolumeClaim: the "
        "operator creates <run>-models (ReadWriteMany); the first puller fills it, later pulls are no-ops.",
    )
    size: Quantity | None = Field(None, description="Volume size, e.g. 80Gi (emptyDir: a limit; PVC: the request).")
    storage_class_name: str | None = Field(None, description="StorageClass of the PVC. Unset: the default class.")


class Spec(Camel):
    """What to train and on what: one WMTPRun is one training run, restarted as a whole when a pod fails."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                *_model_rules(),
                {
                    "rule": "has(self.recipe) != has(self.recipeRef)",
                    "message": "set exactly one of recipe (inline) and recipeRef (a ConfigMap)",
                },
            ]
        }
    )

    image: str = Field(min_length=1, description="Trainer image: runs `wmtp pull` (init) and `torchrun -m wmtp`.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Pull policy of the trainer image."
    )
    algorithm: Literal[contract.BUILTIN_ALGORITHMS] = Field(  # type: ignore[valid-type]
        description="WMTP algorithm; the recipe's train.algo must match it or be left out."
    )
    recipe: dict[str, Any] | None = Field(
        None,
        description="The recipe inline (the schema of recipe.yaml: run, train, data, optim, loss, ...). "
        "run.name is replaced by the WMTPRun's name. Exactly one of recipe and recipeRef.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    recipe_ref: RecipeRef | None = Field(None, description="The recipe from a ConfigMap instead of inline.")
    models: Models = Field(description="Model URIs by role.")
    datasets: dict[str, str] = Field(
        default_factory=dict,
        description="Dataset name → URI of a .jsonl/.jsonl.gz file; the recipe's data.sources name these.",
    )
    checkpoints: Checkpoints = Field(description="Checkpoint store and cadence.")
    resume: str = Field(
        "auto",
        max_length=1024,
        description="Where the first attempt starts: auto (the latest checkpoint if any), never, latest, "
        "step_N, or a checkpoint URI.",
        json_schema_extra=_cel(
            _RESUME_RULE, "resume must be auto, never, latest, step_N, or a checkpoint URI (s3://, file://, /path)"
        ),
    )
    resume_from: str | None = Field(
        None,
        max_length=1024,
        description="Written by the operator on restart: the checkpoint the next attempt resumes from "
        "(overrides resume).",
        json_schema_extra=_cel(_RESUME_RULE, "resumeFrom must be a checkpoint URI, step_N, latest, auto or never"),
    )
    s3: S3 = Field(
        default_factory=S3, description="S3 endpoint, region and credentials.", json_schema_extra={"default": {}}
    )
    mlflow: MLflow = Field(
        default_factory=MLflow, description="MLflow tracking server and experiment.", json_schema_extra={"default": {}}
    )
    nodes: int = Field(
        1,
        ge=1,
        description="Pods (torchrun nodes) per attempt; all start and restart together.",
        json_schema_extra=_cel("self >= 1", "nodes must be at least 1"),
    )
    nproc_per_node: int = Field(1, ge=1, description="Trainer processes per pod (usually the GPUs per pod).")
    resources: Resources | None = Field(None, description="Trainer container resources.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods must match.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations of the trainer pods.")
    service_account_name: str | None = Field(
        None,
        description="ServiceAccount of the trainer pods; rank 0 reports progress with it, so it needs `patch` "
        "on wmtpruns/status (nothing more). Unset: the operator's default, else the namespace's default account "
        "(progress then goes unreported).",
    )
    model_volume: ModelVolume = Field(
        default_factory=ModelVolume,
        description="Where the pulled models and datasets live.",
        json_schema_extra={"default": {}},
    )
    backoff_limit: int = Field(3, ge=0, description="Restarts (new attempts after a failure) before the run fails.")
    suspend: bool = Field(
        False, description="true: delete the running attempt and keep everything else; false again: resume."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete a finished attempt's Job and pods this long after it ends."
    )


class Condition(Camel):
    """A standard condition (metav1.Condition)."""

    model_config = ConfigDict(extra="ignore")

    type: str = Field(description="Valid, Progressing, Succeeded or Failed.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason for the last transition.")
    message: str = Field(description="Human-readable details.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="The .metadata.generation it was set for.")


class Status(Camel):
    """Observed state, written by the operator (phase, attempts) and by trainer rank 0 (step, loss, checkpoint)."""

    # Lenient: the trainer patches this too, and an older operator must not choke on a newer trainer's fields.
    model_config = ConfigDict(extra="ignore")

    phase: Phase | None = Field(
        None, description="Pending, Pulling, Running, Restarting, Suspended, Succeeded, Failed."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Valid, Progressing, Succeeded and Failed.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    attempt: int | None = Field(None, description="Current attempt (its Job is <run>-a<attempt>); 0: none yet.")
    restarts: int | None = Field(None, description="Attempts started after a failure.")
    step: int | None = Field(None, description="Last optimizer step reported by trainer rank 0.")
    max_steps: int | None = Field(None, description="The recipe's train.max_steps.")
    loss: float | None = Field(None, description="Last training loss reported by trainer rank 0.")
    latest_checkpoint: str | None = Field(None, description="Latest committed checkpoint reported by rank 0.")
    resume_from: str | None = Field(None, description="Checkpoint (or resume mode) the current attempt started from.")
    start_time: str | None = Field(None, description="When the first attempt was created (RFC 3339).")
    completion_time: str | None = Field(None, description="When the run succeeded or failed (RFC 3339).")
    observed_generation: int | None = Field(None, description="The .metadata.generation last reconciled.")
    message: str | None = Field(None, description="What is happening, or why the run failed.")


@dataclass(frozen=True)
class Defaults:
    """Operator-wide values for fields a run leaves unset (the Helm chart sets them in the environment)."""

    s3_credentials_secret: str | None = None
    mlflow_tracking_uri: str | None = None
    service_account_name: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Defaults:
        return cls(
            env.get("WMTP_DEFAULT_S3_SECRET") or None,
            env.get("WMTP_DEFAULT_MLFLOW_URI") or None,
            env.get("WMTP_TRAINER_SERVICE_ACCOUNT") or None,
        )

    def apply(self, spec: Spec) -> Spec:
        s3 = spec.s3.model_copy(update={"credentials_secret": spec.s3.credentials_secret or self.s3_credentials_secret})
        mlflow = spec.mlflow.model_copy(update={"tracking_uri": spec.mlflow.tracking_uri or self.mlflow_tracking_uri})
        account = spec.service_account_name or self.service_account_name
        return spec.model_copy(update={"s3": s3, "mlflow": mlflow, "service_account_name": account})


@dataclass(frozen=True)
class Run:
    """A WMTPRun as the operator sees it: identity, parsed spec and status."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: Spec
    status: Status

    @classmethod
    def from_body(cls, body: Mapping[str, Any], defaults: Defaults = Defaults()) -> Run:
        """Parse a WMTPRun body; raises pydantic.ValidationError for a spec the CRD would have refused."""
        meta = body["metadata"]
        return cls(
            name=meta["name"],
            namespace=meta.get("namespace", "default"),
            uid=meta.get("uid", ""),
            generation=meta.get("generation", 0),
            spec=defaults.apply(Spec.model_validate(body.get("spec") or {})),
            status=Status.model_validate(body.get("status") or {}),
        )
