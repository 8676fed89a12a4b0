"""WMTPRun spec as pydantic models: the source the CRD's openAPIV3Schema is generated from.

Field descriptions become `kubectl explain` text; `x-kubernetes-validations` hold the CEL rules the API server
enforces, and `pattern`s the shapes it checks. The operator parses every body it reads through these models too,
so the two cannot drift apart (`crd.py` renders them; a test checks that `crds/wmtpruns.yaml` is up to date).
The sections the trainer's config also has (checkpoints, MLflow, S3, devices) are derived from the trainer's own
models (in `sections.py`), and the algorithms and the models each one needs come from `wmtp.contract`: names,
defaults, bounds and descriptions exist once.

CEL rules stay cheap: the API server refuses a CRD whose rules it estimates too costly, so they only touch
bounded strings and collections (`maxLength`, `maxProperties`); map keys, which it cannot bound, are checked here
and by the chart's admission policy. URIs and paths have the shapes of `wmtp.config.uris`, the trainer's own.

The inline recipe's schema is the trainer's `Recipe`, every part of it bounded, so the API server itself keeps a
recipe small and shallow; the operator checks the same bounds (`formats.RECIPE`) before any other work, for a
recipeRef's text and for a spec that never met this CRD.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, WithJsonSchema, field_validator

from wmtp import contract
from wmtp.config import check_tree
from wmtp.config.uris import POD_ROOT, shaped
from wmtp_operator.formats import (
    CONFIG_KEY,
    DATASET,
    DURATION,
    IMAGE,
    MAX_DATASETS,
    MAX_PODS,
    NAME,
    QUALIFIED_NAME,
    RECIPE,
    check_duration,
    duration_rule,
    duration_seconds,
)
from wmtp_operator.kueue import PRIORITY_LABEL, QUEUE_LABEL
from wmtp_operator.sections import (
    S3,
    URI_RULE,
    Camel,
    Checkpoints,
    Devices,
    Eval,
    LabelValue,
    MLflow,
    ModelVolume,
    Resources,
    Toleration,
    Uri,
    cel,
    immutable,
    inline_recipe_schema,
)

# Checkpoint references: the keywords the trainer's --resume understands, step_N, or a checkpoint URI.
_RESUME_RULE = (
    f"self in {list(contract.RESUME_KEYWORDS)} || self.matches('^{contract.RESUME_STEP_PREFIX}[0-9]+$')"
    f" || {URI_RULE}"
)
_RESUME_WORDS = f"{', '.join(contract.RESUME_KEYWORDS)}, {contract.RESUME_STEP_PREFIX}N"
_KEYWORDS = "|".join(map(re.escape, contract.RESUME_KEYWORDS))
_RESUME_SHAPE = f"^(?:{_KEYWORDS})$|^{contract.RESUME_STEP_PREFIX}[0-9]{{1,18}}$|{POD_ROOT}"
Resume = shaped(_RESUME_SHAPE, f"{_RESUME_WORDS} or a checkpoint URI (s3://, file:///, /path)")
MIN_STARTUP_TIMEOUT = "30s"  # the kubelet's image pull alone takes longer
# The operator itself refuses only a zero wait: tests against the emulator (which skips the CRD) bound it in seconds.
OPERATOR_MIN_STARTUP_TIMEOUT = "1s"
MIN_IMAGE_PULL_DEADLINE = "30s"
# What defines the training, by path under spec: fixed once the run exists. The CRD refuses an edit of each (an
# `immutable` rule on its field; the recipe's on recipeRef, an inline one as a whole by its presence), and the
# operator compares their hashes from the first attempt on (`state.definition_of`: it alone sees a recipeRef's
# ConfigMap). Everything else in the spec applies to the next attempt, or at once.
DEFINITION = ("algorithm", "models", "datasets", "recipe", "checkpoints.basePath")


class RecipeRef(Camel):
    """A recipe YAML stored in a ConfigMap of the run's namespace."""

    model_config = ConfigDict(json_schema_extra=cel(immutable("recipeRef")))

    name: str = Field(min_length=1, max_length=253, pattern=NAME, description="Name of the ConfigMap that holds it.")
    key: str = Field(
        "recipe.yaml", min_length=1, max_length=253, pattern=CONFIG_KEY, description="Key of its data holding the YAML."
    )


