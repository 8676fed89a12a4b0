"""MLflow: one run per training, params and metrics, and the final model registered once.

Periodic checkpoints never go here; they live in the checkpoint store. Only rank 0 tracks (`enabled`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wmtp.config import MLflowSettings

log = logging.getLogger(__name__)


def default_tracking_uri(run_dir: Path) -> str:
    """The embedded store: a sqlite file in the run directory gives tracking and the registry, no server."""
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


class Tracker:
    def __init__(self, settings: MLflowSettings, run_dir: Path, enabled: bool = True) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.enabled = enabled
        self.tracking_uri = settings.tracking_uri or default_tracking_uri(run_dir)
        self.run_id: str | None = None

    def start(self, run_name: str, params: dict[str, str], tags: dict[str, str], run_id: str | None = None) -> None:
        """Open a new run, or continue `run_id` so that a resumed training keeps one continuous curve."""
        if not self.enabled:
            return
        import mlflow

        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        # It warns that pickled models run code when loaded; ours load only with the wmtp package, by design.
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.settings.registry_uri or self.tracking_uri)
        if run_id is None:
            run = mlflow.start_run(
                experiment_id=self._experiment_id(), run_name=run_name, tags=tags, log_system_metrics=False
            )
            mlflow.log_params(params)
        else:
            run = mlflow.start_run(run_id=run_id, log_system_metrics=False)
        self.run_id = run.info.run_id
        log.info("mlflow run=%s tracking_uri=%s", self.run_id, self.tracking_uri)

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
        if self.enabled and self.run_id:
            import mlflow

            mlflow.log_metrics(metrics, step=step)

    def log_param(self, key: str, value: Any) -> None:
        if self.enabled and self.run_id:
            import mlflow

            mlflow.log_param(key, value)

    def register_model(self, model: Any, algorithm: str) -> str | None:
        """Log the final model and register it as `wmtp-<algorithm>`; returns the new version."""
        if not (self.enabled and self.run_id):
            return None
        import mlflow
        import torch

        info = mlflow.pytorch.log_model(
            model,
            name="model",
            # HF models fail the default pt2 export; requirements are given to skip slow inference of them.
            serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "transformers"],
            registered_model_name=f"wmtp-{algorithm}",
        )
        return str(info.registered_model_version)

    @contextlib.contextmanager
    def closing(self, stopped: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
        """Mark the run KILLED if training stops on one of `stopped` (on request, resumable), else FAILED."""
        try:
            yield
        except BaseException as err:
            self.end("KILLED" if isinstance(err, stopped) else "FAILED")
            raise

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            import mlflow

            mlflow.end_run(status=status)
