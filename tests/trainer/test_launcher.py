"""`wmtp launch`: torchrun as PID 1 without its 30 s kill, and an exit code that says preempted."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from support.runs import slow_commit_env, train_cli, wait_for_file
from wmtp.checkpoint import COMMITTED, CheckpointStore, step_dir_name
from wmtp.contract import ENV_TERMINATION_LOG, STOP_FAILED, STOP_PREEMPTED, STOP_SUCCEEDED, ExitCode
from wmtp.launcher import decide
from wmtp.reporting import Termination
from wmtp.storage import Storage

SAVED = Termination(STOP_PREEMPTED, ExitCode.PREEMPTED, "stopped at step 12", 12, "file:///c/step_12", ["w"])
DONE = Termination(STOP_SUCCEEDED, ExitCode.OK, "finished at step 30", 30, "file:///c/step_30")
BAD = Termination(STOP_FAILED, ExitCode.BAD_INPUT, "--resume step_5: no committed checkpoint", 0)


@pytest.mark.parametrize(
    ("returncode", "worker", "stopped", "reason", "exit_code", "checkpoint"),
    [
        (0, DONE, False, STOP_SUCCEEDED, 0, DONE.checkpoint),  # trained to the end
        (0, None, False, STOP_SUCCEEDED, 0, None),  # something that is not `wmtp train`
        (1, SAVED, True, STOP_PREEMPTED, 75, SAVED.checkpoint),  # torchrun says 1 for the workers' 75
        (1, SAVED, False, STOP_PREEMPTED, 75, SAVED.checkpoint),  # SIGTERM sent to the workers by someone else
        (1, BAD, False, STOP_FAILED, 2, None),  # the worker's own exit code, not torchrun's 1
        (1, BAD, True, STOP_FAILED, 2, None),  # a failure stays one, stopped or not
        (1, None, False, STOP_FAILED, 1, None),  # a crash that left no word
        (-9, None, True, STOP_PREEMPTED, 75, None),  # stopped while loading, or killed after the grace period
        (0, DONE, True, STOP_SUCCEEDED, 0, DONE.checkpoint),  # it finished before the stop took effect
    ],
)
def test_decide(
    returncode: int, worker: Termination | None, stopped: bool, reason: str, exit_code: int, checkpoint: str | None
) -> None:
    ended = decide(returncode, worker, stopped)
    assert (ended.reason, ended.exit_code, ended.checkpoint) == (reason, exit_code, checkpoint)
    assert ended.message
    if worker is not None:
        assert ended.warnings == worker.warnings


@pytest.mark.slow
def test_a_sigterm_save_longer_than_30_s_under_torchrun_completes_and_is_a_preemption(
    run_files, tmp_path: Path
) -> None:
    config, recipe = run_files(
        "baseline-mtp",
        steps=2000,
        **{
            "paths.checkpoints.save_interval": 10,
            "devices.distributed": {"enabled": True, "timeout_s": 120},
            "devices.fsdp.enabled": True,
        },
    )
    root = tmp_path / "checkpoints" / "test-baseline-mtp"
    message = tmp_path / "termination-log"
    # Every commit after the first checkpoint takes 35 s: longer than torchrun waits after its own SIGTERM.
    env = slow_commit_env(35, 11, **{ENV_TERMINATION_LOG: str(message)})
    proc = train_cli(config, recipe, nproc=2, launch=["--grace-seconds", "150"], env=env)
    wait_for_file(root / step_dir_name(10) / COMMITTED, proc, timeout=180)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=200)

    assert proc.returncode == ExitCode.PREEMPTED, output
    ended = json.loads(message.read_bytes())
    store = CheckpointStore(str(root), Storage())
    latest = store.latest()
    assert latest.step > 10 and ended["checkpoint"] == latest.location.uri
    assert ended["reason"] == STOP_PREEMPTED and ended["exitCode"] == ExitCode.PREEMPTED
    assert f"stopped at step {latest.step} on SIGTERM" in ended["message"]
