"""The trainer's files for a run: config.yaml, recipe.yaml and pull.yaml, built with the trainer's own models.

A recipe the trainer would refuse is refused here, before anything is created. The files start with
`contract.RENDERED_MARKER`: their values are data, so a recipe tag "${AWS_SECRET_ACCESS_KEY}" stays text.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from wmtp import contract
from wmtp.config import (
    CheckpointPaths,
    Config,
    ConfigError,
    DistributedSettings,
    FSDPSettings,
    MLflowSettings,
    Recipe,
    S3Settings,
    check_compatible,
    parse_config,
    parse_recipe,
    parse_yaml,
)
from wmtp.contract import MODEL_DIR, WORK_DIR
from wmtp_operator.formats import RECIPE
from wmtp_operator.spec import Run, Spec


@dataclass(frozen=True)
class TrainerFiles:
    config: Config
    recipe: Recipe
    pulls: list[dict[str, str]]  # {uri, dest[, weights]} for `wmtp pull --spec`


def weights_on_rank0_only(spec: Spec) -> bool:
    """Whether the pods of node ranks other than 0 leave the models' weight files out of their pulls. Distributed,
    global rank 0 alone reads weights (the others build on the meta device and receive their shards), so a pod with
    its own volume needs only the config and tokenizer files unless it is node rank 0's. On a shared PVC every pod
    pulls everything: the first puller fills it for all pods and attempts, the others find it complete."""
    return spec.nodes > 1 and spec.model_volume.type == "emptyDir"


def pulls(spec: Spec) -> list[dict[str, str]]:
    """What `wmtp pull` fetches into the model volume: the s3:// models and datasets (other URIs are paths the pod
    can already read); models marked for their weights on node rank 0 alone where `weights_on_rank0_only`."""
    weights = {contract.PULL_WEIGHTS: contract.PULL_WEIGHTS_RANK0} if weights_on_rank0_only(spec) else {}
    found = [
        {"uri": uri, "dest": f"{MODEL_DIR}/{role}", **weights}
        for role in ("base", *contract.MODEL_ROLES)
        if (uri := getattr(spec.models, role)) is not None and uri.startswith("s3://")
    ]
    found += [
        {"uri": uri, "dest": f"{MODEL_DIR}/data/{name}"}
        for name, uri in spec.datasets.items()
        if uri.startswith("s3://")
    ]
    return found


def _read_path(uri: str, dest: str, single_object: bool) -> str:
    """Where the trainer reads `uri`: its pull destination (`wmtp pull` puts one object in dest/), else itself."""
    if not uri.startswith("s3://"):
        return uri
    return f"{dest}/{uri.rstrip('/').rsplit('/', 1)[-1]}" if single_object else dest


def has_gpus(spec: Spec) -> bool:
    return spec.resources is not None and any(key.endswith("/gpu") for key in spec.resources.limits)


def trainer_files(run: Run, recipe_text: str | None = None) -> TrainerFiles:
    """The trainer's config and recipe for this run; raises ConfigError naming what is wrong."""
    spec = run.spec
    recipe = parse_recipe(_recipe_data(run, recipe_text), source=recipe_source(spec))
    if recipe.checkpointing.checkpoint_path is not None:
        raise ConfigError(
            f"{recipe_source(spec)}: checkpointing.checkpoint_path conflicts with spec.checkpoints.basePath; "
            "the WMTPRun owns where its checkpoints go: remove checkpointing.checkpoint_path from the recipe"
        )
    models = {
        role: _read_path(uri, f"{MODEL_DIR}/{role}", single_object=False)
        for role in ("base", *contract.MODEL_ROLES)
        if (uri := getattr(spec.models, role)) is not None
    }
    datasets = {name: _read_path(uri, f"{MODEL_DIR}/data/{name}", True) for name, uri in spec.datasets.items()}
    distributed = spec.nodes * spec.nproc_per_node > 1
    config = {
        "paths": {
            "models": models,
            "datasets": datasets,
            "checkpoints": _trainer_section(spec.checkpoints, CheckpointPaths),
            "output_dir": f"{WORK_DIR}/runs",
        },
        "mlflow": {**_trainer_section(spec.mlflow, MLflowSettings), **mlflow_names(run)},
        "s3": _trainer_section(spec.s3, S3Settings),
        "devices": {
            "mixed_precision": spec.devices.mixed_precision or ("bf16" if has_gpus(spec) else "no"),
            "distributed": {**_trainer_section(spec.devices.distributed, DistributedSettings), "enabled": distributed},
            "fsdp": {**_trainer_section(spec.devices.fsdp, FSDPSettings), "enabled": distributed},
        },
    }
    parsed = parse_config(config, source="WMTPRun spec")
    check_compatible(parsed, recipe, "WMTPRun spec", datasets="spec.datasets", models="spec.models")
    return TrainerFiles(parsed, recipe, pulls(spec))


