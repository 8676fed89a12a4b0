"""Pure rendering: a WMTPRun → the trainer's files and the Kubernetes objects of one attempt.

Nothing here talks to the cluster. The trainer's config and recipe are built and validated with the trainer's
own pydantic models, so a recipe the trainer would refuse is refused here, before anything is created.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from wmtp import contract
from wmtp.config import (
    CheckpointPaths,
    Config,
    ConfigError,
    MLflowSettings,
    Recipe,
    S3Settings,
    check_compatible,
    parse_config,
    parse_recipe,
    parse_yaml,
)
from wmtp.contract import CONFIG_DIR, CONFIG_FILE, GROUP, KIND, MODEL_DIR, PULL_FILE, RECIPE_FILE, VERSION, WORK_DIR
from wmtp_operator.spec import Run, Spec

MANAGED_BY = "app.kubernetes.io/managed-by"
OPERATOR = "wmtp-operator"
RUN_LABEL = f"{GROUP}/run"
ATTEMPT_LABEL = f"{GROUP}/attempt"
MASTER_PORT = 29500
# The Job controller writes each pod's completion index here; it is the torchrun node rank.
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


@dataclass(frozen=True)
class TrainerFiles:
    config: Config
    recipe: Recipe
    pulls: list[dict[str, str]]  # {uri, dest} for `wmtp pull --spec`


def job_name(run_name: str, attempt: int) -> str:
    return f"{run_name}-a{attempt}"


def config_map_name(run_name: str) -> str:
    return f"{run_name}-config"


def claim_name(run_name: str) -> str:
    return f"{run_name}-models"


def trainer_files(run: Run, recipe_text: str | None = None) -> TrainerFiles:
    """The trainer's config and recipe for this run; raises ConfigError naming what is wrong."""
    spec = run.spec
    recipe = parse_recipe(_recipe_data(run, recipe_text), source=_recipe_source(spec))
    if recipe.checkpointing.checkpoint_path is not None:
        raise ConfigError(
            f"{_recipe_source(spec)}: checkpointing.checkpoint_path conflicts with spec.checkpoints.basePath; "
            "the WMTPRun owns where its checkpoints go: remove checkpointing.checkpoint_path from the recipe"
        )
    # S3 models and datasets are pulled into the model volume; other URIs are paths the pod can already read.
    pulls: list[dict[str, str]] = []
    models: dict[str, str] = {}
    for role in ("base", *contract.MODEL_ROLES):
        uri = getattr(spec.models, role)
        if uri is not None:
            models[role] = _pulled(uri, f"{MODEL_DIR}/{role}", pulls, single_object=False)
    datasets = {name: _pulled(uri, f"{MODEL_DIR}/data/{name}", pulls, True) for name, uri in spec.datasets.items()}
    world = spec.nodes * spec.nproc_per_node
    gpus = spec.resources is not None and any(key.endswith("/gpu") for key in spec.resources.limits)
    config = {
        "paths": {
            "models": models,
            "datasets": datasets,
            "checkpoints": _trainer_section(spec.checkpoints, CheckpointPaths),
            "output_dir": f"{WORK_DIR}/runs",
        },
        "mlflow": _trainer_section(spec.mlflow, MLflowSettings),
        "s3": _trainer_section(spec.s3, S3Settings),
        "devices": {
            "mixed_precision": "bf16" if gpus else "no",
            "distributed": {"enabled": world > 1},
            "fsdp": {"enabled": world > 1},
        },
    }
    parsed = parse_config(config, source="WMTPRun spec")
    check_compatible(parsed, recipe, "WMTPRun spec", datasets="spec.datasets", models="spec.models")
    return TrainerFiles(parsed, recipe, pulls)


def _trainer_section(section: BaseModel, model: type[BaseModel]) -> dict[str, Any]:
    """The fields of a spec section that the trainer's config model has too (the spec derives them from it)."""
    return section.model_dump(include=set(model.model_fields))


