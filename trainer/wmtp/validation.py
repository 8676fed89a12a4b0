"""The dry run behind `wmtp validate`: load, resolve and check everything a run needs, report all at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from wmtp import contract
from wmtp.config import (
    Config,
    ConfigError,
    Recipe,
    check_compatible,
    checkpoint_root,
    load_config,
    load_recipe,
)
from wmtp.storage import Storage, parse_uri


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    config: Config | None = None
    recipe: Recipe | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_location(storage: Storage, what: str, uri: str, report: Report) -> None:
    try:
        found = storage.exists(parse_uri(uri))
        status = "found" if found else "MISSING"
    except Exception as err:  # an unreachable endpoint or denied access is a problem to report, not a crash
        found, status = False, f"ERROR: {type(err).__name__}: {err}"
    report.rows.append((what, uri, status))
    if not found:
        report.problems.append(f"{what}: {uri} — {status.lower() if status == 'MISSING' else status}")


def _check_vocabularies(storage: Storage, config: Config, recipe: Recipe, report: Report) -> None:
    """The models' vocabularies and tokenizers must match: read from config and tokenizer files, never weights."""
    from wmtp.models import vocabulary_problems

    try:
        problems = vocabulary_problems(config.paths.models, contract.algorithm(recipe.train.algo).frozen, storage)
    except ConfigError as err:
        problems = [str(err)]
    report.rows.append(("vocabularies", "MISMATCH" if problems else "match", "from config and tokenizer files"))
    report.problems += problems


def validate_run(config_path: str, recipe_path: str, storage: Storage | None = None) -> Report:
    report = Report()
    for loader, path, attr in ((load_config, config_path, "config"), (load_recipe, recipe_path, "recipe")):
        try:
            setattr(report, attr, loader(path))
        except ConfigError as err:
            report.problems.append(str(err))
    config, recipe = report.config, report.recipe
    if config is None or recipe is None:
        return report
    try:
        check_compatible(config, recipe, config_path)
    except ConfigError as err:
        report.problems.append(str(err))
    storage = storage or Storage(config.s3)
    models = config.paths.models
    needed = {"base model": models.base}
    for role in contract.algorithm(recipe.train.algo).frozen:
        if getattr(models, role):
            needed[contract.MODEL_ROLES[role].name] = getattr(models, role)
    for what, uri in needed.items():
        _check_location(storage, what, uri, report)
    if all(row[2] == "found" for row in report.rows):
        _check_vocabularies(storage, config, recipe, report)
    for source in recipe.data.sources:
        if source.name in config.paths.datasets:
            _check_location(
                storage,
                f"dataset {source.name} ({source.resolved_format})",
                config.paths.datasets[source.name],
                report,
            )
    steps = str(recipe.train.max_steps) if recipe.train.max_steps else f"{recipe.train.num_epochs} epoch(s)"
    report.rows += [
        ("algorithm", recipe.train.algo, f"{recipe.loss.n_heads} heads ({recipe.model.head_type})"),
        ("training", steps, f"batch {recipe.data.batch_size} × {recipe.data.max_length} tokens"),
        (
            "checkpoints",
            checkpoint_root(config, recipe),
            f"every {config.paths.checkpoints.save_interval} steps",
        ),
        ("mlflow", config.mlflow.tracking_uri or "sqlite in the run directory", config.mlflow.experiment),
        ("devices", config.devices.compute_backend, f"mixed precision {config.devices.mixed_precision}"),
    ]
    return report
