"""Running a generated program against its tests, confined, and telling a pass from a program that only exited 0.

What is stopped and what is not, mechanism by mechanism: docs/security.md. In short, each run gets

- a proof token: `HARNESS` runs the candidate's code, then its tests, each compiled on its own (so the code can
  neither swallow the tests in a string nor disable their asserts), and only then reads a per-run random token
  from descriptor 3 and prints it. A pass is exit status 0 *and* that token as the last line of stdout: exit(),
  SystemExit, os._exit(0), atexit or excepthook tricks, patched builtins and guessed tokens all fail. The code
  shares the harness's process, so code aimed at the harness itself (reading descriptor 3, a result equal to
  everything) is not stopped;
- a supervisor (`jail`) that holds the whole process tree and kills all of it at the timeout or the end, and the
  mechanisms this machine allows (Landlock, seccomp, a PID namespace, another uid, a cgroup), named in
  `Outcome.sandbox`;
- bounded reading: at most `Limits.output_kb` of each stream is kept (the rest is read and dropped) and the
  evaluator waits at most the timeout plus `GRACE_S`, whatever the candidate does with its descriptors.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from wmtp.config import EvalSettings
from wmtp.eval import jail

GRACE_S = 10.0  # beyond the timeout: interpreter start-up, killing and reaping the tree, removing the cgroup
_TOKEN_BYTES = 16

# The program that runs: it binds what it needs before the candidate's code can patch builtins or modules, reads
# and compiles both parts before either runs (the code may rewrite its files), clears any trace or profile
# function the code left before the tests, and asks for the token only when the tests have returned.
HARNESS = """\
import os, sys


def _run(read=os.read, write=os.write, exec=exec, compile=compile, settrace=sys.settrace,
         setprofile=sys.setprofile):
    units = []
    for name in ("solution.py", "tests.py"):
        with open(name, encoding="utf-8") as file:
            units.append(compile(file.read(), name, "exec", dont_inherit=True, optimize=0))
    namespace = {"__name__": "__main__"}
    exec(units[0], namespace)
    settrace(None)
    setprofile(None)
    exec(units[1], namespace)
    write(1, b"\\n" + read(3, 64) + b"\\n")


_run()
"""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = EvalSettings.model_fields["program_timeout"].default  # wall clock, the whole tree
    memory_mb: int = 1024  # the whole tree where a cgroup bounds it (else counted); address space per process
    file_mb: int = 16  # largest file it may write
    processes: int = 32  # processes and threads of the tree at once
    output_kb: int = 1024  # of each of stdout and stderr, kept; the rest is read and dropped
    # Mechanisms not to use ("pidns", "cgroup"), to exercise the fallbacks or to avoid one that misbehaves.
    without: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if unknown := self.without - set(jail.OPTIONAL):
            raise ValueError(f"Limits.without: unknown {sorted(unknown)}; known: {', '.join(jail.OPTIONAL)}")


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str  # passed | failed | unfinished (exit 0 without the token) | timeout | memory | error
    detail: str = ""
    sandbox: str = ""  # the mechanisms in force, e.g. "landlock-abi7+seccomp+pidns+uid65534+…"


class _Tail:
    """The last `cap` bytes of a stream, however much of it there was."""

    def __init__(self, cap: int) -> None:
        self.cap, self.data, self.total = cap, bytearray(), 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk
        del self.data[: max(0, len(self.data) - self.cap)]

    def last_line(self) -> str:
        lines = self.data.decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""


def _drain(streams: dict[int, _Tail], deadline: float) -> bool:
    """Read every descriptor to its end or until the deadline; True when all ended."""
    with selectors.DefaultSelector() as selector:
        for fd in streams:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                chunk = os.read(key.fd, 1 << 16)
                if chunk:
                    streams[key.fd].add(chunk)
                else:
                    selector.unregister(key.fd)
        return not selector.get_map()


def _start(workdir: str, limits: Limits, token: str) -> tuple[subprocess.Popen[bytes], int]:
    """The supervisor, started on `workdir` with the token in a pipe: its process and its status pipe's read end."""
    token_r, token_w = os.pipe()
    with open(token_w, "wb") as pipe:  # 32 bytes: the pipe holds them until the harness reads
        pipe.write(token.encode())
    status_r, status_w = os.pipe()
    config = {"workdir": workdir, "token_fd": token_r, "status_fd": status_w, "timeout_s": limits.timeout_s,
              "memory_mb": limits.memory_mb, "file_mb": limits.file_mb, "processes": limits.processes,
              "without": sorted(limits.without)}  # fmt: skip
    try:
        # An empty environment: nothing of the evaluator's (credentials above all) reaches supervisor or program.
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-m", jail.__name__, json.dumps(config)],
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(token_r, status_w),
        )
    except BaseException:
        os.close(status_r)
        raise
    finally:
        os.close(token_r)
        os.close(status_w)
    return proc, status_r


def _supervise(workdir: str, limits: Limits, token: str) -> tuple[dict, _Tail, _Tail]:
    """Run the supervisor and read its report and the candidate's output, all bounded."""
    proc, status_r = _start(workdir, limits, token)
    out, err, status = _Tail(limits.output_kb << 10), _Tail(limits.output_kb << 10), _Tail(1 << 16)
    assert proc.stdout is not None and proc.stderr is not None
    streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err, status_r: status}
    try:
        if not _drain(streams, time.monotonic() + limits.timeout_s + GRACE_S):
            proc.send_signal(signal.SIGKILL)  # a wedged supervisor; its child dies with it (parent-death signal)
    finally:
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        os.close(status_r)
    try:
        return json.loads(status.data), out, err
    except ValueError:  # nothing, or cut short: the supervisor died before it answered
        return {}, out, err


def _verdict(report: dict, out: _Tail, err: _Tail, token: str, limits: Limits) -> Outcome:
    sandbox = report.get("sandbox", "")
    last = err.last_line()[:200]
    code = report.get("returncode")
    if not report:
        return Outcome(False, "error", f"the sandbox did not report: {last}", sandbox)
    if report["killed"] == "timeout":
        return Outcome(False, "timeout", f"still running after {limits.timeout_s:g} s", sandbox)
    if code == 0 and out.last_line() == token:
        return Outcome(True, "passed", "", sandbox)
    if report["killed"] == "memory" or report["oom_kills"] or "MemoryError" in last:
        return Outcome(False, "memory", last or f"over {limits.memory_mb} MiB", sandbox)
    if report["killed"] == "processes":
        return Outcome(False, "error", f"more than {limits.processes} processes", sandbox)
    if code == 0:
        return Outcome(False, "unfinished", "exit status 0 without the harness's token: its tests did not finish",
                       sandbox)  # fmt: skip
    if code == -signal.SIGXCPU:
        return Outcome(False, "timeout", "CPU time limit", sandbox)
    if "AssertionError" in last:
        return Outcome(False, "failed", last, sandbox)
    return Outcome(False, "error", last or f"exit code {code}", sandbox)


def run_program(code: str, tests: str = "", limits: Limits = Limits()) -> Outcome:
    """Run `code` then `tests` as one Python program in a fresh confined process tree; it passes when the tests
    return, the harness prints this run's token, and the program exits 0, all within the limits."""
    token = secrets.token_hex(_TOKEN_BYTES)
    with tempfile.TemporaryDirectory(prefix="wmtp-sandbox-") as workdir:
        for name, text in (("main.py", HARNESS), ("solution.py", code), ("tests.py", tests)):
            (Path(workdir) / name).write_text(text, encoding="utf-8")
        report, out, err = _supervise(workdir, limits, token)
    return _verdict(report, out, err, token, limits)
