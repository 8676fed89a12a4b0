"""The checkpoint manager: a run's named stateful parts, when to save them, and how they are saved and restored.

Parts, under constant names: `model`, `algorithm` (the algorithm's trainable modules) and `optimizer` go through
torch.distributed.checkpoint, so the same files hold sharded FSDP state and load on any number of ranks;
`lr_scheduler`, `dataloader` and `train_state` are JSON in `trainer_state.json` (no pickle: loading a checkpoint
never runs code), beside each rank's RNG state. Every rank writes its own shards and RNG state; rank 0 writes
the trainer state and, after every rank is done, the COMMITTED marker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from wmtp.checkpoint.store import COMMITTED, STATE_FILE, CheckpointError, CheckpointStore
from wmtp.storage import Location

log = logging.getLogger(__name__)

MODEL = "model"  # the key of the trained model among the modules; every other key is the algorithm's


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as JSON."""
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


def _split(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The modules' state dict as the `model` part and the `algorithm` part (every other module)."""
    parts: dict[str, dict[str, Any]] = {"model": {}, "algorithm": {}}
    for key, value in state.items():
        parts["model" if key.split(".", 1)[0] == MODEL else "algorithm"][key] = value
    return parts


class CheckpointManager:
    """Saves every `save_interval` steps (and when told to), restores every part, prunes after each commit.

    `modules` holds the model under `MODEL` and the algorithm's trainable modules under their own keys: one
    module tree for the optimizer and the checkpoint. `fingerprint` identifies what determines training; a
    checkpoint with another one is refused unless the caller allows the change.
    """

    def __init__(
        self,
        store: CheckpointStore,
        *,
        modules: nn.ModuleDict,
        optimizer: torch.optim.Optimizer,
        states: dict[str, Stateful],
        save_interval: int,
        keep_last: int,
        fingerprint: str,
        rank: int = 0,
        barrier: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.modules, self.optimizer, self.states = modules, optimizer, states
        self.save_interval, self.keep_last, self.fingerprint = save_interval, keep_last, fingerprint
        self.rank, self.barrier = rank, barrier
        self.resumed_from: Location | None = None

    def due(self, step: int) -> bool:
        return step % self.save_interval == 0

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

    def save(self, step: int) -> Location:
        """Write checkpoint `step` and commit it; older checkpoints are untouched until the commit."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        location = self.store.step_location(step)
        if self.rank == 0:
            # Leftovers of a save of this step that crashed before its commit.
            self.store.storage.delete(location)
        self.barrier()
        started = time.perf_counter()
        modules_sd, optim_sd = get_state_dict(self.modules, self.optimizer)
        states = {name: part.state_dict() for name, part in self.states.items()}
        with self._staging(location) as staging, _quiet_single_process():
            _dcp().save({**_split(modules_sd), "optimizer": optim_sd}, checkpoint_id=str(staging))
            (staging / f"rng_rank{self.rank}.json").write_text(json.dumps(rng_state()))
            if self.rank == 0:
                saved = {"step": step, "fingerprint": self.fingerprint, **states}
                (staging / STATE_FILE).write_text(json.dumps(saved, indent=1))
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

    def load(self, location: Location, allow_fingerprint_change: bool = False) -> int:
        """Restore every part and this rank's RNG from a committed checkpoint; returns its step."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not self.store.is_committed(location):
            raise CheckpointError(f"{location.uri}: not a committed checkpoint (no {COMMITTED} marker)")
        storage = self.store.storage
        saved = json.loads(storage.read_bytes(location / STATE_FILE))
        if saved["fingerprint"] != self.fingerprint and not allow_fingerprint_change:
            raise CheckpointError(
                f"{location.uri} was written with a different config or recipe (fingerprint {saved['fingerprint']}, "
                f"now {self.fingerprint}); pass --allow-config-change to resume from it anyway"
            )
        modules_sd, optim_sd = get_state_dict(self.modules, self.optimizer)
        target = {**_split(modules_sd), "optimizer": optim_sd}
        with storage.local_copy(location) as local, _quiet_single_process():
            _dcp().load(target, checkpoint_id=str(local))
            rng_file = local / f"rng_rank{self.rank}.json"
            # A run resumed on more ranks than saved it: the new ranks reuse rank 0's generator state.
            rng_file = rng_file if rng_file.exists() else local / "rng_rank0.json"
            set_rng_state(json.loads(rng_file.read_text()))
        set_state_dict(
            self.modules,
            self.optimizer,
            model_state_dict={**target["model"], **target["algorithm"]},
            optim_state_dict=target["optimizer"],
        )
        for name, part in self.states.items():
            part.load_state_dict(saved[name])
        self.resumed_from = location
        return saved["step"]

    @contextlib.contextmanager
    def save_final(self) -> Iterator[Path]:
        """A local folder to write the final model into (HF save_pretrained layout); on exit it becomes
        <root>/final, committed like a checkpoint. Rank 0's job alone: the others need not wait for it."""
        location = self.store.final_location
        self.store.storage.delete(location)
        with self._staging(location) as staging:
            yield staging
        self.store.mark_committed(location, self.store.storage.list_dir(location))
