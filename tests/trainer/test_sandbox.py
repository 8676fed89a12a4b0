"""Hostile candidates against `wmtp.eval.sandbox`: each row is a program that cheats the verdict or tries to get out
of its limits, with the verdict it must get. Every run is also held to what the evaluator may spend (wall time
within the timeout and a little, Python memory within what the output caps keep) and must leave no process of
its tree alive. Escapes run twice: with every mechanism this machine allows, and without the PID namespace and the
cgroup (the subreaper and the counted tree, as in a container that may not make either)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from string import Template

import pytest

from wmtp.eval.jail import SANDBOX_UID
from wmtp.eval.sandbox import GRACE_S, Limits, Outcome, run_program

# A sleep no other process on the machine sleeps: the processes a candidate leaves behind are found by it.
MARK = f"{900 + secrets.randbelow(90)}.{secrets.randbits(30)}"
SURVIVE = f'os.execv("/bin/sleep", ["sleep", "{MARK}"])'
ADD = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"
TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\n\ncheck(add)\n"
ALL, FALLBACKS = frozenset(), frozenset({"pidns", "cgroup"})
MEMORY_MB, PROCESSES = 256, 32


@dataclass(frozen=True)
class Row:
    code: str  # may name $udp_port, $unix_path and $files, the evaluator's targets
    reasons: tuple[str, ...]  # the Outcome.reason it must get; two where the mechanism in force decides which
    timeout_s: float = 5.0


PATCHED = """
import builtins, os
builtins.exec = builtins.compile = lambda *args, **kwargs: None  # the tests would not run
os.read = lambda fd, n: b"0" * 32  # and the token would be a forgery
"""
ATEXIT = "import atexit, os\natexit.register(os._exit, 0)\n"
GUESS = "import os, secrets\nprint(secrets.token_hex(16))\nos._exit(0)\n"
READ_TOKEN = "import os\nprint(os.read(3, 64).decode())\nos._exit(0)\n"
ALWAYS_EQUAL = """
class Anything:
    def __eq__(self, other):
        return True


def add(a, b):
    return Anything()
"""

CHEATS = {
    "honest: a correct solution passes": Row(ADD, ("passed",)),
    "honest: a wrong solution fails": Row(WRONG, ("failed",)),
    "exit()": Row(WRONG + "exit()\n", ("unfinished",)),
    "raise SystemExit": Row(WRONG + "raise SystemExit\n", ("unfinished",)),
    "os._exit(0)": Row(WRONG + "import os\nos._exit(0)\n", ("unfinished",)),
    "atexit turns the failed assert into exit 0": Row(WRONG + ATEXIT, ("unfinished",)),
    "excepthook turns it into exit 0": Row(
        WRONG + "import os, sys\nsys.excepthook = lambda *_: os._exit(0)\n", ("unfinished",)
    ),
    "patched builtins and os: no tests, a forged token": Row(WRONG + PATCHED, ("failed",)),
    "a printed guess of the token": Row(WRONG + GUESS, ("unfinished",)),
    # What the harness cannot stop, in the candidate's own process (docs/security.md): pinned so a change shows.
    "residual: reading the token's descriptor": Row(WRONG + READ_TOKEN, ("passed",)),
    "residual: a result equal to everything": Row(ALWAYS_EQUAL, ("passed",)),
}

BOMB = f"""
import os, time
forked = 0
for _ in range(200):
    try:
        if os.fork() == 0:
            {SURVIVE}
    except OSError:
        break
    forked += 1
time.sleep(1)  # the tree stays whole long enough for a counted limit to see it
assert forked == 200
"""
HOG = f"""
import os, sys, time
hog = "import time; x = b'1' * (100 << 20); time.sleep(3)"
children = []
for _ in range(4):  # 400 MiB together, each far below the per-process limit
    pid = os.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-c", hog, "{MARK}"])
    children.append(pid)
assert all(os.waitpid(pid, 0)[1] == 0 for pid in children)
"""
SETSID = f"import os\nif os.fork() == 0:\n    os.setsid()\n    {SURVIVE}\n"
SPAM = "import os\nfor _ in range(600):\n    os.write(2, b'x' * (1 << 20))\n"
GRANDCHILD = f"""
import os
if os.fork() == 0:
    if os.fork() == 0:
        {SURVIVE}
    os._exit(0)
"""
METADATA = """
import os
changed = []
for path in $files:
    for change in (lambda: os.chmod(path, 0o777), lambda: os.utime(path, (0, 0)),
                   lambda: os.chown(path, os.getuid(), os.getgid())):
        try:
            change()
            changed.append(path)
        except OSError:
            pass
