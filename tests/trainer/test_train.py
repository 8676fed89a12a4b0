from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from support.runs import checkpoint_tensors, train_cli
from support.waiting import free_port
from wmtp.checkpoint import FINAL_ALGORITHM
from wmtp.config import MLflowSettings, load
from wmtp.models import MTPModel
from wmtp.optim import build_scheduler
from wmtp.tracking import CONTINUES_TAG, Tracker, default_tracking_uri
from wmtp.train import Trainer

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
    final = {key: value for key, value in run.data.metrics.items() if key.startswith("final/")}
    assert final["final/step"] == 40 and final["final/tokens"] > 0 and final["final/wall_seconds"] > 0
    assert final["final/train_loss"] == summary["train_loss_last"]
    assert final["final/eval_loss"] == summary["eval_loss_last"]
    final_dir = Path(summary["final_model"].removeprefix("file://"))
    if algo == "critic-wmtp":  # the value head as trained, under its module key, beside the model
        saved = checkpoint_tensors(final_dir.parent / "checkpoint_step_00000040")
        trained = load_file(final_dir / FINAL_ALGORITHM)
        assert set(trained) == {"value_head.weight", "value_head.bias"}
        assert all(torch.equal(value, saved[f"/algorithm/{key}"]) for key, value in trained.items())
    else:
        assert not (final_dir / FINAL_ALGORITHM).exists()


def test_training_against_a_real_mlflow_server(run_files, mlflow_server: str, tmp_path: Path) -> None:
    name = "wmtp-team-a-baseline-mtp"  # as the operator names it for a run in namespace team-a
    settings = {"mlflow.tracking_uri": mlflow_server, "mlflow.registered_model": name}
    config, recipe = load(*run_files("baseline-mtp", steps=10, **settings))
    before = len(registered_versions(mlflow_server, name))
    summary = Trainer(config, recipe).train()

    assert summary["mlflow_tracking_uri"] == mlflow_server
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    assert len(client.get_metric_history(summary["mlflow_run_id"], "loss")) == 2
    versions = registered_versions(mlflow_server, name)
    assert len(versions) == before + 1 and summary["registered_model"] == f"{name} v{versions[0].version}"
    assert not list(Path(config.paths.output_dir).rglob("mlflow.db"))
    # The registered model is the final folder as the store holds it: safetensors and JSON, loaded without pickle.
    mlflow.set_registry_uri(mlflow_server)
    source = f"models:/{name}/{versions[0].version}"
    downloaded = Path(mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path / "registered")))
    final = Path(summary["final_model"].removeprefix("file://"))
    assert sorted(p.name for p in downloaded.iterdir()) == sorted(
        p.name for p in final.iterdir() if p.name != "COMMITTED"
    )
    assert {p.suffix for p in downloaded.iterdir()} <= {".safetensors", ".json", ".txt", ".jinja"}
    assert MTPModel.from_pretrained(downloaded).n_heads == MTPModel.from_pretrained(final).n_heads


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

    # Each checkpoint is reported once committed: saves are written in the background, so that may be a step
    # or two after it was taken, and at the latest when the next one is due or training ends.
    checkpoints = [(step, uri) for step, uri in calls if uri]
    assert [uri.rsplit("_", 1)[1] for _, uri in checkpoints] == ["00000005", "00000010"]
    assert all(step >= int(uri.rsplit("_", 1)[1]) for step, uri in checkpoints)
    assert [step for step, uri in calls if uri is None] == [5, 10]


def test_resume_with_the_mlflow_store_gone_continues_in_a_linked_run_with_the_same_steps(run_files) -> None:
    paths = run_files("baseline-mtp", steps=20, **{"paths.checkpoints.save_interval": 10})
    config, recipe = load(*paths)
    root = Path(config.paths.checkpoints.base_path) / recipe.run.name

    def mlflow_run_of(step: int) -> str:
        state = json.loads((root / f"checkpoint_step_{step:08d}" / "trainer_state.json").read_text())
        return state["train_state"]["mlflow_run_id"]

    # Each attempt is a process of its own, as on a cluster (MLflow keeps sqlite stores open per process).
    for resume in ("never", "step_10"):
        attempt = train_cli(*paths, "--resume", resume)
        output, _ = attempt.communicate(timeout=300)
        assert attempt.returncode == 0, output
        first = mlflow_run_of(10)
        if resume == "never":
            shutil.rmtree(Path(config.paths.output_dir) / recipe.run.name)  # the store lived in a pod that is gone

    second = mlflow_run_of(20)
    assert second != first
    tracking_uri = default_tracking_uri(Path(config.paths.output_dir) / recipe.run.name)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    assert client.get_run(second).data.tags[CONTINUES_TAG] == first
    assert [m.step for m in client.get_metric_history(second, "loss")] == [15, 20]
    assert len(registered_versions(tracking_uri, "wmtp-baseline-mtp")) == 1


