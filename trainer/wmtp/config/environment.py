"""`Config`: the environment a run trains in (where models, data and checkpoints live, MLflow, S3, devices)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator

from wmtp import contract
from wmtp.config.base import LocalPath, Name, Strict, check_uri, empty_is_unset
from wmtp.config.uris import Location, Region, Root, TrackingUri, Url


class ModelPaths(Strict):
    base: Location = Field(description="Base causal LM to train: an HF model directory (path, file:// or s3://).")
    ref: Location | None = Field(
        None, description=f"URI of {contract.MODEL_ROLES['ref']}, for the algorithms needing one."
    )
    rm: Location | None = Field(
        None, description=f"URI of {contract.MODEL_ROLES['rm']}, for the algorithms needing one."
    )

    _uris = field_validator("base", "ref", "rm")(check_uri)


class CheckpointPaths(Strict):
    base_path: Root | None = Field(
        None,
        description="Checkpoint store root: checkpoints go to <base_path>/<run name>/ (default ./checkpoints).",
    )
    save_interval: int = Field(500, ge=1, description="Save a checkpoint every this many optimizer steps.")
    keep_last: int = Field(3, ge=1, description="Committed checkpoints to keep; older ones are pruned.")
    save_final: bool = Field(True, description="Write the final model to final/ beside the run's checkpoints.")

    _uris = field_validator("base_path")(check_uri)


class Paths(Strict):
    models: ModelPaths
    datasets: dict[Name, Location] = Field(
        default_factory=dict,
        description="Dataset name → URI of a .jsonl, .jsonl.gz or .parquet file, or of a folder or prefix of them "
        "(path, file://, s3://).",
    )
    checkpoints: CheckpointPaths = Field(default_factory=CheckpointPaths)
    output_dir: LocalPath = Field(
        "./runs",
        description="Local run directory root: logs and the embedded MLflow store (<output_dir>/<run>).",
    )

    @field_validator("datasets")
    @classmethod
    def _dataset_uris(cls, value: dict[str, str]) -> dict[str, str]:
        for uri in value.values():
            check_uri(uri)
        return value


class MLflowSettings(Strict):
    tracking_uri: TrackingUri | None = Field(
        None,
        description="MLflow tracking URI: an http(s) server (credentials in MLFLOW_TRACKING_USERNAME/PASSWORD or "
        "MLFLOW_TRACKING_TOKEN, never in the URI), or sqlite:/// or file:/// here. Unset: the operator's default "
        "on Kubernetes, else a sqlite store in the run directory (no server needed).",
    )
    registry_uri: TrackingUri | None = Field(None, description="MLflow model registry URI. Unset: the tracking URI.")
    experiment: str = Field("wmtp", min_length=1, max_length=256, description="MLflow experiment name.")
    registered_model: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$",
        description="Name the final model is registered under. Unset: wmtp-<algorithm>; the operator sets "
        "wmtp-<namespace>-<algorithm>, so that runs of different namespaces never share a registered model.",
    )

    _unset = field_validator("tracking_uri", "registry_uri", mode="before")(empty_is_unset)


class S3Settings(Strict):
    endpoint_url: Url | None = Field(
        None, description="S3 endpoint (MinIO, moto, ...), http(s)://host[:port]. Unset: AWS or AWS_ENDPOINT_URL."
    )
    region: Region | None = Field(None, description="S3 region. Unset: AWS_REGION / AWS_DEFAULT_REGION.")
    access_key_id: SecretStr | None = Field(None, description="Access key; prefer the standard AWS environment.")
    secret_access_key: SecretStr | None = Field(None, description="Secret key; prefer the standard AWS environment.")

    _unset = field_validator("endpoint_url", "region", mode="before")(empty_is_unset)


class DistributedSettings(Strict):
    enabled: bool = Field(False, description="Join a torch.distributed process group from the torchrun environment.")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto: nccl on CUDA, gloo on CPU.")
    timeout_s: int = Field(
        600, ge=1, le=86_400, description="Collective timeout; a dead rank fails the others after this."
    )


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
    seed: int = Field(42, ge=0, lt=2**32, description="Seed for python, numpy and torch RNGs and the data order.")
    log_interval: int = Field(10, ge=1, description="Log metrics every this many optimizer steps.")
