"""Loading a config and a recipe, the rules across the two, and what is derived from the pair."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from wmtp import contract
from wmtp.config.documents import ConfigError, clip, format_validation_error, read_document
from wmtp.config.environment import Config
from wmtp.config.recipe import Recipe


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
            known = clip(", ".join(sorted(config.paths.datasets)) or "none", 200)
            problems.append(f"{datasets}.{data_source.name}: named by the recipe's data.sources; defined: {known}")
    if problems:
        raise ConfigError(f"{source}: " + "\n  ".join(["config and recipe do not fit:", *problems]))


def load_config(path: str | Path) -> Config:
    path = Path(path)
    return parse_config(read_document(path), str(path))


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    return parse_recipe(read_document(path), str(path))


def load(config_path: str | Path, recipe_path: str | Path) -> tuple[Config, Recipe]:
    config, recipe = load_config(config_path), load_recipe(recipe_path)
    check_compatible(config, recipe, str(config_path))
    return config, recipe


def config_hash(config: Config, recipe: Recipe) -> str:
    """Fingerprint of what determines the training trajectory, the resume guard: the models, the data, the
    algorithm and its loss, the optimizer, the seed and the batch (size and accumulation). Operational settings are
    left out so that none of them blocks a resume: save interval, retention, logging, evaluation cadence,
    max_steps and epochs, devices and world size, MLflow, S3, the run's name and tags and every output location."""
    payload = {
        "models": config.paths.models.model_dump(mode="json"),
        "datasets": config.paths.datasets,
        "seed": config.seed,
        # Excluded by name, so that a section added to the recipe later counts until someone decides otherwise.
        "recipe": recipe.model_dump(
            mode="json",
            exclude={"run": True, "checkpointing": True, "train": {"max_steps", "num_epochs", "eval_interval"}},
        ),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


_RECIPE_OVERRIDES = ("save_interval", "keep_last", "save_final")


def resolve_checkpointing(config: Config, recipe: Recipe) -> Config:
    """The config with the checkpoint settings the run uses: the recipe's `checkpointing` (save_interval,
    keep_last, save_final, checkpoint_path as base_path) over the config's `paths.checkpoints`. `wmtp train`'s
    flags go in first through `override_checkpointing`, so the precedence is CLI > recipe > config."""
    section = recipe.checkpointing
    update: dict[str, Any] = {k: getattr(section, k) for k in _RECIPE_OVERRIDES if getattr(section, k) is not None}
    if section.checkpoint_path is not None:
        update["base_path"] = section.checkpoint_path
    checkpoints = config.paths.checkpoints.model_copy(update=update)
    return config.model_copy(update={"paths": config.paths.model_copy(update={"checkpoints": checkpoints})})


def override_checkpointing(recipe: Recipe, **flags: Any) -> Recipe:
    """The recipe with the command line's checkpoint settings (those not None) in its `checkpointing`."""
    update = {key: value for key, value in flags.items() if value is not None}
    unknown = set(update) - set(_RECIPE_OVERRIDES)
    if unknown:
        raise ValueError(f"not checkpoint settings: {', '.join(sorted(unknown))}")
    return recipe.model_copy(update={"checkpointing": recipe.checkpointing.model_copy(update=update)})


def checkpoint_root(config: Config, recipe: Recipe) -> str:
    """Where this run's checkpoints go: recipe checkpoint_path > config base_path > ./checkpoints."""
    base = resolve_checkpointing(config, recipe).paths.checkpoints.base_path or "./checkpoints"
    return run_root(base, recipe.run.name)


def run_root(base_path: str, run_name: str) -> str:
    """<base_path>/<run name>: the run's checkpoints, and its final model in `contract.FINAL_DIR`."""
    return f"{base_path.rstrip('/')}/{run_name}"


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Dotted key → string value, for MLflow params."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(data) if isinstance(data, list | tuple) else str(data)}