def _needed_by(role: str) -> str:
    return ", ".join(name for name in contract.BUILTIN_ALGORITHMS if role in contract.algorithm(name).frozen)


class Models(Camel):
    """Model URIs (s3://, file:// or a path inside the image). s3:// models are pulled into the model volume."""

    model_config = ConfigDict(json_schema_extra=cel(immutable("models")))

    base: Uri = Field(description="Base causal LM to train (an HF model directory).")
    ref: Uri | None = Field(None, description=f"URI of {contract.MODEL_ROLES['ref']}; required by {_needed_by('ref')}.")
    rm: Uri | None = Field(None, description=f"URI of {contract.MODEL_ROLES['rm']}; required by {_needed_by('rm')}.")


def _model_rules() -> list[tuple[str, str]]:
    """One CEL rule per algorithm and frozen model it needs, from the contract."""
    return [
        (
            f"self.algorithm != '{name}' || has(self.models.{role})",
            f"models.{role} is required when algorithm is {name} ({contract.MODEL_ROLES[role]})",
        )
        for name in contract.BUILTIN_ALGORITHMS
        for role in contract.algorithm(name).frozen
    ]


class Spec(Camel):
    """What to train and on what: one WMTPRun is one training run, restarted as a whole when a pod fails."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            *_model_rules(),
            (
                "has(self.recipe) != has(self.recipeRef)",
                "set exactly one of recipe (inline) and recipeRef (a ConfigMap)",
            ),
            (
                "has(self.recipe) == has(oldSelf.recipe)",
                "spec.recipe and spec.recipeRef are immutable (they define what is trained); create a new WMTPRun",
            ),
            (
                "!has(self.recipe) || !has(self.recipe.train.algo) || self.recipe.train.algo == self.algorithm",
                "recipe.train.algo must be spec.algorithm (or left out)",
            ),
            (
                "!has(self.recipe) || (has(self.datasets) && self.recipe.data.sources.all(s, s.name in self.datasets))",
                "recipe.data.sources names a dataset that spec.datasets does not define",
            ),
        )
    )

    image: str = Field(
        max_length=512,
        pattern=IMAGE,
        description="Trainer image, e.g. ghcr.io/wmtp/wmtp-trainer:0.1.0: runs `wmtp pull` (init) and `wmtp launch`.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Pull policy of the trainer image."
    )
    algorithm: Literal[contract.BUILTIN_ALGORITHMS] = Field(  # type: ignore[valid-type]
        description="WMTP algorithm; the recipe's train.algo must match it or be left out. Immutable.",
        json_schema_extra=cel(immutable("algorithm")),
    )
    recipe: Annotated[dict[str, Any], WithJsonSchema(inline_recipe_schema())] | None = Field(
        None,
        description="The recipe inline (the schema of recipe.yaml: run, train, data, optim, loss, ...). "
        "run.name is replaced by the WMTPRun's name, a left-out train.algo is spec.algorithm. Exactly one of recipe "
        "and recipeRef; immutable, the content of a recipeRef ConfigMap too (the operator refuses a changed one).",
    )
    recipe_ref: RecipeRef | None = Field(None, description="The recipe from a ConfigMap instead of inline.")
    models: Models = Field(description="Model URIs by role. Immutable.")
    datasets: dict[Annotated[str, Field(pattern=DATASET, max_length=63)], Uri] = Field(
        default_factory=dict,
        description="Dataset name → URI of a .jsonl/.jsonl.gz file; the recipe's data.sources name these. "
        "Names are one path segment (letters, digits, -, _, .). Immutable.",
        json_schema_extra=cel(immutable("datasets"), maxProperties=MAX_DATASETS),
    )
    checkpoints: Checkpoints = Field(description="Checkpoint store and cadence.")
    resume: Resume = Field(
        contract.RESUME_AUTO,
        description=f"Where the first attempt starts: {contract.RESUME_HELP}. A checkpoint named here that is "
        "missing or damaged fails the run. Every later attempt resumes from the newest checkpoint the operator "
        "accepted (spec.resumeFrom), never from this again.",
        json_schema_extra=cel(
            (_RESUME_RULE, f"resume must be {_RESUME_WORDS}, or a checkpoint URI (s3://, file://, /path)")
        ),
    )
    resume_from: Resume | None = Field(
        None,
        description="Written by the operator alone: the checkpoint the next attempt resumes from, or auto when it "
        "accepted none; the trainer falls back to the newest intact one under the run's checkpoint root when it is "
        "gone. The chart's admission policy refuses anyone else's write, and the operator ignores a value it did not "
        "write (a Warning says so).",
        json_schema_extra=cel((_RESUME_RULE, f"resumeFrom must be a checkpoint URI, or {_RESUME_WORDS}")),
    )
    s3: S3 = Field(
        default_factory=S3, description="S3 endpoint, region and credentials.", json_schema_extra={"default": {}}
    )
    mlflow: MLflow = Field(
        default_factory=MLflow,
        description="MLflow tracking server, experiment and credentials. Unset trackingUri: the operator's default "
        "(the chart's MLflow server).",
        json_schema_extra={"default": {}},
    )
    devices: Devices = Field(
        default_factory=Devices,
        description="Mixed precision, activation checkpointing, CPU offload and the distributed timeout.",
        json_schema_extra={"default": {}},
    )
    nodes: int = Field(
        1,
        ge=1,
        le=MAX_PODS,
        description="Pods (torchrun nodes) per attempt; all start and restart together.",
        json_schema_extra=cel(("self >= 1", "nodes must be at least 1")),
    )
    nproc_per_node: int = Field(1, ge=1, le=64, description="Trainer processes per pod (usually the GPUs per pod).")
    resources: Resources | None = Field(None, description="Trainer container resources.")
    node_selector: dict[Annotated[str, Field(pattern=QUALIFIED_NAME, max_length=317)], LabelValue] = Field(
        default_factory=dict,
        description="Node labels the pods must match.",
        json_schema_extra={"maxProperties": 32},
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations of the trainer pods."
    )
    queue_name: str | None = Field(
        None,
        min_length=1,
        max_length=63,
        pattern=NAME,
        description="Kueue LocalQueue of the run's namespace that admits each attempt (the label "
        f"{QUEUE_LABEL} on its Job): Kueue holds the Job suspended (phase Queued) until its ClusterQueue has quota "
        "for all the pods at once, and may preempt it (a preemption, not a restart). Each attempt is a new Job, so a "
        "new Workload, queued again. Unset: no queue.",
    )
    priority_class_name: str | None = Field(
        None,
        min_length=1,
        max_length=63,
        pattern=NAME,
        description=f"Kueue WorkloadPriorityClass of each attempt (the Job's label {PRIORITY_LABEL}): its order in "
        "the queue and whom it may preempt. Not a pod PriorityClass. Unset: Kueue's default.",
    )
    service_account_name: str | None = Field(
        None,
        max_length=253,
        pattern=NAME,
        description="ServiceAccount of the trainer pods, e.g. one bound to a cloud identity for S3; it must be "
        f'labelled {contract.TRAINER_ACCOUNT_LABEL}: "true" (never the operator\'s own), else the run waits with '
        "Valid=False. The operator lets it patch this run's status (nothing more). Unset: <run>-trainer, which the "
        "operator creates.",
    )
    model_volume: ModelVolume = Field(
        default_factory=ModelVolume,
        description="Where the pulled models and datasets live.",
        json_schema_extra={"default": {}},
    )
    backoff_limit: int = Field(
        3,
        ge=0,
        le=1000,
        description="Restarts (new attempts after a failure) before the run fails; preemptions do not count.",
    )
    startup_timeout: str = Field(
        "30m",
        min_length=2,
        max_length=16,
        pattern=DURATION,
        description="How long an attempt's pods may take to start (scheduling and the image pull) before the "
        f"attempt fails with the last reason the kubelet or scheduler gave, e.g. 30m, 1h, 90s; at least "
        f"{MIN_STARTUP_TIMEOUT}. Counted from the Job's admission: time queued in Kueue does not count.",
        json_schema_extra=cel(duration_rule("startupTimeout", MIN_STARTUP_TIMEOUT)),
    )
    image_pull_deadline: str = Field(
        "10m",
        min_length=2,
        max_length=16,
        pattern=DURATION,
        description="How long the run waits for a trainer image the kubelet cannot pull (ErrImagePull, "
        "ImagePullBackOff, ErrImageNeverPull), the reason in its status, before it fails: no new attempt would pull "
        f"it either, so none starts and no restart is used. At least {MIN_IMAGE_PULL_DEADLINE}, e.g. 10m.",
        json_schema_extra=cel(duration_rule("imagePullDeadline", MIN_IMAGE_PULL_DEADLINE)),
    )
    termination_grace_period_seconds: int = Field(
        300,
        ge=10,
        le=86_400,
        description="How long a stopping pod may take: the trainer saves a checkpoint on SIGTERM within it.",
    )
    suspend: bool = Field(
        False, description="true: delete the running attempt and keep everything else; false again: resume."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, le=2**31 - 1, description="Delete a finished attempt's Job and pods this long after it ends."
    )

    eval: Eval | None = Field(
        None,
        description="Evaluate the final model once training succeeds (phase Evaluating, then Succeeded with "
        "status.eval). Unset: no evaluation.",
    )

    @property
    def startup_timeout_seconds(self) -> int:
        return duration_seconds(self.startup_timeout)

    @field_validator("recipe", mode="before")
    @classmethod
    def _small(cls, value: Any) -> Any:
        """Bounded before anything else reads it: a deep or huge inline recipe is one line, not seconds of CPU."""
        if value is not None:
            check_tree(value, RECIPE)
        return value

    @field_validator("startup_timeout")
    @classmethod
    def _bounded(cls, value: str) -> str:
        return check_duration(value, "startupTimeout", OPERATOR_MIN_STARTUP_TIMEOUT)

    @property
    def image_pull_deadline_seconds(self) -> int:
        return duration_seconds(self.image_pull_deadline)

    @field_validator("image_pull_deadline")
    @classmethod
    def _pull_bounded(cls, value: str) -> str:
        return check_duration(value, "imagePullDeadline", MIN_IMAGE_PULL_DEADLINE)


@dataclass(frozen=True)
class Defaults:
    """Operator-wide values for fields a run leaves unset, and the operator's own ServiceAccount (namespace/name),
    which no run may name (the Helm chart sets them in the environment)."""

    s3_credentials_secret: str | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_credentials_secret: str | None = None  # for runs that use the default tracking URI: it is that server's
    operator_account: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Defaults:
        names = ("WMTP_DEFAULT_S3_SECRET", "WMTP_DEFAULT_MLFLOW_URI", "WMTP_DEFAULT_MLFLOW_SECRET")
        return cls(*(env.get(name) or None for name in names), env.get("WMTP_OPERATOR_SERVICE_ACCOUNT") or None)

    def apply(self, spec: Spec) -> Spec:
        s3 = spec.s3.model_copy(update={"credentials_secret": spec.s3.credentials_secret or self.s3_credentials_secret})
        mlflow = spec.mlflow
        if mlflow.tracking_uri is None and self.mlflow_tracking_uri:  # the default server, and its default Secret
            secret = mlflow.credentials_secret or self.mlflow_credentials_secret
            mlflow = mlflow.model_copy(update={"tracking_uri": self.mlflow_tracking_uri, "credentials_secret": secret})
        return spec.model_copy(update={"s3": s3, "mlflow": mlflow})


@dataclass(frozen=True)
class Run:
    """A WMTPRun as the operator sees it: identity and parsed spec (never its status, which trainers write)."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: Spec

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
        )
