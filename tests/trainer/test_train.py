from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import torch

from wmtp.config import load
from wmtp.train import Trainer, build_scheduler

pytestmark = pytest.mark.slow


def registered_versions(tracking_uri: str, name: str) -> list:
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).search_model_versions(
        f"name='{name}'"
    )


@pytest.mark.parametrize("algo", ["baseline-mtp", "rho1-wmtp", "critic-wmtp"])
def test_each_algorithm_trains_and_heldout_loss_falls(algo: str, run_files) -> None:
    config, recipe = load(*run_files(algo, steps=40))
    summary = Trainer(config, recipe).train()

    assert summary["steps"] == 40
    assert summary["eval_loss_last"] < summary["eval_loss_first"] - 0.5
    assert math.isfinite(summary["train_loss_last"])

    uri = summary["mlflow_tracking_uri"]
    assert uri.startswith("sqlite:///") and str(config.paths.output_dir) in uri
    client = mlflow.MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(summary["mlflow_run_id"], "loss")
    assert [m.step for m in history] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert len(client.get_metric_history(summary["mlflow_run_id"], "eval/loss")) == 5
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["train.algo"] == algo
    assert run.data.tags["algorithm"] == algo
    versions = registered_versions(uri, f"wmtp-{algo}")
    assert len(versions) == 1
    assert client.list_artifacts(summary["mlflow_run_id"]) == []


def test_training_against_a_real_mlflow_server(run_files, mlflow_server: str) -> None:
    config, recipe = load(*run_files("baseline-mtp", steps=10, **{"mlflow.tracking_uri": mlflow_server}))
    before = len(registered_versions(mlflow_server, "wmtp-baseline-mtp"))
    summary = Trainer(config, recipe).train()

    assert summary["mlflow_tracking_uri"] == mlflow_server
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    assert len(client.get_metric_history(summary["mlflow_run_id"], "loss")) == 2
    assert len(registered_versions(mlflow_server, "wmtp-baseline-mtp")) == before + 1
    assert not list(Path(config.paths.output_dir).rglob("mlflow.db"))


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
        ("cosine", [0.5, 1.0, 1.0, 0.75, 0.25]),
    ],
)
def test_warmup_then_schedule(scheduler: str, expected: list[float]) -> None:
    from wmtp.config import OptimSection

    optim = OptimSection(lr=1.0, scheduler=scheduler, warmup_ratio=0.4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, optim, total_steps=5)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected)


def test_progress_and_committed_checkpoints_are_reported(run_files, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, str | None]] = []

    class Recorder:
        def report(self, step: int, loss: float | None = None, latest_checkpoint: str | None = None) -> bool:
            assert loss is not None and math.isfinite(loss)
            calls.append((step, latest_checkpoint))
            return True

    monkeypatch.setattr("wmtp.train.Reporter.from_env", staticmethod(lambda: Recorder()))
    config, recipe = load(*run_files("baseline-mtp", steps=10, **{"paths.checkpoints.save_interval": 5}))
    Trainer(config, recipe).train()

    checkpoints = [(step, uri) for step, uri in calls if uri]
    assert [step for step, _ in checkpoints] == [5, 10]
    assert all(uri.endswith(f"checkpoint_step_{step:08d}") for step, uri in checkpoints)
    assert [step for step, uri in calls if uri is None] == [5, 10]
