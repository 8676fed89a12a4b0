"""The two YAML documents a run is made of, as pydantic models.

`Config` describes the environment (where models, data and checkpoints live, MLflow, devices); `Recipe`
describes the experiment (algorithm, loss, data mix, optimiser). Both forbid unknown keys, and every error
names the file, the dotted field path and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from wmtp import contract
from wmtp.storage import parse_uri


class ConfigError(ValueError):
    """A config or recipe that cannot be used; the message says where and how to fix it."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _check_uri(value: str | None) -> str | None:
    if value is not None:
        parse_uri(value)
    return value


Uri = Annotated[str, Field(min_length=1)]


# ----------------------------------------------------------------------------- config (environment)


class ModelPaths(Strict):
    base: Uri = Field(description="Base causal LM to train: an HF model directory (path, file:// or s3://).")
    ref: Uri | None = Field(None, description=f"URI of {contract.MODEL_ROLES['ref']}, for the algorithms needing one.")
    rm: Uri | None = Field(None, description=f"URI of {contract.MODEL_ROLES['rm']}, for the algorithms needing one.")

    _uris = field_validator("base", "ref", "rm")(_check_uri)


class CheckpointPaths(Strict):
    base_path: Uri | None = Field(
        None,
        description="Checkpoint store root: checkpoints go to <base_path>/<run name>/ (default ./checkpoints).",
    )
    save_interval: int = Field(500, ge=1, description="Save a checkpoint every this many optimizer steps.")
    keep_last: int = Field(3, ge=1, description="Committed checkpoints to keep; older ones are pruned.")
    save_final: bool = Field(True, description="Write the final model to final/ beside the run's checkpoints.")

    _uris = field_validator("base_path")(_check_uri)


class Paths(Strict):
    models: ModelPaths
    datasets: dict[str, Uri] = Field(
        default_factory=dict,
        description="Dataset name → URI of a .jsonl/.jsonl.gz file (path, file://, s3://).",
    )
    checkpoints: CheckpointPaths = Field(default_factory=CheckpointPaths)
    output_dir: str = Field(
        "./runs",
        description="Local run directory root: logs and the embedded MLflow store (<output_dir>/<run>).",
    )

    @field_validator("datasets")
    @classmethod
    def _dataset_uris(cls, value: dict[str, str]) -> dict[str, str]:
        for uri in value.values():
            parse_uri(uri)
        return value


class MLflowSettings(Strict):
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI. Unset: the operator's default on Kubernetes, else a sqlite store in the "
        "run directory (no server needed).",
    )
    registry_uri: str | None = Field(None, description="MLflow model registry URI. Unset: the tracking URI.")
    experiment: str = Field("wmtp", min_length=1, description="MLflow experiment name.")


class S3Settings(Strict):
    endpoint_url: str | None = Field(
        None, description="S3 endpoint (MinIO, moto, ...). Unset: AWS or AWS_ENDPOINT_URL."
    )
    region: str | None = Field(None, description="S3 region. Unset: AWS_REGION / AWS_DEFAULT_REGION.")
    access_key_id: SecretStr | None = Field(None, description="Access key; prefer the standard AWS environment.")
    secret_access_key: SecretStr | None = Field(None, description="Secret key; prefer the standard AWS environment.")


class DistributedSettings(Strict):
    enabled: bool = Field(False, description="Join a torch.distributed process group from the torchrun environment.")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto: nccl on CUDA, gloo on CPU.")
    timeout_s: int = Field(600, ge=1, description="Collective timeout; a dead rank fails the others after this.")


class FSDPSettings(Strict):
    enabled: bool = Field(False, description="Shard model and optimizer with FSDP2 when distributed.")
    activation_checkpointing: bool = Field(False, description="Recompute transformer-block activations in backward.")
    cpu_offload: bool = Field(
        False, description="Keep sharded parameters and optimizer state in host memory (CUDA; no-op on CPU)."
    )


