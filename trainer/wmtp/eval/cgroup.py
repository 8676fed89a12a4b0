"""A control group for one run, where this process may make one: the memory of the whole process tree (the
kernel's OOM killer acts inside it) and its number of tasks are bounded together, which per-process limits cannot.

cgroup v2 is used when the cgroup this process sits in already delegates `memory`/`pids` to its children (a
cgroup may not both hold processes and enable controllers, and moving the evaluator itself is not this module's
business); cgroup v1 when that controller's hierarchy is mounted and writable. Either may give only one of the
two controllers; `Cgroup.controllers` says which. Nowhere writable (a container, a non-root user): None.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids")


@dataclass(frozen=True)
class Cgroup:
    version: int
    dirs: dict[str, Path]  # controller -> this run's cgroup directory (one directory for both in v2)

    @property
    def controllers(self) -> tuple[str, ...]:
        return tuple(c for c in CONTROLLERS if c in self.dirs)

    def join(self) -> None:
        """Move the calling process in (its children follow); "0" means the writer, in any PID namespace."""
        for directory in set(self.dirs.values()):
            (directory / "cgroup.procs").write_text("0")

    def oom_kills(self) -> int:
        """How many of its processes the OOM killer ended."""
        if "memory" not in self.dirs:
            return 0
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        for line in (self.dirs["memory"] / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        """Remove the (empty) directories; a task the kernel has not finished reaping makes rmdir busy a moment."""
        for directory in set(self.dirs.values()):
            for _ in range(50):
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as err:
                    if err.errno != errno.EBUSY:
                        raise
                    time.sleep(0.02)

    @property
    def name(self) -> str:
        return "+".join(f"cgroup{self.version}-{c}" for c in self.controllers)


def _own_paths() -> dict[str, str]:
    """This process's cgroup per v1 controller, and under "" its v2 cgroup (from /proc/self/cgroup)."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _make(parent: Path, name: str) -> Path | None:
    try:
        (parent / name).mkdir()
    except OSError:  # read-only, not ours, or no such hierarchy
        return None
    return parent / name


def _v2(name: str, own: dict[str, str]) -> Cgroup | None:
    if "" not in own or not (ROOT / "cgroup.controllers").exists():
        return None
    parent = ROOT / own[""].lstrip("/")
    delegated = set((parent / "cgroup.subtree_control").read_text().split()) & set(CONTROLLERS)
    directory = _make(parent, name) if delegated else None
    return Cgroup(2, dict.fromkeys(sorted(delegated), directory)) if directory else None


def _v1(name: str, own: dict[str, str]) -> Cgroup | None:
    dirs = {}
    for controller in CONTROLLERS:
        if controller in own and (ROOT / controller / "cgroup.procs").exists():
            directory = _make(ROOT / controller / own[controller].lstrip("/"), name)
            if directory:
                dirs[controller] = directory
    return Cgroup(1, dirs) if dirs else None


def _limit(group: Cgroup, memory_bytes: int, tasks: int) -> None:
    # Swap counts towards the bound (v1 memsw) or is refused (v2 swap.max); those files exist only with swap
    # accounting, so they are best effort.
    files = {
        1: {"memory": [("memory.limit_in_bytes", memory_bytes)], "pids": [("pids.max", tasks)]},
        2: {"memory": [("memory.max", memory_bytes)], "pids": [("pids.max", tasks)]},
    }[group.version]
    swap = {1: ("memory.memsw.limit_in_bytes", memory_bytes), 2: ("memory.swap.max", 0)}[group.version]
    for controller, directory in group.dirs.items():
        for file, value in files[controller]:
            (directory / file).write_text(str(value))
        if controller == "memory":
            with contextlib.suppress(OSError):
                (directory / swap[0]).write_text(str(swap[1]))


def create(memory_bytes: int, tasks: int) -> Cgroup | None:
    """A new cgroup beneath this process's own, limited to `memory_bytes` and `tasks` (processes and threads)."""
    own = _own_paths()
    name = f"wmtp-sandbox-{os.getpid()}"
    group = _v2(name, own) or _v1(name, own)
    if group is None:
        return None
    try:
        _limit(group, memory_bytes, tasks)
    except OSError:
        group.remove()
        return None
    return group
