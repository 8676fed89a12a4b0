"""The dry run behind `wmtp validate`: everything a run would hit at its start, checked now and reported at once.

It loads both files, checks that every model exists, parses a sample of every dataset with the training parser,
writes and deletes a probe object in the checkpoint store, and reaches the MLflow tracking server. Each problem
carries the exit code (`wmtp.contract.ExitCode`) that classifies it.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from wmtp import contract
from wmtp.config import (
    Config,
    ConfigError,
    DataSource,
    Recipe,
    check_compatible,
    checkpoint_root,
    clip,
    load_config,
    load_recipe,
    redact_uri,
    resolve_checkpointing,
)
from wmtp.contract import ExitCode
from wmtp.storage import Storage, StorageError, parse_uri

SAMPLE_RECORDS = 200  # per dataset: enough to meet a schema problem, few enough to stay a dry run
MLFLOW_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Problem:
    text: str
    code: int = ExitCode.BAD_INPUT


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    config: Config | None = None
    recipe: Recipe | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        """0 when valid; 2 when any problem is in the input; else the first problem's (a service's) code."""
        if not self.problems:
            return ExitCode.OK
        codes = [problem.code for problem in self.problems]
        return ExitCode.BAD_INPUT if ExitCode.BAD_INPUT in codes else codes[0]

    def add(self, what: str, uri: str, status: str, problem: Problem | None = None) -> None:
        self.rows.append((what, uri, clip(status, 200)))
        if problem is not None:
            self.problems.append(Problem(clip(f"{what}: {problem.text}"), problem.code))


def _failure(err: Exception) -> Problem:
    if isinstance(err, StorageError):
        return Problem(str(err), err.code)
    if isinstance(err, PermissionError):
        return Problem(f"{err.filename}: permission denied", ExitCode.DENIED)
    code = ExitCode.BAD_INPUT if isinstance(err, ValueError | OSError) else ExitCode.ERROR
    return Problem(f"{type(err).__name__}: {err}", code)


def check_model(storage: Storage, what: str, uri: str, report: Report) -> None:
    try:
        loc = parse_uri(uri)
        found = storage.exists(loc)
    except Exception as err:  # unreachable, denied: a problem to report, not a crash
        failure = _failure(err)
        report.add(what, uri, f"ERROR: {failure.text}", failure)
        return
    missing = Problem(f"{uri}: no such file, folder or prefix", storage.missing(loc).code)
    report.add(what, uri, "found" if found else "MISSING", None if found else missing)


def check_dataset(storage: Storage, source: DataSource, uri: str, report: Report) -> None:
    """Parse the first records of the dataset with the training parser: a schema problem shows up now."""
    from wmtp.data import DataError, load_source

    what = f"dataset {source.name} ({source.resolved_format})"
    try:
        examples, stats = load_source(
            uri, source.resolved_format, storage, SAMPLE_RECORDS, source.languages, name=source.name
        )
    except DataError as err:
        report.add(what, uri, "UNREADABLE", Problem(str(err)))
        return
    except Exception as err:
        failure = _failure(err)
        report.add(what, uri, f"ERROR: {failure.text}", failure)
        return
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(stats.skipped.items()))
    status = f"{stats.shards}+ shard(s); first {stats.read} records: {stats.kept} kept" + (
        f", skipped {skipped}" if skipped else ""
    )
    empty = Problem(f"{uri}: none of the first {stats.read} records is usable ({skipped or 'no records'})")
    report.add(what, uri, status, None if examples else empty)


def check_checkpoint_store(storage: Storage, root: str, report: Report) -> None:
    """Write and delete a probe object where checkpoints go: a missing bucket or a read-only store shows now.
    A local folder that does not exist yet is not made: its nearest existing parent must be writable."""
    loc = parse_uri(root)
    path = storage.local_path(loc)
    if path is not None and not path.exists():
        parent = next(p for p in path.parents if p.exists())
        if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
            report.add("checkpoints", root, f"will be created in {parent}")
        else:
            problem = Problem(f"{root}: cannot be created: {parent} is not a writable folder", ExitCode.DENIED)
            report.add("checkpoints", root, "NOT WRITABLE", problem)
        return
    try:
        storage.probe(loc)
    except Exception as err:
        failure = _failure(err)
        report.add("checkpoints", root, f"NOT WRITABLE: {failure.text}", failure)
        return
    report.add("checkpoints", root, "writable (probe written and deleted)")


def check_mlflow(tracking_uri: str | None, experiment: str, report: Report) -> None:
    """Reach the tracking server over its REST API (a server, not a local store, is what a run can miss)."""
    if not tracking_uri or urllib.parse.urlparse(tracking_uri).scheme not in ("http", "https"):
        report.add("mlflow", tracking_uri or "sqlite in the run directory", "local store (nothing to reach)")
        return
    shown = redact_uri(tracking_uri)
    if shown != tracking_uri:  # the server is not asked: the URI itself is the problem
        problem = Problem(f"{shown}: credentials do not belong in the tracking URI (they would reach logs and "
                          "MLflow's records); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                          "MLFLOW_TRACKING_TOKEN) instead", ExitCode.BAD_INPUT)  # fmt: skip
        report.add("mlflow", shown, "CREDENTIALS IN URI", problem)
        return
    query = urllib.parse.urlencode({"experiment_name": experiment})
    request = urllib.request.Request(f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}")
    for header, value in _mlflow_auth().items():
        request.add_header(header, value)
    try:
        with urllib.request.urlopen(request, timeout=MLFLOW_TIMEOUT_S) as response:
            json.load(response)
        status = f"reachable; experiment {experiment} exists"
    except urllib.error.HTTPError as err:
        if err.code == 404:  # the experiment is created at the run's start
            status = f"reachable; experiment {experiment} will be created"
        elif err.code in (401, 403):
            problem = Problem(f"{shown}: access denied (HTTP {err.code}); set MLFLOW_TRACKING_TOKEN or "
                              "MLFLOW_TRACKING_USERNAME/PASSWORD", ExitCode.DENIED)  # fmt: skip
            report.add("mlflow", shown, f"DENIED (HTTP {err.code})", problem)
            return
        else:
            problem = Problem(f"{shown}: the MLflow server answered HTTP {err.code}", ExitCode.ERROR)
            report.add("mlflow", shown, f"ERROR (HTTP {err.code})", problem)
            return
    except (OSError, ValueError) as err:  # refused, timed out, DNS, or an answer that is not MLflow's JSON
        reason = getattr(err, "reason", err)
        problem = Problem(f"{shown}: cannot reach the MLflow server ({reason})", ExitCode.UNREACHABLE)
        report.add("mlflow", shown, "UNREACHABLE", problem)
        return
    report.add("mlflow", shown, status)


def _mlflow_auth() -> dict[str, str]:
    """The headers MLflow's client would send, from the same environment variables."""
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _check_vocabularies(storage: Storage, config: Config, recipe: Recipe, report: Report) -> None:
    """The models' vocabularies and tokenizers must match: read from config and tokenizer files, never weights."""
    from wmtp.models import vocabulary_problems

    try:
        problems = vocabulary_problems(config.paths.models, contract.algorithm(recipe.train.algo).frozen, storage)
    except ConfigError as err:
        problems = [str(err)]
    status = "MISMATCH" if problems else "match"
    report.add(
        "vocabularies", "base, reference and reward models", status, Problem("; ".join(problems)) if problems else None
    )


