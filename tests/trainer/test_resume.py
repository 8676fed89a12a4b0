"""Killing a run at any moment and resuming it ends with exactly the weights of a run that never stopped."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
import yaml
from typer.testing import CliRunner

from support.runs import checkpoint_tensors, kill_at_step_env, slow_commit_env, train_cli, wait_for_file
from wmtp.checkpoint import COMMITTED, STATE_FILE, CheckpointError, CheckpointStore, step_dir_name
from wmtp.cli import app
from wmtp.config import config_hash, load
from wmtp.contract import ENV_TERMINATION_LOG, STOP_PREEMPTED, ExitCode
from wmtp.storage import Storage
from wmtp.train import Trainer

pytestmark = pytest.mark.slow
STEPS, SAVE_INTERVAL = 30, 10


def assert_identical(a: Path, b: Path) -> None:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    assert any(k.startswith("/optimizer/state") for k in ta)
    differing = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def files_for(run_files, tmp_path: Path, algo: str, name: str, **overrides: Any) -> tuple[Path, Path, Path]:
    """A config/recipe pair whose checkpoints go to their own folder; returns them and that run's store root."""
    root = tmp_path / name
    settings = {
        "paths.checkpoints.base_path": str(root),
        "paths.checkpoints.save_interval": SAVE_INTERVAL,
        "paths.checkpoints.keep_last": 10,
        "paths.output_dir": str(tmp_path / f"{name}-runs"),
    }
    config, recipe = run_files(algo, steps=STEPS, **(settings | overrides))
    named_config, named_recipe = tmp_path / f"{name}-config.yaml", tmp_path / f"{name}-recipe.yaml"
    config.rename(named_config)
    recipe.rename(named_recipe)
    return named_config, named_recipe, root / f"test-{algo}"


# rho1-wmtp adds no state of its own either (its reference model is frozen and loaded again), so baseline-mtp
# stands for both; critic-wmtp adds the value head and its optimizer state.
@pytest.mark.parametrize("algo", ["baseline-mtp", "critic-wmtp"])
def test_resume_after_sigkill_matches_uninterrupted_run(algo: str, run_files, tmp_path: Path) -> None:
    config, recipe, straight_root = files_for(run_files, tmp_path, algo, "straight")
    Trainer(*load(config, recipe)).train()

    # A seeded kill point between two saves, after the first: replayable, unlike a sleep racing the trainer.
    kill_step = random.Random(algo).randrange(SAVE_INTERVAL + 1, STEPS)
    config, recipe, killed_root = files_for(run_files, tmp_path, algo, "killed")
    proc = train_cli(config, recipe, env=kill_at_step_env(kill_step))
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, output
    killed_at = CheckpointStore(str(killed_root), Storage()).latest().step
    assert killed_at == kill_step // SAVE_INTERVAL * SAVE_INTERVAL, f"killed at step {kill_step}"

    resumed = train_cli(config, recipe, "--resume", "latest")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert f"resumed step={killed_at}" in output

    last = step_dir_name(STEPS)
    assert_identical(straight_root / last, killed_root / last)