def test_resuming_a_finished_run_registers_no_second_version(run_files) -> None:
    config, recipe = load(*run_files("baseline-mtp", steps=10))
    first = Trainer(config, recipe).train()
    again = Trainer(config, recipe, resume="latest").train()
    assert again["mlflow_run_id"] == first["mlflow_run_id"]
    assert again["registered_model"] == first["registered_model"] == "wmtp-baseline-mtp v1"
    assert len(registered_versions(first["mlflow_tracking_uri"], "wmtp-baseline-mtp")) == 1


def test_an_mlflow_server_that_is_down_costs_a_warning_not_the_run(run_files) -> None:
    port = free_port()  # nothing listens there
    # (Credentials never reach here: the config refuses a URI that holds any, tests/trainer/test_config.py.)
    config, recipe = load(*run_files("baseline-mtp", steps=10, **{"mlflow.tracking_uri": f"http://127.0.0.1:{port}"}))
    trainer = Trainer(config, recipe)
    summary = trainer.train()
    assert summary["steps"] == 10 and summary["mlflow_run_id"] is None
    assert len(trainer.warnings) == 1 and "starting the run failed" in trainer.warnings[0]
    assert f"127.0.0.1:{port}" in trainer.warnings[0]


def test_a_failed_registration_is_a_warning_and_the_model_is_kept(run_files, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise mlflow.exceptions.MlflowException("registry unavailable")

    monkeypatch.setattr(mlflow, "register_model", refuse)
    config, recipe = load(*run_files("baseline-mtp", steps=10))
    trainer = Trainer(config, recipe)
    summary = trainer.train()
    assert summary["registered_model"] is None
    assert Path(summary["final_model"].removeprefix("file://"), "COMMITTED").exists()
    assert len(trainer.warnings) == 1
    assert "registering the final model as wmtp-baseline-mtp" in trainer.warnings[0]
    assert "registry unavailable" in trainer.warnings[0] and summary["final_model"] in trainer.warnings[0]


def test_a_library_call_leaves_the_callers_signal_handlers_alone(run_files, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the `wmtp train` command takes SIGTERM: a Trainer inside another program (a test runner, a notebook)
    must not turn that program's SIGTERM into a request to checkpoint."""
    import signal

    installed: list[int] = []
    real = signal.signal
    monkeypatch.setattr(signal, "signal", lambda signum, handler: installed.append(signum) or real(signum, handler))
    Trainer(*load(*run_files("baseline-mtp", steps=2))).train()
    assert signal.SIGTERM not in installed


def test_credentials_in_an_mlflow_tracking_uri_reach_no_param_log_line_or_output(
    mlflow_server: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """Config refuses a URI with user:password@; should one reach the tracker anyway (the server here ignores the
    basic-auth header it makes), nothing it records or prints holds the password."""
    uri = mlflow_server.replace("http://", "http://alice:s3cr3t@")
    settings = MLflowSettings.model_construct(
        tracking_uri=uri, registry_uri=None, experiment="creds", registered_model=None
    )
    tracker = Tracker(settings, tmp_path)
    with caplog.at_level("DEBUG"):
        tracker.start("creds", {"mlflow.tracking_uri": uri, "seed": "7"}, {"source": uri})
        tracker.log_param("final_checkpoint_uri", uri)
        tracker.end()

    assert tracker.run_id is not None and tracker.shown_uri == mlflow_server.replace("http://", "http://***@")
    run = mlflow.MlflowClient(tracking_uri=mlflow_server).get_run(tracker.run_id)
    assert run.data.params["mlflow.tracking_uri"] == tracker.shown_uri
    assert "s3cr3t" not in repr(run.data.params) + repr(run.data.tags)
    out, err = capfd.readouterr()
    assert "s3cr3t" not in out + err + caplog.text
    assert "View run" not in out  # MLflow's own line, which would quote the URI
