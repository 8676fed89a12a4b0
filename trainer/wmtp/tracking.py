"""MLflow: one run per training, params and metrics, and the final model registered once.

Periodic checkpoints never go here; they live in the checkpoint store. Only rank 0 tracks (`enabled`).

MLflow never stops training: a server that is down at the start, a failed metric upload or a failed registration
is a warning (logged, and kept in `warnings` for the termination message), and training goes on. A resumed
attempt continues the MLflow run its checkpoint names when the store still has it; when the store lost it (the
default sqlite store lived in a pod that is gone) a new run starts, tagged with the one it continues, and metrics
keep their step numbers. The final model is registered once per MLflow run, however many times it is resumed, as
`mlflow.registered_model` (the operator names it after the run's namespace) or `wmtp-<algorithm>`.

The model MLflow holds is the final model's folder as the store holds it (safetensors and JSON, logged as the
run's model artifacts and registered from there): nothing pickled, so loading it runs no code. Credentials come
from MLflow's own environment variables (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN) alone; a URI reaches params,
logs, warnings and the summary only through `redact_uri`, and MLflow's own "View run at" line is switched off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wmtp.config import MLflowSettings, clip, redact_uri

log = logging.getLogger(__name__)

CONTINUES_TAG = "wmtp.continues_run"  # on a run started because the store lost the one a checkpoint named
MODEL_TYPE = "wmtp-mtp"  # the logged model's type: an MTPModel folder (MTPModel.from_pretrained loads it)
_CLIENT_DEFAULTS = {
    # A server that is down must cost seconds, not MLflow's default of 7 retries with exponential backoff per call.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # MLflow prints "View run <name> at: <tracking URI>/..." on stdout, credentials and all when the URI has them.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def bounded_retries() -> None:
    """A server that is down costs seconds, not minutes, and MLflow prints no URI of its own (unless the
    environment says otherwise)."""
    for name, value in _CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def default_tracking_uri(run_dir: Path) -> str:
    """The embedded store: a sqlite file in the run directory gives tracking and the registry, no server."""
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def _missing(err: Exception) -> bool:
    return getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


class Tracker:
    def __init__(
        self,
        settings: MLflowSettings,
        run_dir: Path,
        enabled: bool = True,
        warnings: list[str] | None = None,
        backoff_s: float = 60.0,
    ) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.enabled = enabled
        self.tracking_uri = settings.tracking_uri or default_tracking_uri(run_dir)
        self.run_id: str | None = None
        self.warnings = warnings if warnings is not None else []
        self.backoff_s = backoff_s
        self._quiet_until = 0.0
        self._warned: set[str] = set()

    @property
    def active(self) -> bool:
        return self.enabled and self.run_id is not None

    @property
    def shown_uri(self) -> str:
        """The tracking URI as logs and summaries may show it."""
        return redact_uri(self.tracking_uri)

    def model_name(self, algorithm: str) -> str:
        return self.settings.registered_model or f"wmtp-{algorithm}"

    def _trouble(self, what: str, err: Exception) -> None:
        """One warning per kind of trouble; logging pauses for `backoff_s` so that a dead server costs little."""
        self._quiet_until = time.monotonic() + self.backoff_s
        # The error text may quote the URI, credentials and all.
        message = redact_uri(f"MLflow at {self.tracking_uri}: {what} failed ({type(err).__name__}: {err})")
        if what in self._warned:
            log.debug("%s", message)
            return
        self._warned.add(what)
        log.warning("%s; training goes on", message)
        self.warnings.append(clip(message))

    def start(self, run_name: str, params: dict[str, str], tags: dict[str, str], run_id: str | None = None) -> None:
        """Open a new run, or continue `run_id` so that a resumed training keeps one continuous curve."""
        if not self.enabled:
            return
        bounded_retries()
        try:
            self._start(run_name, params, tags, run_id)
        except Exception as err:  # no MLflow for this attempt, but the training goes on
            self._trouble("starting the run", err)
            self.run_id = None

    def _start(self, run_name: str, params: dict[str, str], tags: dict[str, str], run_id: str | None) -> None:
        import mlflow

        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.settings.registry_uri or self.tracking_uri)
        if run_id is not None:
            try:
                mlflow.MlflowClient().get_run(run_id)
            except mlflow.exceptions.MlflowException as err:
                if not _missing(err):
                    raise
                log.warning("mlflow run %s is not in the store any more: starting a new run that continues it", run_id)
                tags = {**tags, CONTINUES_TAG: run_id}
            else:
                self.run_id = mlflow.start_run(run_id=run_id, log_system_metrics=False).info.run_id
                log.info("mlflow run=%s continued tracking_uri=%s", self.run_id, self.shown_uri)
                return
        experiment = self._experiment_id()
        tags = {key: redact_uri(value) for key, value in tags.items()}
        run = mlflow.start_run(experiment_id=experiment, run_name=run_name, tags=tags, log_system_metrics=False)
        self.run_id = run.info.run_id
        mlflow.log_params({key: redact_uri(str(value)) for key, value in params.items()})  # mlflow.tracking_uri too
        log.info("mlflow run=%s tracking_uri=%s", self.run_id, self.shown_uri)

    def _experiment_id(self) -> str:
        import mlflow

        name = self.settings.experiment
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        # Without a server the artifact root defaults to ./mlruns in the working directory: keep it in the run.
        location = None if self.settings.tracking_uri else (self.run_dir / "mlartifacts").resolve().as_uri()
        return mlflow.create_experiment(name, artifact_location=location)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active or time.monotonic() < self._quiet_until:
            return
        import mlflow

        try:
            mlflow.log_metrics(metrics, step=step)
        except Exception as err:
            self._trouble("logging metrics", err)

    def log_param(self, key: str, value: Any) -> None:
        if not self.active:
            return
        import mlflow

        try:
            mlflow.log_param(key, redact_uri(str(value)))
        except Exception as err:
            self._trouble("logging a parameter", err)

    def register_model(self, folder: Path, algorithm: str, where: str | None = None) -> str | None:
        """Log the final model's folder as this run's model (its files as they are: safetensors and JSON, never a
        pickle) and register it as `model_name(algorithm)`, unless this run has registered it already (a finished
        run resumed again); returns the version. `where`: the final model in the store, for the warning when
        registration fails."""
        if not self.active:
            return None
        import mlflow

        name = self.model_name(algorithm)
        try:
            client = mlflow.MlflowClient(registry_uri=self.settings.registry_uri or self.tracking_uri)
            for version in client.search_model_versions(f"name='{name}' and run_id='{self.run_id}'"):
                log.info("the final model of mlflow run %s is registered already as %s v%s", self.run_id, name,
                         version.version)  # fmt: skip
                return str(version.version)
            experiment = client.get_run(self.run_id).info.experiment_id  # the run's, where its user may write
            model = mlflow.initialize_logged_model(
                name="model", source_run_id=self.run_id, model_type=MODEL_TYPE, experiment_id=experiment
            )
            client.log_model_artifacts(model.model_id, str(folder))
            client.finalize_logged_model(model.model_id, "READY")
            return str(mlflow.register_model(f"models:/{model.model_id}", name).version)
        except Exception as err:
            kept = f"; the model is kept at {where}" if where else ""
            self._trouble(f"registering the final model as {name}{kept}", err)
            return None

    @contextlib.contextmanager
    def closing(self, stopped: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
        """Mark the run KILLED if training stops on one of `stopped` (on request, resumable), else FAILED."""
        try:
            yield
        except BaseException as err:
            self.end("KILLED" if isinstance(err, stopped) else "FAILED")
            raise

    def end(self, status: str = "FINISHED") -> None:
        if not self.active:
            return
        import mlflow

        try:
            mlflow.end_run(status=status)
        except Exception as err:
            self._trouble("ending the run", err)