def validate_run(config_path: str, recipe_path: str, storage: Storage | None = None) -> Report:
    report = Report()
    for loader, path, attr in ((load_config, config_path, "config"), (load_recipe, recipe_path, "recipe")):
        try:
            setattr(report, attr, loader(path))
        except ConfigError as err:
            report.problems.append(Problem(str(err)))
    config, recipe = report.config, report.recipe
    if config is None or recipe is None:
        return report
    try:
        check_compatible(config, recipe, config_path)
    except ConfigError as err:
        report.problems.append(Problem(str(err)))
    storage = storage or Storage(s3=config.s3)
    models = config.paths.models
    check_model(storage, "base model", models.base, report)
    for role in contract.algorithm(recipe.train.algo).frozen:
        if getattr(models, role):
            check_model(storage, contract.MODEL_ROLES[role].name, getattr(models, role), report)
    if not report.problems:
        _check_vocabularies(storage, config, recipe, report)
    for source in recipe.data.sources:
        if source.name in config.paths.datasets:
            check_dataset(storage, source, config.paths.datasets[source.name], report)
    check_checkpoint_store(storage, checkpoint_root(config, recipe), report)
    cadence = resolve_checkpointing(config, recipe).paths.checkpoints
    final = "and the final model" if cadence.save_final else "no final model"
    report.rows.append(("checkpointing", f"every {cadence.save_interval} steps", f"keep {cadence.keep_last}, {final}"))
    check_mlflow(config.mlflow.tracking_uri, config.mlflow.experiment, report)
    steps = str(recipe.train.max_steps) if recipe.train.max_steps else f"{recipe.train.num_epochs} epoch(s)"
    report.rows += [
        ("algorithm", recipe.train.algo, f"{recipe.loss.n_heads} heads ({recipe.model.head_type})"),
        ("training", steps, f"batch {recipe.data.batch_size} × {recipe.data.max_length} tokens"),
        ("devices", config.devices.compute_backend, f"mixed precision {config.devices.mixed_precision}"),
    ]
    return report