def test_crash_before_commit_resumes_from_the_previous_checkpoint(
    run_files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, recipe, straight_root = files_for(
        run_files, tmp_path, "baseline-mtp", "straight", **{"train.max_steps": 30}
    )
    Trainer(*load(config, recipe)).train()

    config, recipe, root = files_for(run_files, tmp_path, "baseline-mtp", "crashed", **{"train.max_steps": 30})
    original_commit = CheckpointStore.commit

    def crash_at_20(self: CheckpointStore, step: int, files: list[str]) -> Any:
        if step == 20:
            raise RuntimeError("killed between the shards and the marker")
        return original_commit(self, step, files)

    monkeypatch.setattr(CheckpointStore, "commit", crash_at_20)
    with pytest.raises(RuntimeError, match="between the shards"):
        Trainer(*load(config, recipe)).train()
    monkeypatch.undo()

    store = CheckpointStore(str(root), Storage())
    assert (root / step_dir_name(20) / "trainer_state.json").exists()  # written, never committed
    assert store.latest().step == 10
    Trainer(*load(config, recipe), resume="latest").train()
    assert_identical(straight_root / step_dir_name(30), root / step_dir_name(30))


def test_a_run_resumed_during_the_head_warmup_ends_as_one_that_never_stopped(run_files, tmp_path: Path) -> None:
    # Checkpoints during the warm-up (step 2), across its end (4: the trunk now has optimizer state) and after (6).
    warmup = {"train.max_steps": 6, "train.head_warmup_steps": 3, "paths.checkpoints.save_interval": 2}
    config, recipe, straight_root = files_for(run_files, tmp_path, "baseline-mtp", "straight", **warmup)
    Trainer(*load(config, recipe)).train()
    trunk_state = [
        any(key.startswith("/optimizer/state/model.base.") for key in checkpoint_tensors(straight_root / name))
        for name in map(step_dir_name, (2, 4, 6))
    ]
    assert trunk_state == [False, True, True]

    config, recipe, root = files_for(run_files, tmp_path, "baseline-mtp", "resumed", **warmup)
    shutil.copytree(straight_root / step_dir_name(2), root / step_dir_name(2))
    Trainer(*load(config, recipe), resume="latest").train()
    assert_identical(straight_root / step_dir_name(6), root / step_dir_name(6))


def test_resume_from_s3_store(run_files, tmp_path: Path, s3_endpoint: str, s3_storage: Storage, s3_bucket: str) -> None:
    base = f"s3://{s3_bucket}/checkpoints"
    config, recipe = run_files(
        "baseline-mtp",
        steps=20,
        **{
            "paths.checkpoints.base_path": base,
            "paths.checkpoints.save_interval": 10,
            "s3.endpoint_url": s3_endpoint,
        },
    )
    summary = Trainer(*load(config, recipe), storage=s3_storage).train()
    store = CheckpointStore(f"{base}/test-baseline-mtp", s3_storage)
    assert [info.step for info in store.list()] == [10, 20]
    assert summary["final_model"] == f"{base}/test-baseline-mtp/final"
    assert s3_storage.is_file(store.final_location / COMMITTED)
    assert s3_storage.is_file(store.final_location / "mtp_heads.safetensors")
    assert s3_storage.is_file(store.final_location / "tokenizer.json")
    run = mlflow.MlflowClient(summary["mlflow_tracking_uri"]).get_run(summary["mlflow_run_id"])
    assert run.data.params["final_checkpoint_uri"] == summary["final_model"]

    local = tmp_path / "from-s3"
    s3_storage.download(store.step_location(20), local / "straight")
    resumed = Trainer(*load(config, recipe), storage=s3_storage, resume="step_10")
    resumed.train()
    s3_storage.download(store.step_location(20), local / "resumed")
    assert_identical(local / "straight", local / "resumed")


def test_sigterm_saves_at_the_next_step_and_exits_with_the_documented_code(run_files, tmp_path: Path) -> None:
    config, recipe, root = files_for(run_files, tmp_path, "baseline-mtp", "evicted", **{"train.max_steps": 2000})
    proc = train_cli(config, recipe)
    wait_for_file(root / step_dir_name(SAVE_INTERVAL) / COMMITTED, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.PREEMPTED, output
    latest = CheckpointStore(str(root), Storage()).latest().step
    assert SAVE_INTERVAL < latest < 2000  # a step boundary after the signal, long before the end
    assert f"stopped at step {latest} on SIGTERM" in " ".join(output.split())
    # A preempted run is marked KILLED in MLflow (resumable), not FAILED.
    db = tmp_path / "evicted-runs" / "test-baseline-mtp" / "mlflow.db"
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("wmtp").experiment_id])
    assert [run.info.status for run in runs] == ["KILLED"]


def test_changed_config_is_refused_unless_allowed(run_files, tmp_path: Path) -> None:
    config, recipe, _ = files_for(run_files, tmp_path, "baseline-mtp", "changed", **{"train.max_steps": 10})
    Trainer(*load(config, recipe)).train()
    data = yaml.safe_load(recipe.read_text())
    data["optim"]["lr"] = 1e-4
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(CheckpointError, match=r"different config or recipe.*--allow-config-change"):
        Trainer(*load(config, recipe), resume="latest").train()
    Trainer(*load(config, recipe), resume="latest", allow_config_change=True).train()


