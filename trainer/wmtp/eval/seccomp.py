"""A seccomp filter a candidate's process installs on itself before exec (it holds for every descendant): no
socket of any family (so no UDP, no unix socket to a path, no netlink; TCP is Landlock's too), no io_uring (which
could open sockets beside the filter), and no change of a file's mode, owner, times or extended attributes
anywhere. Landlock has no right for those metadata changes, so they are refused inside the working directory as
well: candidates have no need of them.

A call from another architecture's ABI (i386 via int 0x80, x32) kills the process: its numbers mean other calls.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

# Syscall numbers from the kernel's syscall tables; *at2 and *xattrat are newer than most headers (6.6, 6.13).
_COMMON = {"io_uring_setup": 425, "fchmodat2": 452, "setxattrat": 463, "removexattrat": 466}
_X86_64 = {
    "socket": 41, "chmod": 90, "fchmod": 91, "chown": 92, "fchown": 93, "lchown": 94, "utime": 132,
    "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197, "lremovexattr": 198,
    "fremovexattr": 199, "utimes": 235, "fchownat": 260, "futimesat": 261, "fchmodat": 268, "utimensat": 280,
}  # fmt: skip
_GENERIC = {  # arm64 has only the *at forms
    "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "removexattr": 14, "lremovexattr": 15, "fremovexattr": 16,
    "fchmod": 52, "fchmodat": 53, "fchownat": 54, "fchown": 55, "utimensat": 88, "socket": 198,
}  # fmt: skip
# AUDIT_ARCH_* (<linux/audit.h>), the syscalls refused, and the lowest number of a foreign ABI sharing the arch.
_ARCHES = {
    "x86_64": (0xC000003E, {**_X86_64, **_COMMON}, 0x40000000),  # __X32_SYSCALL_BIT
    "aarch64": (0xC00000B7, {**_GENERIC, **_COMMON}, None),
}

_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_RET_ALLOW, _RET_ERRNO, _RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_LD_ABS, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, …JGE…, BPF_RET|BPF_K
_NR, _ARCH = 0, 4  # offsets in struct seccomp_data


class _Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Filter))]


def supported() -> bool:
    """Whether this machine's architecture has a filter here and the kernel has seccomp filters."""
    return platform.machine() in _ARCHES and os.path.exists("/proc/sys/kernel/seccomp/actions_avail")


def _program(arch: int, denied: list[int], foreign: int | None) -> list[tuple[int, int, int, int]]:
    """The BPF instructions: a foreign ABI is killed, a denied call fails with EPERM, everything else runs.
    Jumps are relative (target = next instruction + offset), so each is computed from its own position."""
    head = 3 + (foreign is not None)  # load arch, check it, load nr, [foreign ABI check]
    allow = head + len(denied)
    deny, kill = allow + 1, allow + 2
    code = [(_LD_ABS, 0, 0, _ARCH), (_JEQ, 0, kill - 2, arch), (_LD_ABS, 0, 0, _NR)]
    if foreign is not None:
        code.append((_JGE, kill - 4, 0, foreign))
    code += [(_JEQ, deny - (head + i) - 1, 0, nr) for i, nr in enumerate(denied)]
    return [*code, (_RET, 0, 0, _RET_ALLOW), (_RET, 0, 0, _RET_ERRNO | errno.EPERM), (_RET, 0, 0, _RET_KILL_PROCESS)]


def install() -> None:
    """Filter the calling thread and everything it execs or forks from now on; raises OSError if refused."""
    arch, calls, foreign = _ARCHES[platform.machine()]
    code = _program(arch, sorted(calls.values()), foreign)
    filters = (_Filter * len(code))(*(_Filter(*instruction) for instruction in code))
    program = _Program(len(code), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    # Without no_new_privs an unprivileged process may not install a filter (and a setuid exec could shed it).
    zero = ctypes.c_ulong(0)
    if (
        libc.prctl(_PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), zero, zero, zero) != 0
        or libc.prctl(_PR_SET_SECCOMP, ctypes.c_ulong(_SECCOMP_MODE_FILTER), ctypes.byref(program), zero, zero) != 0
    ):
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp: {os.strerror(err)}")