class Devices(Strict):
    compute_backend: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto: cuda if available.")
    mixed_precision: Literal["no", "bf16"] = Field("no", description="bf16: autocast compute on CUDA (CPU stays fp32).")
    distributed: DistributedSettings = Field(default_factory=DistributedSettings)
    fsdp: FSDPSettings = Field(default_factory=FSDPSettings)


class Config(Strict):
    """Where things are and what to run on: the same recipe runs unchanged on a laptop or a cluster."""

    paths: Paths
    mlflow: MLflowSettings = Field(default_factory=MLflowSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    devices: Devices = Field(default_factory=Devices)
    seed: int = Field(42, description="Seed for python, numpy and torch RNGs and the data order.")
    log_interval: int = Field(10, ge=1, description="Log metrics every this many optimizer steps.")


# ----------------------------------------------------------------------------- recipe (experiment)


class RunSection(Strict):
    name: str = Field(
        description="Run name: names the run directory, checkpoint folder and MLflow run.",
        pattern=r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$",
    )
    tags: dict[str, str] = Field(default_factory=dict, description="Extra MLflow tags.")


class TrainSection(Strict):
    algo: str = Field(description="The algorithm: baseline-mtp, critic-wmtp, rho1-wmtp or a registered plugin.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; unset: run num_epochs epochs.")
    num_epochs: int = Field(1, ge=1, description="Epochs when max_steps is unset.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    eval_interval: int = Field(50, ge=1, description="Evaluate held-out loss every this many steps.")

    @field_validator("algo")
    @classmethod
    def _registered(cls, value: str) -> str:
        contract.algorithm(value)
        return value


class OptimSection(Strict):
    name: Literal["adamw"] = Field("adamw", description="Optimizer.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float | None = Field(1.0, gt=0, description="Max global gradient norm; null disables clipping.")
    scheduler: Literal["cosine", "constant"] = Field("cosine", description="LR schedule after warmup.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps of linear warmup.")


DatasetFormat = Literal["mbpp", "codecontests", "humaneval", "jsonl"]


class DataSource(Strict):
    name: str = Field(description="A key of the config's paths.datasets.")
    format: DatasetFormat | None = Field(None, description="Record layout; unset: the name if it is a known format.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many records.")

    @property
    def resolved_format(self) -> str:
        if self.format:
            return self.format
        return self.name if self.name in ("mbpp", "codecontests", "humaneval") else "jsonl"


class DataSection(Strict):
    sources: list[DataSource] = Field(min_length=1, description="Datasets to mix, by name.")
    max_length: int = Field(512, ge=8, description="Tokens per training sequence.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch (global, across ranks).")
    pack: bool = Field(True, description="Concatenate examples into full sequences instead of padding each.")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Fraction of examples held out for evaluation.")


class ModelSection(Strict):
    head_type: Literal["block", "linear"] = Field(
        "block", description="Extra heads: one transformer block each (Meta's layout) or a linear map."
    )


class LossSection(Strict):
    n_heads: int = Field(4, ge=1, le=16, description="Output heads; head k predicts token t+k+1.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature for weights.")
    epsilon: float = Field(0.05, ge=0, description="Lower clip of normalised weights.")
    max_weight: float = Field(3.0, gt=0, description="Upper clip of normalised weights.")


class Rho1Section(Strict):
    selection_mode: Literal["topk", "weighted"] = Field("topk", description="Hard top-k selection or soft weights.")
    k_percent: float = Field(0.6, gt=0, le=1, description="topk: fraction of valid targets kept, by excess loss.")


class CriticSection(Strict):
    gamma: float = Field(0.99, ge=0, le=1, description="GAE discount.")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    discount_lambda: float = Field(0.9, ge=0, le=1, description="λ_d in the TD delta δ_t = V_t − λ_d·V_{t−1}.")
    value_coef: float = Field(0.5, ge=0, description="Weight of the value-head MSE in the total loss.")
    pretrain_steps: int = Field(20, ge=0, description="Stage 1: value-head-only steps before MTP training.")
    pretrain_lr: float = Field(1e-3, gt=0, description="Stage 1 learning rate.")


class CheckpointingSection(Strict):
    checkpoint_path: Uri | None = Field(None, description="Overrides the config's paths.checkpoints.base_path.")
    auto_resume_latest: bool = Field(False, description="Resume from the latest checkpoint when --resume is unset.")

    _uris = field_validator("checkpoint_path")(_check_uri)


class Recipe(Strict):
    """What to train and how; the same file runs on a laptop or on a cluster."""

    run: RunSection
    train: TrainSection
    data: DataSection
    optim: OptimSection = Field(default_factory=OptimSection)
    model: ModelSection = Field(default_factory=ModelSection)
    loss: LossSection = Field(default_factory=LossSection)
    rho1: Rho1Section = Field(default_factory=Rho1Section)
    critic: CriticSection = Field(default_factory=CriticSection)
    checkpointing: CheckpointingSection = Field(default_factory=CheckpointingSection)


# ----------------------------------------------------------------------------- loading

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(text: str, env: dict[str, str] | None = None) -> str:
    """Expand `${VAR}` and `${VAR:-default}`; an unset variable without a default is an error."""
    env = os.environ if env is None else env

    def expand(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ConfigError(f"${{{name}}} is not set; export it or write ${{{name}:-default}}")
            return default
        return value

    return _VAR.sub(expand, text)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(substitute_env(path.read_text()))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: {err.error_count()} problem(s)"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        elif e["type"] == "literal_error" or e["type"] == "enum":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None


def parse_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None


def check_compatible(
    config: Config,
    recipe: Recipe,
    source: str = "config",
    datasets: str = "paths.datasets",
    models: str = "paths.models",
) -> None:
    """Cross-document rules: the models the recipe's algorithm needs and the datasets it names must be in the
    config. `datasets` and `models` name those sections as the user wrote them (the operator's spec differs)."""
    problems = []
    for role in contract.algorithm(recipe.train.algo).frozen:
        if getattr(config.paths.models, role) is None:
            problems.append(
                f"{models}.{role}: required by train.algo={recipe.train.algo} ({contract.MODEL_ROLES[role]})"
            )
    for data_source in recipe.data.sources:
        if data_source.name not in config.paths.datasets:
            known = ", ".join(sorted(config.paths.datasets)) or "none"
            problems.append(f"{datasets}.{data_source.name}: named by the recipe's data.sources; defined: {known}")
    if problems:
        raise ConfigError(f"{source}: " + "\n  ".join(["config and recipe do not fit:", *problems]))


def load_config(path: str | Path) -> Config:
    path = Path(path)
    return parse_config(_read_yaml(path), str(path))


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    return parse_recipe(_read_yaml(path), str(path))


def load(config_path: str | Path, recipe_path: str | Path) -> tuple[Config, Recipe]:
    config, recipe = load_config(config_path), load_recipe(recipe_path)
    check_compatible(config, recipe, str(config_path))
    return config, recipe


def config_hash(config: Config, recipe: Recipe) -> str:
    """Fingerprint of what determines training; secrets, output locations and devices are left out (a run
    may resume on other hardware or another number of ranks)."""
    payload = {
        "config": config.model_dump(
            mode="json", exclude={"s3": True, "mlflow": True, "devices": True, "paths": {"output_dir"}}
        ),
        "recipe": recipe.model_dump(mode="json", exclude={"checkpointing"}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_root(config: Config, recipe: Recipe) -> str:
    """Where this run's checkpoints go: recipe checkpoint_path > config base_path > ./checkpoints."""
    base = recipe.checkpointing.checkpoint_path or config.paths.checkpoints.base_path or "./checkpoints"
    return f"{base.rstrip('/')}/{recipe.run.name}"


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Dotted key → string value, for MLflow params."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(data) if isinstance(data, list | tuple) else str(data)}
