"""`wmtp launch`: the trainer container's PID 1, around torchrun, so that a preemption is saved and said so.

On SIGTERM, Kubernetes signals PID 1 alone and kills the container after terminationGracePeriodSeconds. Had
torchrun been PID 1, its agent would pass SIGTERM on to the workers and kill them 30 s later, whatever they were
doing, and then exit 1, so a clean stop-and-save would read as a failure. The launcher instead passes SIGTERM (or
SIGINT, from a terminal) to the training workers themselves, never to the agent; they save a checkpoint at the
next step boundary and exit; it waits up to `--grace-seconds` for that before it kills them. It then leaves the
termination message (the one the workers wrote, corrected when their exit says otherwise) and exits with what
happened: 0, ExitCode.PREEMPTED (75) or the workers' own exit code. It imports no torch, so it starts at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from wmtp.contract import ENV_TERMINATION_LOG, STOP_FAILED, STOP_PREEMPTED, STOP_SUCCEEDED, ExitCode
from wmtp.reporting import Termination, read_termination, termination_log, write_termination

log = logging.getLogger(__name__)

DEFAULT_GRACE_SECONDS = 300.0  # `wmtp launch`'s default for contract.LAUNCH_GRACE_FLAG


def decide(returncode: int, worker: Termination | None, stopped: bool) -> Termination:
    """What a torchrun run meant, from its exit status, the workers' own termination message (if any) and
    whether the launcher passed a stop signal on. Pure: the launcher's whole policy, table-tested."""
    if worker is not None and worker.reason == STOP_PREEMPTED:
        return Termination(STOP_PREEMPTED, ExitCode.PREEMPTED, worker.message, worker.step, worker.checkpoint,
                           worker.warnings)  # fmt: skip
    if returncode == 0:
        if worker is not None:
            return Termination(STOP_SUCCEEDED, ExitCode.OK, worker.message, worker.step, worker.checkpoint,
                               worker.warnings)  # fmt: skip
        return Termination(STOP_SUCCEEDED, ExitCode.OK, "torchrun finished")
    if worker is not None and worker.reason == STOP_FAILED:
        return worker
    step, checkpoint, warnings = (worker.step, worker.checkpoint, worker.warnings) if worker else (None, None, [])
    if stopped:
        # Stopped from outside before the workers could save (still loading, or a save longer than the grace
        # period): nothing failed, and the run resumes from the newest checkpoint it has.
        message = f"stopped on SIGTERM before the workers saved a checkpoint (torchrun exited {returncode})"
        return Termination(STOP_PREEMPTED, ExitCode.PREEMPTED, message, step, checkpoint, warnings)
    message = f"torchrun exited {returncode} and no worker said why; see the container log"
    return Termination(STOP_FAILED, returncode if 0 < returncode < 256 else ExitCode.ERROR, message, step, checkpoint,
                       warnings)  # fmt: skip


def worker_pids(agent: int) -> list[int]:
    """The training workers: torchrun's agent starts them as its direct children (each in its own session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == agent:
                pids.append(int(entry.name))
    return pids


class _Stop:
    """The first SIGTERM/SIGINT goes to the workers (or, before there are any, to the agent); the deadline
    for their save starts then. Later signals change nothing."""

    def __init__(self, agent: subprocess.Popen, grace_seconds: float) -> None:
        self.agent, self.grace_seconds = agent, grace_seconds
        self.deadline: float | None = None
        self.signalled: list[int] = []

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        if self.deadline is not None:
            log.warning("signal %d: already stopping; waiting for the workers' checkpoint", signum)
            return
        self.deadline = time.monotonic() + self.grace_seconds
        self.signalled = worker_pids(self.agent.pid)
        log.warning(
            "signal %d: asking %d worker(s) to save a checkpoint and stop (waiting up to %.0f s)",
            signum, len(self.signalled), self.grace_seconds,
        )  # fmt: skip
        for pid in self.signalled or [self.agent.pid]:
            _kill(pid, signal.SIGTERM)

    def overdue(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def kill(self) -> None:
        log.error("the workers did not stop within %.0f s: killing them", self.grace_seconds)
        for pid in [*worker_pids(self.agent.pid), *self.signalled, self.agent.pid]:
            _kill(pid, signal.SIGKILL)


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _writable(path: Path | None) -> Path | None:
    """`path`, emptied of anything an earlier run left, or None if it cannot be written."""
    if path is None:
        return None
    try:
        path.write_bytes(b"")
    except OSError as err:
        log.warning("cannot write the termination message to %s: %s", path, err)
        return None
    return path


def launch(torchrun_args: list[str], grace_seconds: float = DEFAULT_GRACE_SECONDS) -> int:
    """Run `torchrun <torchrun_args>` to the end; returns the exit code the container should have."""
    with tempfile.TemporaryDirectory(prefix="wmtp-launch-") as tmp:
        # The workers write their message where the kubelet reads it (a kill after the grace period then still
        # leaves their word), or, where there is no such file, somewhere the launcher can read it.
        message_file = _writable(termination_log()) or Path(tmp) / "termination-log"
        env = {**os.environ, ENV_TERMINATION_LOG: str(message_file)}
        command = [sys.executable, "-m", "torch.distributed.run", *torchrun_args]
        # A session of its own: a terminal's Ctrl-C reaches the launcher alone, which passes it on as SIGTERM.
        agent = subprocess.Popen(command, env=env, start_new_session=True)
        stop = _Stop(agent, grace_seconds)
        previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            while True:
                try:
                    returncode = agent.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if stop.overdue():
                        stop.kill()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        outcome = decide(returncode, read_termination(message_file), stopped=stop.deadline is not None)
        write_termination(outcome, message_file)
    log.info("torchrun exited %d: %s (exit %d) %s", returncode, outcome.reason, outcome.exit_code, outcome.message)
    return int(outcome.exit_code)