def test_retention_and_mlflow_role_split(run_files, tmp_path: Path) -> None:
    config, recipe, root = files_for(
        run_files, tmp_path, "baseline-mtp", "kept", **{"train.max_steps": 30, "paths.checkpoints.keep_last": 2}
    )
    summary = Trainer(*load(config, recipe)).train()

    assert sorted(p.name for p in root.iterdir()) == [step_dir_name(20), step_dir_name(30), "final"]
    client = mlflow.MlflowClient(summary["mlflow_tracking_uri"])
    assert client.list_artifacts(summary["mlflow_run_id"]) == []
    assert len(client.search_model_versions("name='wmtp-baseline-mtp'")) == 1
    assert "final_checkpoint_uri" not in client.get_run(summary["mlflow_run_id"]).data.params


def test_resume_continues_the_mlflow_run_and_cli_reports_missing_step(run_files, tmp_path: Path) -> None:
    config, recipe, _ = files_for(run_files, tmp_path, "baseline-mtp", "cont", **{"train.max_steps": 20})
    first = Trainer(*load(config, recipe)).train()
    second = Trainer(*load(config, recipe), resume="step_10").train()
    assert second["mlflow_run_id"] == first["mlflow_run_id"]

    result = CliRunner().invoke(app, ["train", "-c", str(config), "-r", str(recipe), "--resume", "step_15"])
    assert result.exit_code == 2
    assert "committed steps: step_10, step_20" in " ".join(result.output.split())


def test_auto_resume_latest_from_the_recipe(run_files, tmp_path: Path) -> None:
    config, recipe, _ = files_for(
        run_files, tmp_path, "baseline-mtp", "auto", **{"train.max_steps": 10, "checkpointing.auto_resume_latest": True}
    )
    Trainer(*load(config, recipe)).train()
    again = Trainer(*load(config, recipe))
    again.train()
    assert again.state.step == 10 and again.state.history["loss"] == []  # nothing left to train
    with pytest.raises(CheckpointError, match="already holds committed checkpoints"):
        Trainer(*load(config, recipe), resume="never")  # a fresh start over them must be asked for
    loaded, settings = load(config, recipe)
    settings = settings.model_copy(
        update={"checkpointing": settings.checkpointing.model_copy(update={"overwrite": True})}
    )
    fresh = Trainer(loaded, settings, resume="never")
    fresh.train()
    assert len(fresh.state.history["loss"]) == 10


def test_checkpoints_cli_lists_and_prunes(run_files, tmp_path: Path) -> None:
    config, recipe, root = files_for(run_files, tmp_path, "baseline-mtp", "cli", **{"train.max_steps": 30})
    Trainer(*load(config, recipe)).train()
    (root / step_dir_name(35)).mkdir()
    runner = CliRunner(env={"COLUMNS": "200"})
    listed = runner.invoke(app, ["checkpoints", "list", str(root)])
    assert listed.exit_code == 0
    for step in ("10", "20", "30", "35"):
        assert f"│ {step} " in listed.output
    assert "NO (ignored)" in listed.output
    pruned = runner.invoke(app, ["checkpoints", "prune", str(root), "--keep", "1"])
    assert pruned.exit_code == 0
    assert sorted(p.name for p in root.iterdir()) == [step_dir_name(30), step_dir_name(35), "final"]
    assert os.path.exists(root / step_dir_name(30) / COMMITTED)


def test_an_operator_chosen_resume_falls_back_to_the_newest_intact_checkpoint(run_files, tmp_path: Path) -> None:
    config, recipe, root = files_for(
        run_files, tmp_path, "baseline-mtp", "fallback", **{"train.max_steps": 30, "paths.checkpoints.keep_last": 2}
    )
    Trainer(*load(config, recipe)).train()
    pruned = root / step_dir_name(10)  # reported once, pruned since: the operator still names it
    assert not pruned.exists()
    (root / step_dir_name(30) / "__0_0.distcp").write_bytes(b"")  # and the newest one is damaged
    args = ["train", "-c", str(config), "-r", str(recipe), "--resume", pruned.as_uri()]

    named = CliRunner().invoke(app, args)
    assert named.exit_code == 2
    assert named.output.count("error:") == 1 and named.output.strip().splitlines()[-1].startswith("error: --resume")
    assert "not a committed checkpoint" in named.output

    chosen = Trainer(*load(config, recipe), resume=pruned.as_uri(), resume_fallback=True)
    assert chosen.resume_plan.location.path == str(root / step_dir_name(20))
    assert len(chosen.warnings) == 1
    assert "not a committed checkpoint" in chosen.warnings[0]
    assert chosen.warnings[0].endswith(f"resuming from {(root / step_dir_name(20)).as_uri()} instead")
    assert chosen.train()["steps"] == 30