def _pulled(uri: str, dest: str, pulls: list[dict[str, str]], single_object: bool) -> str:
    """The path the trainer reads `uri` from, adding a pull for S3 URIs; `wmtp pull` puts one object in dest/."""
    if not uri.startswith("s3://"):
        return uri
    pulls.append({"uri": uri, "dest": dest})
    return f"{dest}/{uri.rstrip('/').rsplit('/', 1)[-1]}" if single_object else dest


def _recipe_source(spec: Spec) -> str:
    ref = spec.recipe_ref
    return f"recipeRef ConfigMap {ref.name} key {ref.key}" if ref else "spec.recipe"


def _recipe_data(run: Run, recipe_text: str | None) -> dict[str, Any]:
    spec = run.spec
    if spec.recipe_ref is not None:
        if recipe_text is None:
            raise ConfigError(f"{_recipe_source(spec)}: not found")
        data = parse_yaml(recipe_text, _recipe_source(spec))
        if not isinstance(data, dict):
            raise ConfigError(f"{_recipe_source(spec)}: expected a mapping at the top level")
    else:
        data = copy.deepcopy(spec.recipe or {})
    # Checkpoint folders and MLflow runs are named after run.name; the WMTPRun's name keeps them apart.
    section = data.get("run")
    data["run"] = {**(section if isinstance(section, dict) else {}), "name": run.name}
    train = data.get("train")
    if isinstance(train, dict):
        algo = train.setdefault("algo", spec.algorithm)
        if algo != spec.algorithm:
            raise ConfigError(f"{_recipe_source(spec)}: train.algo is {algo} but spec.algorithm is {spec.algorithm}")
    return data


def labels(run: Run, attempt: int | None = None) -> dict[str, str]:
    out = {MANAGED_BY: OPERATOR, RUN_LABEL: run.name}
    return out if attempt is None else {**out, ATTEMPT_LABEL: str(attempt)}


