"""Running a generated program against its tests, confined: its own process, time, memory and file-size limits,
a temporary working directory it alone may write to, no TCP, and an empty environment.

Filesystem and network confinement use Landlock (Linux ≥ 5.13, unprivileged): writes anywhere but the working
directory fail, TCP bind and connect fail (ABI ≥ 4), and signals to processes outside the sandbox fail (ABI ≥ 6).
Where the kernel has no Landlock the program still runs under the resource limits, and `confinement()` says so.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from wmtp.config import EvalSettings

# Landlock system calls (the same numbers on x86-64 and arm64) and their flags, from <linux/landlock.h>.
_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
# Every right that changes the filesystem, by the ABI version that introduced it.
_FS_WRITE_BY_ABI = {
    1: (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12),
    2: 1 << 13,  # REFER: linking or renaming across directories
    3: 1 << 14,  # TRUNCATE
    5: 1 << 15,  # IOCTL_DEV
}
_NET_TCP = (1 << 0) | (1 << 1)  # BIND_TCP, CONNECT_TCP (ABI 4)
_SCOPES = (1 << 0) | (1 << 1)  # abstract unix sockets and signals outside the sandbox (ABI 6)


@dataclass(frozen=True)
class Limits:
    timeout_s: float = EvalSettings.model_fields["program_timeout"].default  # wall clock
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file it may write


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str  # passed | failed | timeout | memory | error
    detail: str = ""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where there is none."""
    try:
        version = _libc().syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except (OSError, AttributeError):
        return 0
    return max(version, 0)


def confinement() -> str:
    """What the sandbox confines on this machine, in words."""
    abi = landlock_abi()
    if abi == 0:
        return "resource limits only (no Landlock in this kernel: files and network are not confined)"
    parts = ["resource limits", "writes outside the working directory"]
    parts += ["TCP"] if abi >= 4 else []
    parts += ["signals to other processes"] if abi >= 6 else []
    return f"Landlock ABI {abi}: " + ", ".join(parts)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]  # fmt: skip


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _restrict_to(workdir: str, abi: int) -> None:
    """In the child, before exec: allow filesystem changes beneath `workdir` alone, and no TCP."""
    libc = _libc()
    writes = sum(bits for version, bits in _FS_WRITE_BY_ABI.items() if version <= abi)
    attr = _RulesetAttr(writes, _NET_TCP if abi >= 4 else 0, _SCOPES if abi >= 6 else 0)
    # Older kernels reject a struct larger than they know: pass only the fields of this ABI.
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        os._exit(120)
    fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
    beneath = _PathBeneathAttr(writes, fd)
    if libc.syscall(_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(beneath), ctypes.c_uint32(0)) < 0:
        os._exit(121)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 or libc.syscall(_RESTRICT_SELF, ruleset, 0) < 0:
        os._exit(122)


def _confine(workdir: str, limits: Limits, abi: int) -> None:
    os.setsid()
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb << 20,) * 2)
    cpu = int(limits.timeout_s) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb << 20,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if abi:
        _restrict_to(workdir, abi)


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Run `source` as a Python program in a fresh confined process; it passes when it exits 0 in time."""
    abi = landlock_abi()
    with tempfile.TemporaryDirectory(prefix="wmtp-sandbox-") as workdir:
        (Path(workdir) / "main.py").write_text(source)
        # An empty environment: nothing of the trainer's (credentials above all) reaches the program.
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "main.py"],
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: _confine(workdir, limits, abi),
        )
        try:
            _, stderr = proc.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Outcome(False, "timeout", f"still running after {limits.timeout_s:g} s")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    last = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
    if proc.returncode == 0:
        return Outcome(True, "passed")
    if proc.returncode == -signal.SIGXCPU:
        return Outcome(False, "timeout", "CPU time limit")
    if "MemoryError" in last[0]:
        return Outcome(False, "memory", last[0][:200])
    if "AssertionError" in last[0]:
        return Outcome(False, "failed", last[0][:200])
    return Outcome(False, "error", last[0][:200] or f"exit code {proc.returncode}")
