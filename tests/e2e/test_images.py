"""The images `make images` builds: who they run as, what they hold, and training inside them as a pod runs it.

Containers run as the Deployment and the trainer pods run them: non-root, read-only root filesystem, no
capabilities, writable paths only on volumes (/tmp, /workspace, /models), no network beyond loopback.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.runs import HUMANEVAL, write_run_files
from support.runtime import podman
from wmtp.checkpoint import CheckpointStore
from wmtp.contract import CONFIG_DIR, LAUNCH_COMMAND, MODEL_DIR, STOP_PREEMPTED, TERMINATION_LOG, WORK_DIR, ExitCode
from wmtp.storage import Storage

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
USER = "1000"
GRACE_S = 60  # the pod's terminationGracePeriodSeconds in this test
# How the trainer pods run: nothing writable but the volumes mounted below, nothing privileged.
RESTRICTED = ["--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp", "--cap-drop", "ALL",
              "--security-opt", "no-new-privileges", "--network", "none"]  # fmt: skip


def inspect(image: str) -> dict[str, Any]:
    return json.loads(podman("image", "inspect", image).stdout)[0]["Config"]


def run(image: str, *args: str, entrypoint: str | None = None) -> subprocess.CompletedProcess[str]:
    command = ["run", "--rm", "--pull=never", *RESTRICTED]
    return podman(*command, *(["--entrypoint", entrypoint] if entrypoint else []), image, *args, check=False)


def test_dockerfile_installs_the_torch_version_make_setup_installs() -> None:
    makefile = re.search(r"^TORCH_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    dockerfile = re.search(r"^ARG TORCH_VERSION=(\S+)$", (ROOT / "Dockerfile.trainer").read_text(), re.M)
    assert makefile and dockerfile and dockerfile.group(1) == makefile.group(1)


@pytest.mark.parametrize("which", ["operator", "trainer"])
def test_images_run_as_a_non_root_user(images: Any, which: str) -> None:
    image = getattr(images, which)
    assert inspect(image)["User"] == f"{USER}:{USER}"
    result = run(image, "-u", entrypoint="id")
    assert result.returncode == 0 and result.stdout.strip() == USER, result.stderr


def test_operator_image_holds_no_torch_and_no_test_code(images: Any) -> None:
    probe = (
        "import importlib.util as u, json, wmtp_operator.handlers, wmtp.contract; "
        "print(json.dumps({m: u.find_spec(m) is not None for m in "
        "('torch', 'transformers', 'mlflow', 'support', 'pytest', 'kmock', 'moto')}))"
    )
    result = run(images.operator, "-c", probe, entrypoint="python3")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == dict.fromkeys(
        ("torch", "transformers", "mlflow", "support", "pytest", "kmock", "moto"), False
    )
    assert inspect(images.operator)["Entrypoint"] == ["wmtp-operator"]


def test_trainer_image_starts_the_launcher_with_the_pinned_torch(images: Any) -> None:
    assert inspect(images.trainer)["Entrypoint"] == list(LAUNCH_COMMAND)
    result = run(images.trainer, "-c", "import torch; print(torch.__version__)", entrypoint="python3")
    makefile = re.search(r"^TORCH_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert result.returncode == 0 and makefile and result.stdout.startswith(makefile.group(1)), result.stderr


@pytest.fixture
def volumes(tmp_path: Path, tiny_models: dict[str, Path]) -> Iterator[dict[str, Path]]:
    """Host folders for the trainer's volumes: models and data (read-only), config, workspace (writable)."""
    models, config, workspace = tmp_path / "models", tmp_path / "config", tmp_path / "workspace"
    for role in ("base", "ref"):
        shutil.copytree(tiny_models[role], models / role)
    (models / "data").mkdir()
    shutil.copy(HUMANEVAL, models / "data" / HUMANEVAL.name)
    config.mkdir()
    workspace.mkdir(mode=0o777)
    workspace.chmod(0o777)  # an emptyDir: writable by whoever the container runs as
    for path in (tmp_path, models, config, *models.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield {"models": models, "config": config, "workspace": workspace}


def run_files(volumes: dict[str, Path], steps: int, save_interval: int) -> CheckpointStore:
    """A 2-process rho1-wmtp run whose paths are the container's, written into the config volume; returns the
    run's checkpoint store as the host sees it in the workspace volume."""
    container_models = {role: f"{MODEL_DIR}/{role}" for role in ("base", "ref")}
    config_file, recipe_file = write_run_files(
        volumes["config"],
        container_models,  # type: ignore[arg-type]
        "rho1-wmtp",
        steps=steps,
        **{
            "paths.datasets": {"humaneval": f"{MODEL_DIR}/data/{HUMANEVAL.name}"},
            "paths.checkpoints": {"base_path": f"{WORK_DIR}/checkpoints", "save_interval": save_interval},
            "paths.output_dir": f"{WORK_DIR}/runs",
            "devices.distributed": {"enabled": True},
            "devices.fsdp": {"enabled": True},
        },
    )
    for path, name in ((config_file, "config.yaml"), (recipe_file, "recipe.yaml")):
        path.rename(volumes["config"] / name)
        (volumes["config"] / name).chmod(0o644)
    run_name = yaml.safe_load((volumes["config"] / "recipe.yaml").read_text())["run"]["name"]
    return CheckpointStore(str(volumes["workspace"] / "checkpoints" / run_name), Storage())


def mounts(volumes: dict[str, Path]) -> list[str]:
    return [
        "--volume", f"{volumes['models']}:{MODEL_DIR}:ro",
        "--volume", f"{volumes['config']}:{CONFIG_DIR}:ro",
        "--volume", f"{volumes['workspace']}:{WORK_DIR}",
        "--workdir", WORK_DIR,
    ]  # fmt: skip


def train_args() -> list[str]:
    return ["--standalone", "--nproc-per-node=2", "-m", "wmtp", "train",
            "--config", f"{CONFIG_DIR}/config.yaml", "--recipe", f"{CONFIG_DIR}/recipe.yaml"]  # fmt: skip


def test_full_training_run_on_a_read_only_root_filesystem(images: Any, volumes: dict[str, Path]) -> None:
    store = run_files(volumes, steps=20, save_interval=10)
    command = ["run", "--rm", "--pull=never", *RESTRICTED, *mounts(volumes), "--entrypoint", "torchrun"]
    result = podman(*command, images.trainer, *train_args(), check=False, timeout=900)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert [info.step for info in store.list()] == [10, 20]
    assert store.is_committed(store.final_location)
    written = [p for p in volumes["workspace"].rglob("*")]
    assert written and {p.stat().st_uid for p in written} == {int(USER)}


def test_sigterm_commits_a_checkpoint_and_exits_preempted_within_the_grace_period(
    images: Any, volumes: dict[str, Path], tmp_path: Path
) -> None:
    store = run_files(volumes, steps=100_000, save_interval=100_000)
    termination_log = tmp_path / "termination-log"
    termination_log.touch(mode=0o666)
    termination_log.chmod(0o666)
    name = f"wmtp-e2e-sigterm-{uuid.uuid4().hex[:8]}"
    command = ["run", "--detach", "--pull=never", "--name", name, *RESTRICTED, *mounts(volumes),
               "--volume", f"{termination_log}:{TERMINATION_LOG}"]  # fmt: skip
    podman(*command, images.trainer, "--grace-seconds", str(GRACE_S), "--", *train_args())
    try:
        deadline = time.monotonic() + 300
        while "step=10/" not in (logs := podman("logs", name, check=False)).stderr + logs.stdout:
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            assert state == "running" and time.monotonic() < deadline, logs.stdout[-3000:] + logs.stderr[-3000:]
            time.sleep(0.5)
        started = time.monotonic()
        podman("stop", "--time", str(GRACE_S), name, timeout=GRACE_S + 60)
        elapsed = time.monotonic() - started
        exit_code = int(podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout)
        output = podman("logs", name, check=False)
    finally:
        podman("rm", "--force", name, check=False)

    assert exit_code == ExitCode.PREEMPTED, output.stdout[-3000:] + output.stderr[-3000:]
    assert elapsed < GRACE_S  # the workers saved and stopped: nobody had to SIGKILL them
    latest = store.latest()
    assert latest is not None and latest.step >= 10
    message = json.loads(termination_log.read_text())
    assert message["reason"] == STOP_PREEMPTED
    assert message["step"] == latest.step
