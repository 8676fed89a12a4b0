"""The supervisor of one sandboxed run: `sandbox.run_program` starts it as `python -I -m wmtp.eval.jail CONFIG`, a
fresh interpreter with no threads and nothing of the evaluator's memory, so that forking and confining are safe.

It plans what this machine allows (`Plan`), forks the candidate, confines the child and execs the harness, waits
at most the timeout, and answers with one JSON object on its status descriptor: the exit status, why it killed
the tree (timeout, memory, processes) and which mechanisms were in force (`Plan.name`, the Outcome's `sandbox`).

Invariants:
- When it answers, no process of the candidate's tree is left. In a PID namespace the candidate is its init, and
  the kernel kills the whole namespace when the init dies; elsewhere this process is a child subreaper, so every
  orphan (setsid or not) becomes its child, and it kills and reaps descendants until none remains.
- The candidate never runs with a planned mechanism half-applied: a step that fails ends the child before exec,
  exit status 125 with "sandbox: ..." on stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import select
import signal
import stat
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from wmtp.eval import cgroup, landlock, seccomp

OPTIONAL = ("pidns", "cgroup")  # the mechanisms `Limits.without` may turn off
SANDBOX_UID = 65534  # nobody: owns no file of the evaluator's and can read none of its processes
# The identities a candidate may run as (Plan.identity): root drops to SANDBOX_UID, or keeps uid 0 without any
# capability where that uid cannot reach the interpreter; a non-root evaluator's candidates keep its uid.
AS_SANDBOX_UID, AS_ROOT_WITHOUT_CAPS, OWN_UID = f"uid{SANDBOX_UID}", "uid0-nocaps", "own-uid{}"
CONFINE_FAILED = 125
POLL_S = 0.05  # how often the tree is counted where no cgroup or dedicated uid bounds it
_CLONE_NEWPID = 0x20000000
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER, _PR_CAPBSET_DROP = 1, 36, 24
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Plan:
    landlock: int  # ABI version, 0 for none
    seccomp: bool
    pidns: bool  # else a child subreaper
    identity: str  # AS_SANDBOX_UID | AS_ROOT_WITHOUT_CAPS | OWN_UID with the evaluator's uid
    group: cgroup.Cgroup | None
    polled: tuple[str, ...]  # limits this process enforces by counting the tree: "pids", "memory"

    @property
    def name(self) -> str:
        parts = [f"landlock-abi{self.landlock}"] if self.landlock else []
        parts += ["seccomp"] if self.seccomp else []
        parts += ["pidns" if self.pidns else "subreaper", self.identity]
        parts += [self.group.name] if self.group else []
        parts += ["rlimit-nproc"] if self.identity == AS_SANDBOX_UID and "pids" not in self.controllers else []
        return "+".join([*parts, *(f"polled-{p}" for p in self.polled), "rlimit-as"])

    @property
    def controllers(self) -> tuple[str, ...]:
        return self.group.controllers if self.group else ()


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _call(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option: int, arg: int, what: str) -> None:
    zero = ctypes.c_ulong(0)  # prctl reads unsigned longs: no stray high bits from a C int
    _call(_libc().prctl(option, ctypes.c_ulong(arg), zero, zero, zero), what)


def _others_can_run_python() -> bool:
    """Whether uid 65534 can reach this interpreter and its standard library (a pyenv under a 0700 /root: no)."""
    paths = [Path(sys.executable).resolve(), Path(os.__file__).resolve().parent]
    paths += [Path(sys.prefix, "pyvenv.cfg")] if sys.prefix != sys.base_prefix else []
    for path in paths:
        if not path.exists() or not path.stat().st_mode & stat.S_IROTH:
            return False
        if any(not d.stat().st_mode & stat.S_IXOTH for d in path.parents):
            return False
    return True


def plan(config: dict[str, Any]) -> Plan:
    """What this machine allows, minus what `without` names. A PID namespace needs root (CAP_SYS_ADMIN)."""
    without = set(config["without"])
    root = os.geteuid() == 0
    identity = OWN_UID.format(os.geteuid())
    if root:
        identity = AS_SANDBOX_UID if _others_can_run_python() else AS_ROOT_WITHOUT_CAPS
    group = None if "cgroup" in without else cgroup.create(config["memory_mb"] << 20, config["processes"])
    pidns = root and "pidns" not in without and _libc().unshare(_CLONE_NEWPID) == 0
    controllers = group.controllers if group else ()
    bounded_pids = "pids" in controllers or identity == AS_SANDBOX_UID
    polled = (() if bounded_pids else ("pids",)) + (() if "memory" in controllers else ("memory",))
    return Plan(landlock.abi(), seccomp.supported(), pidns, identity, group, polled)


def _set_limits(config: dict[str, Any], plan: Plan) -> None:
    cpu = int(config["timeout_s"]) + 1
    limits = {
        resource.RLIMIT_AS: config["memory_mb"] << 20,  # per process; the tree's bound is the cgroup's or polled
        resource.RLIMIT_CPU: cpu,
        resource.RLIMIT_FSIZE: config["file_mb"] << 20,
        resource.RLIMIT_CORE: 0,
    }
    if plan.identity == AS_SANDBOX_UID:  # counted per uid: meaningful only for a uid the evaluator does not share
        limits[resource.RLIMIT_NPROC] = config["processes"]
    for which, value in limits.items():
        resource.setrlimit(which, (value, value))


def _drop_identity(plan: Plan) -> None:
    if plan.identity == AS_SANDBOX_UID:
        os.setgroups([])
        os.setresgid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
        os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)  # drops every capability with it
    elif plan.identity == AS_ROOT_WITHOUT_CAPS:
        # An empty bounding set and empty sets now: exec as uid 0 gives back no capability, so the candidate can
        # neither read the evaluator's /proc entries (its capabilities are not a subset) nor override permissions.
        for cap in range(int(Path("/proc/sys/kernel/cap_last_cap").read_text()) + 1):
            _prctl(_PR_CAPBSET_DROP, cap, "drop from the capability bounding set")
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        _call(_libc().capset(header, (ctypes.c_uint32 * 6)()), "capset")


def _child(config: dict[str, Any], plan: Plan) -> NoReturn:
    """Confine this forked process and exec the harness; any failure ends it before the candidate runs."""
    try:
        if plan.group:
            plan.group.join()
        os.chdir(config["workdir"])
        _set_limits(config, plan)
        os.dup2(config["token_fd"], 3)  # where the harness reads its token, after the tests
        os.set_inheritable(3, True)
        if config["token_fd"] != 3:
            os.close(config["token_fd"])
        _drop_identity(plan)
        # After the identity change, which clears it: the tree dies with this supervisor, whatever kills it.
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, "parent-death signal")
        if plan.landlock:
            landlock.restrict(config["workdir"], plan.landlock)
        if plan.seccomp:
            seccomp.install()
        os.execv(sys.executable, [sys.executable, "-I", "-B", "-u", "main.py"])
    except BaseException as err:
        os.write(2, f"sandbox: {err}\n".encode(errors="replace"))
    os._exit(CONFINE_FAILED)


def _tree(root: int) -> list[tuple[int, int, int]]:
    """Every descendant of `root` as (pid, tasks, resident bytes), from /proc/*/stat (kernels often lack
    /proc/*/task/*/children)."""
    children: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                data = Path(f"/proc/{entry.name}/stat").read_bytes()
            except OSError:  # gone meanwhile
                continue
            fields = data[data.rindex(b")") + 2 :].split()  # after the command, which may hold anything
            children[int(fields[1])].append((int(entry.name), int(fields[17]), int(fields[21]) * _PAGE))
    found, frontier = [], [root]
    while frontier:
        kids = children.get(frontier.pop(), [])
        found += kids
        frontier += [pid for pid, _, _ in kids]
    return found


def _over(config: dict[str, Any], plan: Plan) -> str | None:
    """Which polled limit the tree exceeds now, if any."""
    tree = _tree(os.getpid())
    if "pids" in plan.polled and sum(tasks for _, tasks, _ in tree) > config["processes"]:
        return "processes"
    if "memory" in plan.polled and sum(rss for _, _, rss in tree) > config["memory_mb"] << 20:
        return "memory"
    return None


def _watch(pid: int, config: dict[str, Any], plan: Plan) -> tuple[int, str | None]:
    """Wait for the candidate until the timeout (counting the tree meanwhile where polled); kill it if it must
    die. Returns its wait status and why it was killed."""
    deadline = time.monotonic() + config["timeout_s"]
    pidfd = os.pidfd_open(pid)
    killed = None
    while killed is None:
        left = deadline - time.monotonic()
        if select.select([pidfd], [], [], max(0.0, min(left, POLL_S) if plan.polled else left))[0]:
            break
        killed = "timeout" if left <= 0 else _over(config, plan) if plan.polled else None
    if killed:
        os.kill(pid, signal.SIGKILL)  # in a PID namespace: its init, so every process in it
    os.close(pidfd)
    return os.waitpid(pid, 0)[1], killed


def _sweep() -> None:
    """Kill and reap every remaining descendant until there is none; orphans come back here (subreaper)."""
    while True:
        for pid, _, _ in _tree(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return


def main() -> None:
    config = json.loads(sys.argv[1])
    os.set_inheritable(config["status_fd"], False)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1, "child subreaper")
    plan_ = plan(config)
    if plan_.identity == AS_SANDBOX_UID:
        os.chown(config["workdir"], SANDBOX_UID, SANDBOX_UID)
    pid = os.fork()
    if pid == 0:
        _child(config, plan_)
    os.close(config["token_fd"])
    try:
        status, killed = _watch(pid, config, plan_)
    finally:
        _sweep()
    oom = plan_.group.oom_kills() if plan_.group else 0
    if plan_.group:
        plan_.group.remove()
    report = {"returncode": os.waitstatus_to_exitcode(status), "killed": killed, "oom_kills": oom,
              "sandbox": plan_.name}  # fmt: skip
    os.write(config["status_fd"], json.dumps(report).encode())


if __name__ == "__main__":
    main()