def mlflow_names(run: Run) -> dict[str, str]:
    """The run's MLflow experiment and registered model, its namespace's own: `<namespace>/<experiment>` and
    `wmtp-<namespace>-<algorithm>`. On a server with authentication (the chart's) whoever creates an experiment or a
    registered model owns it and others may only read it, so each namespace's credentials write to their own."""
    return {
        "experiment": f"{run.namespace}/{run.spec.mlflow.experiment}",
        "registered_model": f"wmtp-{run.namespace}-{run.spec.algorithm}",
    }


def _trainer_section(section: BaseModel, model: type[BaseModel]) -> dict[str, Any]:
    """The fields of a spec section that the trainer's config model has too (the spec derives them from it)."""
    return section.model_dump(include=set(model.model_fields))


def recipe_source(spec: Spec) -> str:
    ref = spec.recipe_ref
    return f"recipeRef ConfigMap {ref.name} key {ref.key}" if ref else "spec.recipe"


def _recipe_data(run: Run, recipe_text: str | None) -> dict[str, Any]:
    spec = run.spec
    if spec.recipe_ref is not None:
        if recipe_text is None:
            raise ConfigError(f"{recipe_source(spec)}: not found")
        data = _parsed(recipe_text, recipe_source(spec))
    else:
        data = copy.deepcopy(spec.recipe or {})
    # Checkpoint folders and MLflow runs are named after run.name; the WMTPRun's name keeps them apart.
    section = data.get("run")
    data["run"] = {**(section if isinstance(section, dict) else {}), "name": run.name}
    train = data.get("train")
    if isinstance(train, dict):
        algo = train.setdefault("algo", spec.algorithm)
        if algo != spec.algorithm:
            raise ConfigError(f"{recipe_source(spec)}: train.algo is {algo} but spec.algorithm is {spec.algorithm}")
    return data


def _parsed(text: str, source: str) -> dict[str, Any]:
    """A recipe ConfigMap's YAML within `formats.RECIPE`, parsed once per content: every pass of the run reads it
    again."""
    if len(text) > RECIPE.max_bytes:
        raise ConfigError(f"{source}: {len(text)} characters, more than the {RECIPE.max_bytes} a recipe may have")
    ok, result = _parse_cached(text, source)
    if not ok:
        raise ConfigError(result)
    return copy.deepcopy(result)


@functools.lru_cache(maxsize=64)  # at most 64 × RECIPE.max_bytes of keys
def _parse_cached(text: str, source: str) -> tuple[bool, Any]:
    try:
        data = parse_yaml(text, RECIPE, source=source)
    except ConfigError as err:
        return False, str(err)
    if not isinstance(data, dict):
        return False, f"{source}: expected a mapping at the top level"
    return True, data


# libyaml's emitter when PyYAML has it (its wheels do): three times faster, the same text.
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def dump(data: Any) -> str:
    """A file for the trainer: marked as rendered, so the trainer takes its values as data."""
    return contract.RENDERED_MARKER + yaml.dump(data, Dumper=_DUMPER, sort_keys=False, width=120)