assert changed
"""
ESCAPES = {
    "a setsid child keeps stderr open; main exits 0": Row(SETSID + "os._exit(0)\n", ("unfinished",)),
    "a setsid child keeps stderr open; main never exits": Row(SETSID + "while True:\n    pass\n", ("timeout",), 2.0),
    "a passing solution leaves a never-exiting grandchild": Row(ADD + GRANDCHILD, ("passed",)),
    "a fork bomb of 200": Row(BOMB, ("failed", "error")),  # forks refused (cgroup, nproc), or the tree killed
    "a tree of processes each allocating memory": Row(HOG, ("memory",), 10.0),
    "a correct solution writes 600 MiB of stderr": Row(ADD + SPAM, ("passed",), 20.0),
    "a UDP datagram to the evaluator": Row(
        "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', $udp_port))\n",
        ("error",),
    ),
    "a unix socket to a path": Row("import socket\nsocket.socket(socket.AF_UNIX).connect('$unix_path')\n", ("error",)),
    "chmod, utime and chown outside the working directory": Row(METADATA, ("failed",)),
}


@dataclass
class Targets:
    """What a candidate must not reach: a UDP port, a unix socket, files it would be allowed to change by their
    owner (one the evaluator's, one uid 65534's where the evaluator is root), all in a directory anyone may enter."""

    udp: socket.socket
    unix: socket.socket
    files: list[Path]

    def substitutions(self) -> dict[str, str]:
        return {"udp_port": str(self.udp.getsockname()[1]), "unix_path": self.unix.getsockname(),
                "files": repr([str(f) for f in self.files])}  # fmt: skip

    def metadata(self) -> list[tuple[int, int, int, int]]:
        return [(s.st_mode, s.st_uid, s.st_mtime_ns, s.st_ctime_ns) for s in (f.stat() for f in self.files)]

    def reached(self) -> list[str]:
        reached = []
        for name, receive in (("udp", lambda: self.udp.recv(64)), ("unix", self.unix.accept)):
            with contextlib.suppress(BlockingIOError):
                receive()
                reached.append(name)
        return reached


@pytest.fixture
def targets() -> Iterator[Targets]:
    with tempfile.TemporaryDirectory(prefix="wmtp-targets-") as directory:
        os.chmod(directory, 0o755)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        unix = socket.socket(socket.AF_UNIX)
        unix.bind(f"{directory}/socket")
        os.chmod(f"{directory}/socket", 0o777)
        unix.listen()
        files = [Path(directory, "evaluators"), Path(directory, "nobodys")]
        for file in files:
            file.write_text("x")
        if os.geteuid() == 0:
            os.chown(files[1], SANDBOX_UID, SANDBOX_UID)
        with udp, unix:
            udp.setblocking(False)
            unix.setblocking(False)
            yield Targets(udp, unix, files)


def survivors() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and MARK.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def run_bounded(code: str, limits: Limits) -> Outcome:
    """Run, and hold the evaluator to its bounds: wall time, memory, and no process left behind."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    started = time.monotonic()
    try:
        outcome = run_program(code, TESTS, limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    took = time.monotonic() - started
    assert took < limits.timeout_s + 3 < limits.timeout_s + GRACE_S, f"the evaluator waited {took:.1f} s"
    assert peak < 2 * (limits.output_kb << 10) + (4 << 20), f"the evaluator's Python memory peaked at {peak} bytes"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 64 << 10, "the evaluator's RSS grew"  # KiB
    left = survivors()
    for pid in left:  # so that a regression leaves nothing running on the machine, nor fails the next rows
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, "a process of the candidate's tree outlived the run"
    return outcome


@pytest.mark.parametrize("row", CHEATS.values(), ids=CHEATS)
def test_a_pass_means_the_tests_ran(row: Row) -> None:
    outcome = run_bounded(row.code, Limits(timeout_s=row.timeout_s))
    assert outcome.reason in row.reasons, outcome


@pytest.mark.parametrize("without", [ALL, FALLBACKS], ids=["every-mechanism", "fallbacks"])
@pytest.mark.parametrize("row", ESCAPES.values(), ids=ESCAPES)
def test_the_sandbox_holds_the_tree_and_its_limits(row: Row, without: frozenset[str], targets: Targets) -> None:
    before = targets.metadata()
    code = Template(row.code).substitute(targets.substitutions())
    limits = Limits(timeout_s=row.timeout_s, memory_mb=MEMORY_MB, processes=PROCESSES, without=without)
    outcome = run_bounded(code, limits)
    assert outcome.reason in row.reasons, outcome
    assert targets.reached() == [] and targets.metadata() == before
    if without:
        assert "subreaper" in outcome.sandbox and "cgroup" not in outcome.sandbox, outcome.sandbox


SCAN = """
import os
found = []
for pid in set(filter(str.isdigit, os.listdir("/proc"))) - {str(os.getpid())}:
    try:
        if b"WMTP_TEST_SECRET=" in open(f"/proc/{pid}/environ", "rb").read():
            found.append(pid)
    except OSError:
        pass
assert found, "no process's environment was readable"
"""
EVALUATOR = """
import json, subprocess, sys
from wmtp.eval.sandbox import Limits, run_program
unconfined = subprocess.run([sys.executable, "-c", sys.argv[1]]).returncode
outcome = run_program(sys.argv[1], limits=Limits(without=frozenset(json.loads(sys.argv[2]))))
print(json.dumps([unconfined, outcome.reason, outcome.sandbox]))
"""


@pytest.mark.parametrize("without", [ALL, FALLBACKS], ids=["every-mechanism", "fallbacks"])
def test_the_evaluators_environment_is_out_of_reach(without: frozenset[str]) -> None:
    # /proc/<pid>/environ shows a process's environment as it was exec'd: the evaluator gets the secret at start.
    env = {**os.environ, "WMTP_TEST_SECRET": secrets.token_hex(8)}
    done = subprocess.run([sys.executable, "-c", EVALUATOR, SCAN, json.dumps(sorted(without))], env=env,
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    unconfined, reason, sandbox = json.loads(done.stdout.splitlines()[-1])
    assert unconfined == 0, "the control could not find the secret: this test would prove nothing"
    assert reason == "failed", (reason, sandbox)


def test_limits_refuse_to_turn_off_a_mechanism_they_do_not_know() -> None:
    with pytest.raises(ValueError, match="unknown \\['seccomp'\\]"):
        Limits(without=frozenset({"seccomp"}))