def test_an_async_save_killed_before_its_commit_is_never_resumed(run_files, tmp_path: Path) -> None:
    config, recipe, root = files_for(run_files, tmp_path, "baseline-mtp", "in-flight", **{"train.max_steps": 30})
    proc = train_cli(config, recipe, env=slow_commit_env(120, 20))  # the save of step 20 stays in flight
    wait_for_file(root / step_dir_name(20) / STATE_FILE, proc)  # every file written, COMMITTED not yet
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / step_dir_name(20) / COMMITTED).exists()

    resumed = train_cli(config, recipe, "--resume", "latest")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert "resumed step=10" in output
    assert (root / step_dir_name(20) / COMMITTED).exists()  # saved again, from a resumed run


def test_sigterm_during_an_in_flight_save_waits_for_it_then_saves_and_stops(run_files, tmp_path: Path) -> None:
    config, recipe, root = files_for(run_files, tmp_path, "baseline-mtp", "stopped", **{"train.max_steps": 2000})
    message = tmp_path / "termination-log"
    proc = train_cli(config, recipe, env=slow_commit_env(5, 10, **{ENV_TERMINATION_LOG: str(message)}))
    wait_for_file(root / step_dir_name(10) / STATE_FILE, proc)  # the save of step 10 is in flight
    assert not (root / step_dir_name(10) / COMMITTED).exists()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)

    assert proc.returncode == ExitCode.PREEMPTED, output
    store = CheckpointStore(str(root), Storage())
    steps = [info.step for info in store.list()]
    assert steps[0] == 10 and steps[-1] > 10  # the one in flight, then the one taken on the way out
    ended = json.loads(message.read_bytes())
    assert ended["reason"] == STOP_PREEMPTED and ended["checkpoint"] == store.step_location(steps[-1]).uri
    assert ended["step"] == steps[-1]


@pytest.mark.parametrize(
    ("field", "value", "blocks"),
    [
        # What changes the trajectory blocks a resume...
        ("paths.models.base", "/models/other", True),
        ("paths.datasets.humaneval", "/data/other.jsonl", True),
        ("seed", 8, True),
        ("train.algo", "rho1-wmtp", True),
        ("train.grad_accum", 2, True),
        ("data.batch_size", 16, True),
        ("data.max_length", 128, True),
        ("optim.lr", 1e-4, True),
        ("loss.n_heads", 2, True),
        ("model.head_type", "linear", True),
        ("critic.value_coef", 0.1, True),
        # ...what only runs it never does.
        ("paths.checkpoints.save_interval", 7, False),
        ("paths.checkpoints.keep_last", 9, False),
        ("paths.checkpoints.base_path", "s3://elsewhere/ck", False),
        ("paths.output_dir", "/elsewhere", False),
        ("log_interval", 1, False),
        ("train.eval_interval", 3, False),
        ("train.max_steps", 999, False),
        ("train.num_epochs", 4, False),
        ("devices.distributed", {"enabled": True, "timeout_s": 60}, False),
        ("devices.fsdp.enabled", True, False),
        ("devices.mixed_precision", "bf16", False),
        ("mlflow.experiment", "other", False),
        ("s3.endpoint_url", "http://127.0.0.1:9000", False),
        ("run.tags", {"team": "a"}, False),
        ("checkpointing.auto_resume_latest", True, False),
    ],
)
def test_the_resume_guard_compares_only_what_changes_the_trajectory(
    run_files, field: str, value: object, blocks: bool
) -> None:
    before = config_hash(*load(*run_files("baseline-mtp")))
    after = config_hash(*load(*run_files("baseline-mtp", **{field: value})))
    assert (after != before) == blocks
