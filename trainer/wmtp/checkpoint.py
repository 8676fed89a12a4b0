"""The checkpoint store: the one place that knows the layout, the commit marker, retention and resume.

    <root>/checkpoint_step_00001000/   model + optimizer (torch.distributed.checkpoint shards and .metadata),
                                       trainer_state.json, rng_rank<r>.pt, COMMITTED (written last)
    <root>/final/                      the final model: HF save_pretrained layout + MTP heads + tokenizer

A checkpoint exists only once COMMITTED is present; anything else under <root> is ignored by listing and
resolution, and removed by retention. `root` is `<base_path>/<run name>` on any URI the storage resolves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wmtp.storage import Location, Storage, parse_uri

log = logging.getLogger(__name__)

PREFIX = "checkpoint_step_"
COMMITTED = "COMMITTED"
STATE_FILE = "trainer_state.json"
FINAL = "final"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resolved or used; the message lists what exists."""


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


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
        return self.root / FINAL

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


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as JSON (no pickle: loading a checkpoint never runs code)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _dcp() -> Any:
    import torch.distributed.checkpoint as dcp

    return dcp


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    # Without a process group DCP warns on every call that it assumes one process, which is what we mean.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class Checkpointer:
    """Saves and restores a run's named stateful parts through a CheckpointStore.

    Model and optimizer go through torch.distributed.checkpoint, so the same files hold sharded FSDP state and
    load on any number of ranks. Every rank writes its own shards and RNG state; rank 0 writes the trainer
    state and, after all ranks are done, the COMMITTED marker. On S3 each rank stages locally and uploads.
    """

    def __init__(
        self,
        store: CheckpointStore,
        keep_last: int,
        rank: int = 0,
        barrier: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.keep_last = keep_last
        self.rank = rank
        self.barrier = barrier
        self.resumed_from: Location | None = None

    @contextlib.contextmanager
    def _staging(self, location: Location) -> Iterator[Path]:
        if not location.is_s3:
            path = Path(location.path)
            path.mkdir(parents=True, exist_ok=True)
            yield path
            return
        with tempfile.TemporaryDirectory(prefix="wmtp-ckpt-") as tmp:
            yield Path(tmp)
            self.store.storage.upload(Path(tmp), location)

    def save(
        self, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> Location:
        """Write checkpoint `step` and commit it; older checkpoints are untouched until the commit."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        location = self.store.step_location(step)
        if self.rank == 0:
            # Leftovers of a save of this step that crashed before its commit.
            self.store.storage.delete(location)
        self.barrier()
        started = time.perf_counter()
        model_sd, optim_sd = get_state_dict(module, optimizer)
        with self._staging(location) as staging, _quiet_single_process():
            _dcp().save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(staging))
            (staging / f"rng_rank{self.rank}.json").write_text(json.dumps(rng_state()))
            if self.rank == 0:
                (staging / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))
        self.barrier()
        if self.rank == 0:
            self.store.commit(step, self.store.storage.list_dir(location))
            pruned = self.store.prune(self.keep_last, protect=self.resumed_from)
            log.info(
                "checkpoint saved step=%d uri=%s seconds=%.2f pruned=%d",
                step, location.uri, time.perf_counter() - started, len(pruned),
            )  # fmt: skip
        self.barrier()
        return location

    def load(self, location: Location, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model, optimizer and this rank's RNG from a committed checkpoint; returns the trainer state."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not self.store.is_committed(location):
            raise CheckpointError(f"{location.uri}: not a committed checkpoint (no {COMMITTED} marker)")
        storage = self.store.storage
        model_sd, optim_sd = get_state_dict(module, optimizer)
        target = {"model": model_sd, "optimizer": optim_sd}
        with storage.local_copy(location) as local, _quiet_single_process():
            _dcp().load(target, checkpoint_id=str(local))
            rng_file = local / f"rng_rank{self.rank}.json"
            # A run resumed on more ranks than saved it: the new ranks reuse rank 0's generator state.
            rng_file = rng_file if rng_file.exists() else local / "rng_rank0.json"
            set_rng_state(json.loads(rng_file.read_text()))
            state = json.loads((local / STATE_FILE).read_text())
        set_state_dict(module, optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"])
        self.resumed_from = location
        return state

    @contextlib.contextmanager
    def save_final(self) -> Iterator[Path]:
        """A local folder to write the final model into (HF save_pretrained layout); on exit it becomes
        <root>/final, committed like a checkpoint. Rank 0's job alone: the others need not wait for it."""
        location = self.store.final_location
        self.store.storage.delete(location)
        with self._staging(location) as staging:
            yield staging
        self.store.mark_committed(location, self.store.storage.list_dir(location))
