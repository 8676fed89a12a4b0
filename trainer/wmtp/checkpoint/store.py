"""The checkpoint store: the one place that knows the layout, the commit marker, retention and resume resolution.

    <root>/checkpoint_step_00001000/   model + optimizer (torch.distributed.checkpoint shards and .metadata),
                                       trainer_state.json, rng_rank<r>.pt, COMMITTED (written last)
    <root>/final/                      the final model: HF save_pretrained layout + MTP heads + tokenizer

A checkpoint exists only once COMMITTED is present; anything else under <root> is ignored by listing and
resolution, and removed by retention. `root` is `<base_path>/<run name>` on any URI the storage resolves.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from wmtp.contract import CHECKPOINT_PREFIX, COMMITTED, FINAL_DIR, step_dir_name
from wmtp.storage import Location, Storage, parse_uri

STATE_FILE = "trainer_state.json"
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")

__all__ = ["COMMITTED", "STATE_FILE", "CheckpointError", "CheckpointInfo", "CheckpointStore", "step_dir_name"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resolved or used; the message lists what exists."""


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    location: Location
    committed: bool
    committed_at: float | None = None


class CheckpointStore:
    def __init__(self, root: str | Location, storage: Storage) -> None:
        self.root = root if isinstance(root, Location) else parse_uri(root)
        self.storage = storage

    def step_location(self, step: int) -> Location:
        return self.root / step_dir_name(step)

    @property
    def final_location(self) -> Location:
        return self.root / FINAL_DIR

    def is_committed(self, location: Location) -> bool:
        return self.storage.is_file(location / COMMITTED)

    def list(self, include_uncommitted: bool = False) -> list[CheckpointInfo]:
        """Checkpoints by ascending step; uncommitted ones only on request (for `checkpoints list`)."""
        infos = []
        for name in self.storage.list_dir(self.root):
            match = _NAME.match(name)
            if not match:
                continue
            location = self.root / name
            marker = location / COMMITTED
            committed = self.storage.is_file(marker)
            if committed or include_uncommitted:
                when = json.loads(self.storage.read_bytes(marker))["time"] if committed else None
                infos.append(CheckpointInfo(int(match.group(1)), location, committed, when))
        return sorted(infos, key=lambda info: info.step)

    def latest(self) -> CheckpointInfo | None:
        committed = self.list()
        return committed[-1] if committed else None

    def commit(self, step: int, files: list[str]) -> Location:
        """Make a fully written checkpoint visible; the marker records what it contains."""
        return self.mark_committed(self.step_location(step), files, step=step)

    def mark_committed(self, location: Location, files: list[str], **fields: Any) -> Location:
        """Write the COMMITTED marker (time, files and `fields`) last, once everything else is in place."""
        payload = {**fields, "time": time.time(), "files": sorted(files)}
        self.storage.write_bytes(location / COMMITTED, json.dumps(payload).encode())
        return location

    def prune(self, keep_last: int, protect: Location | None = None) -> list[Location]:
        """Delete all but the newest `keep_last` committed checkpoints, and uncommitted leftovers older than
        the newest commit. `protect` (the checkpoint this run resumed from) survives until a newer one exists."""
        everything = self.list(include_uncommitted=True)
        committed = [info for info in everything if info.committed]
        if not committed:
            return []
        newest = committed[-1].step
        keep = {info.location for info in committed[-keep_last:]}
        if protect is not None and not any(info.step > self._step_of(protect) for info in committed):
            keep.add(protect)
        doomed = [
            info.location for info in everything if info.location not in keep and (info.committed or info.step < newest)
        ]
        for location in doomed:
            # The marker goes first so that an interrupted delete never leaves a "committed" partial checkpoint.
            self.storage.delete(location / COMMITTED)
            self.storage.delete(location)
        return doomed

    @staticmethod
    def _step_of(location: Location) -> int:
        match = _NAME.match(location.name)
        return int(match.group(1)) if match else -1

    def resolve(self, spec: str | None) -> Location | None:
        """`never`/None → start fresh; `auto` → latest if any; `latest`; `step_N`; or a checkpoint URI."""
        if spec is None or spec == "never":
            return None
        if spec in ("auto", "latest"):
            latest = self.latest()
            if latest is None and spec == "latest":
                raise CheckpointError(f"--resume latest: no committed checkpoint under {self.root.uri}")
            return latest.location if latest else None
        step_match = re.fullmatch(r"step_(\d+)", spec)
        if step_match:
            step = int(step_match.group(1))
            committed = self.list()
            for info in committed:
                if info.step == step:
                    return info.location
            have = ", ".join(f"step_{info.step}" for info in committed) or "none"
            raise CheckpointError(
                f"--resume {spec}: no committed checkpoint at that step under {self.root.uri}; committed steps: {have}"
            )
        location = parse_uri(spec)
        if not self.is_committed(location):
            raise CheckpointError(f"--resume {spec}: not a committed checkpoint (no {COMMITTED} marker)")
        return location
