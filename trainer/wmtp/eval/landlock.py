"""Landlock (Linux ≥ 5.13, unprivileged), applied by a candidate's process to itself before exec: changes to the
filesystem anywhere but the working directory fail, TCP bind and connect fail (ABI ≥ 4), abstract unix sockets
and signals outside the sandbox are out of reach (ABI ≥ 6). Every Landlock ABI also stops a sandboxed process
from ptracing, or reading `/proc/<pid>/environ` of, a process outside its domain, unless it has CAP_SYS_PTRACE.
"""

from __future__ import annotations

import ctypes
import os

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


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def abi() -> int:
    """The kernel's Landlock ABI version, 0 where there is none."""
    try:
        version = _libc().syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except (OSError, AttributeError):
        return 0
    return max(version, 0)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]  # fmt: skip


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _check(result: int, step: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock {step}: {os.strerror(err)}")
    return result


def restrict(workdir: str, version: int) -> None:
    """Confine the calling process (and what it execs) for good: filesystem changes beneath `workdir` alone, no
    TCP, no abstract unix sockets or signals outside. Raises OSError where the kernel refuses a step."""
    libc = _libc()
    writes = sum(bits for v, bits in _FS_WRITE_BY_ABI.items() if v <= version)
    attr = _RulesetAttr(writes, _NET_TCP if version >= 4 else 0, _SCOPES if version >= 6 else 0)
    # Older kernels reject a struct larger than they know: pass only the fields of this ABI.
    size = 24 if version >= 6 else 16 if version >= 4 else 8
    ruleset = _check(libc.syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)),
                     "create_ruleset")  # fmt: skip
    fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
    beneath = _PathBeneathAttr(writes, fd)
    _check(libc.syscall(_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(beneath), ctypes.c_uint32(0)), "add_rule")
    os.close(fd)
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(libc.syscall(_RESTRICT_SELF, ruleset, 0), "restrict_self")
    os.close(ruleset)