def _metadata(run: Run, name: str, attempt: int | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": run.namespace,
        "labels": labels(run, attempt),
        "ownerReferences": [
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": run.name,
                "uid": run.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def _dump(data: Any) -> str:
    """A file for the trainer: marked as rendered, so the trainer takes its values as data."""
    return contract.RENDERED_MARKER + yaml.safe_dump(data, sort_keys=False, width=120)


def config_map(run: Run, files: TrainerFiles) -> dict[str, Any]:
    data = {
        CONFIG_FILE: _dump(files.config.model_dump(mode="json")),
        RECIPE_FILE: _dump(files.recipe.model_dump(mode="json")),
    }
    if files.pulls:
        data[PULL_FILE] = _dump(files.pulls)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(run, config_map_name(run.name)),
        "data": data,
    }


def service(run: Run) -> dict[str, Any]:
    """Headless: gives each pod of an attempt a stable DNS name, rank 0's being the rendezvous address."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(run, run.name),
        "spec": {
            "clusterIP": "None",
            # Ranks must find rank 0 before any of them is Ready.
            "publishNotReadyAddresses": True,
            "selector": labels(run),
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
        },
    }


def model_claim(run: Run) -> dict[str, Any] | None:
    volume = run.spec.model_volume
    if volume.type != "persistentVolumeClaim":
        return None
    spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": volume.size}}}
    if volume.storage_class_name:
        spec["storageClassName"] = volume.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(run, claim_name(run.name)),
        "spec": spec,
    }


def _env(run: Run) -> list[dict[str, Any]]:
    spec = run.spec
    env: list[dict[str, Any]] = [
        {"name": contract.ENV_RUN_NAME, "value": run.name},
        {"name": contract.ENV_RUN_NAMESPACE, "value": run.namespace},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if spec.s3.endpoint_url:
        env += [{"name": "AWS_ENDPOINT_URL", "value": spec.s3.endpoint_url}]
        env += [{"name": "MLFLOW_S3_ENDPOINT_URL", "value": spec.s3.endpoint_url}]
    if spec.s3.region:
        env += [
            {"name": "AWS_REGION", "value": spec.s3.region},
            {"name": "AWS_DEFAULT_REGION", "value": spec.s3.region},
        ]
    if spec.s3.credentials_secret:
        for key, optional in (
            ("AWS_ACCESS_KEY_ID", False),
            ("AWS_SECRET_ACCESS_KEY", False),
            ("AWS_SESSION_TOKEN", True),
        ):
            ref = {"name": spec.s3.credentials_secret, "key": key, "optional": optional}
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    if spec.mlflow.tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": spec.mlflow.tracking_uri})
    return env


def _volumes(run: Run) -> list[dict[str, Any]]:
    volume = run.spec.model_volume
    if volume.type == "persistentVolumeClaim":
        models: dict[str, Any] = {"persistentVolumeClaim": {"claimName": claim_name(run.name)}}
    else:
        models = {"emptyDir": {"sizeLimit": volume.size} if volume.size is not None else {}}
    return [
        {"name": "config", "configMap": {"name": config_map_name(run.name)}},
        {"name": "models", **models},
        # NCCL and the DataLoader workers exchange tensors through /dev/shm; the container default is 64 MiB.
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
        {"name": "workspace", "emptyDir": {}},
    ]


def _shared_mounts() -> list[dict[str, Any]]:
    return [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "models", "mountPath": MODEL_DIR},
    ]


def resume_of(spec: Spec) -> str:
    return spec.resume_from or spec.resume


def trainer_args(run: Run, attempt: int) -> list[str]:
    spec = run.spec
    return [
        f"--nnodes={spec.nodes}",
        f"--nproc-per-node={spec.nproc_per_node}",
        f"--node-rank=$({contract.ENV_NODE_RANK})",
        # Indexed Job pods are named <job>-<index> under the headless Service's subdomain.
        f"--master-addr={job_name(run.name, attempt)}-0.{run.name}",
        f"--master-port={MASTER_PORT}",
        "-m",
        "wmtp",
        "train",
        "--config",
        f"{CONFIG_DIR}/{CONFIG_FILE}",
        "--recipe",
        f"{CONFIG_DIR}/{RECIPE_FILE}",
        "--resume",
        resume_of(spec),
    ]


def job(run: Run, attempt: int, pull: bool) -> dict[str, Any]:
    """The attempt: all `nodes` pods start together and none is retried alone (backoffLimit 0)."""
    spec = run.spec
    node_rank = {
        "name": contract.ENV_NODE_RANK,
        "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}},
    }
    trainer: dict[str, Any] = {
        "name": "trainer",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["torchrun"],
        "args": trainer_args(run, attempt),
        "workingDir": WORK_DIR,
        "env": [*_env(run), node_rank],
        "ports": [{"name": "rendezvous", "containerPort": MASTER_PORT}],
        "volumeMounts": [
            *_shared_mounts(),
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "workspace", "mountPath": WORK_DIR},
        ],
    }
    if spec.resources is not None:
        trainer["resources"] = spec.resources.model_dump(exclude_defaults=True)
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": run.name,
        "containers": [trainer],
        "volumes": _volumes(run),
    }
    if pull:
        pod["initContainers"] = [
            {
                "name": "pull",
                "image": spec.image,
                "imagePullPolicy": spec.image_pull_policy,
                "command": ["wmtp", "pull", "--spec", f"{CONFIG_DIR}/{PULL_FILE}"],
                "env": _env(run),
                "volumeMounts": _shared_mounts(),
            }
        ]
    if spec.service_account_name:
        pod["serviceAccountName"] = spec.service_account_name
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations]
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": spec.nodes,
        "parallelism": spec.nodes,
        "backoffLimit": 0,
        "template": {"metadata": {"labels": labels(run, attempt)}, "spec": pod},
    }
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(run, job_name(run.name, attempt), attempt),
        "spec": job_spec,
    }


def attempt_objects(run: Run, files: TrainerFiles, attempt: int) -> list[dict[str, Any]]:
    """Everything attempt `attempt` needs, in creation order (the Job last: its pods mount the rest)."""
    claim = model_claim(run)
    return [
        config_map(run, files),
        service(run),
        *([claim] if claim else []),
        job(run, attempt, pull=bool(files.pulls)),
    ]
