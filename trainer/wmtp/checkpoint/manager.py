"""The checkpoint manager: a run's named stateful parts, when to save them, and how they are saved and restored.

Parts, under constant names: `model`, `algorithm` (the algorithm's trainable modules) and `optimizer` go through
torch.distributed.checkpoint, so the same files hold sharded FSDP state and load on any number of ranks;
`lr_scheduler`, `dataloader` and `train_state` are JSON in `trainer_state.json` (no pickle: loading the trainer
state never runs code), beside each rank's RNG state.

The training loop calls `save(step, last)` after every step, and the manager decides the rest: it saves every
`save_interval` steps and at the last one (the end of training, or a stop), waits where it must, reports each
checkpoint once it has committed (to the run's status: the operator resumes from what was reported), then
applies retention, which never deletes the newest reported checkpoint or the one the run resumed from.

Saves are asynchronous: a save copies this rank's state into host memory (the only time training waits) and a
background thread writes it straight to the store, every rank its own shards; rank 0 writes COMMITTED once every
rank's files are written, listing them all with their sizes and digests. At most one save is in flight: the next
save waits for the previous one, and the last save (or `wait`) waits for itself. A process that dies mid-save
leaves no COMMITTED, so that checkpoint is never resumed. The background thread talks to the other ranks over
its own process group, never the one training uses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from wmtp.checkpoint.shards import (
    FileLog,
    SafeLoadPlanner,
    ShardReader,
    ShardWriter,
    StoreFileSystem,
    check_digest,
)
from wmtp.checkpoint.store import STATE_FILE, CheckpointError, CheckpointStore, FileRecord
from wmtp.config import clip
from wmtp.storage import Location

log = logging.getLogger(__name__)
# DCP warns on every call without a process group that it assumes one process, which is what we mean. A filter
# installed once: `warnings.catch_warnings` is not thread-safe, and saves run in a background thread.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

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


def _split(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The modules' state dict as the `model` part and the `algorithm` part (every other module)."""
    parts: dict[str, dict[str, Any]] = {"model": {}, "algorithm": {}}
    for key, value in state.items():
        parts["model" if key.split(".", 1)[0] == MODEL else "algorithm"][key] = value
    return parts


def _layout(state: Any) -> Any:
    """What a host copy of `state` must match: every key, and every tensor's type, local shape and dtype."""
    if isinstance(state, dict):
        return tuple((key, _layout(value)) for key, value in state.items())
    if isinstance(state, list | tuple):
        return tuple(_layout(value) for value in state)
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state  # a DTensor: this rank's shard
        return type(state).__name__, tuple(local.shape), local.dtype
    return type(state).__name__


def _with_saved_state(optim_sd: dict[str, Any], saved_keys: Iterable[str]) -> dict[str, Any]:
    """`optim_sd` with per-parameter state only for the parameters the checkpoint holds state for. An optimizer
    gives a parameter state at its first update: a checkpoint of a head warm-up has none for the trunk, and the
    trunk must start the phase after it without any, exactly as the run that never stopped did."""
    prefix = "optimizer.state."
    saved = {key.removeprefix(prefix) for key in saved_keys if key.startswith(prefix)}
    state = {fqn: value for fqn, value in optim_sd["state"].items() if any(f"{fqn}.{name}" in saved for name in value)}
    return {**optim_sd, "state": state}


def _first_failure(err: BaseException) -> str:
    """One line for DCP's CheckpointException, which carries every rank's exception and traceback."""
    failures = getattr(err, "failures", None) or {}
    inner = next(iter(failures.values()))[0] if failures else err
    text = str(inner) if isinstance(inner, CheckpointError) else f"{type(inner).__name__}: {inner}"
    return " ".join(text.split())


def _dcp() -> Any:
    import torch.distributed.checkpoint as dcp

    return dcp


@dataclass
class _Live:
    """`get_state_dict`'s answer as the parts to save, kept from save to save (see `_live_state`)."""

    tensors: list[torch.Tensor]  # every tensor it refers to, in order: a new object means it must be made again
    optimizer_keys: list[tuple[str, ...]]  # each parameter's optimizer state names
    state: dict[str, Any]
    layout: Any  # _layout(state)


class CheckpointManager:
    """A run's checkpoints: when to save, saving and restoring every part, reporting, and retention.

    `modules` holds the model under `MODEL` and the algorithm's trainable modules under their own keys: one
    module tree for the optimizer and the checkpoint. `fingerprint` identifies what determines training; a
    checkpoint with another one is refused unless the caller allows the change. `report` is told of each
    committed checkpoint once, and of the one resumed from, and says whether it was heard (None: nobody to tell).
    `group` is the process group for the checkpoint's own collectives (None: one process).
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
        report: Callable[[Location], bool] | None = None,
        rank: int = 0,
        group: Any = None,
    ) -> None:
        self.store = store
        self.modules, self.optimizer, self.states = modules, optimizer, states
        self.save_interval, self.keep_last, self.fingerprint = save_interval, keep_last, fingerprint
        self.report, self.rank, self.group = report, rank, group
        self.resumed_from: Location | None = None
        self.reported: Location | None = None  # the newest checkpoint the run's status has been told about
        self.latest: Location | None = None  # the newest committed checkpoint of this process (or resumed from)
        self.bytes_read = 0  # by the last load, from the store, on this rank
        self._in_flight: Future[Location] | None = None
        self._host_copy: tuple[Any, dict[str, Any]] | None = None  # (layout, this rank's state in host memory)
        self._live: _Live | None = None  # see _live_state

    def save(self, step: int, last: bool = False) -> None:
        """After optimizer step `step`: save checkpoint `step` if it is due (every `save_interval` steps, and at the
        `last` step, the end of training or a stop), after the previous save has committed; at the `last` step,
        wait for it too. A save committed since the previous call is reported and retention applied."""
        if not (last or step % self.save_interval == 0):
            self.poll()
            return
        self.wait()
        self._start(step)
        if last:
            self.wait()

    def _start(self, step: int) -> None:
        """Stage checkpoint `step` in host memory and write it in the background."""
        started = time.perf_counter()
        staged = self._stage(self._live_state())
        trainer_state = {"step": step, "fingerprint": self.fingerprint}
        trainer_state |= {name: part.state_dict() for name, part in self.states.items()}
        files = {f"rng_rank{self.rank}.json": json.dumps(rng_state()).encode()}
        if self.rank == 0:
            files[STATE_FILE] = json.dumps(trainer_state, indent=1).encode()
        stall = time.perf_counter() - started
        future: Future[Location] = Future()
        self._in_flight = future
        thread = threading.Thread(
            target=self._write, args=(future, step, staged, files, stall), name=f"checkpoint-{step}", daemon=True
        )
        thread.start()

    def _live_state(self) -> _Live:
        """`get_state_dict`'s answer, kept from save to save: it holds the live tensors (training changes them in
        place), and walking every name in Python was most of a save's stall (~30 ms for 1,000 tensors). Made again
        when any tensor is a new object or a parameter's optimizer state gains or loses a name (an optimizer may
        create or replace its state rather than update it in place; a parameter gets state at its first update, so
        the trunk's appears when a head warm-up ends); the param groups' values (the scheduler's lr) are refreshed
        every time."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        optimizer_state = list(self.optimizer.state.values())
        tensors = [*self.modules.parameters(), *self.modules.buffers()]
        tensors += [value for state in optimizer_state for value in state.values() if isinstance(value, torch.Tensor)]
        keys = [tuple(state) for state in optimizer_state]
        live = self._live
        if (
            live is None
            or live.optimizer_keys != keys
            or len(live.tensors) != len(tensors)
            or any(a is not b for a, b in zip(live.tensors, tensors))  # noqa: B905
        ):
            modules_sd, optim_sd = get_state_dict(self.modules, self.optimizer)
            state = {**_split(modules_sd), "optimizer": optim_sd}
            live = self._live = _Live(tensors, keys, state, _layout(state))
        for saved, group in zip(live.state["optimizer"]["param_groups"], self.optimizer.param_groups, strict=True):
            saved.update((key, value) for key, value in group.items() if key != "params")
        return live

    def _stage(self, live: _Live) -> dict[str, Any]:
        """Copy the live state into the host copy, allocated on the first save (pinned with CUDA) and refilled in
        place after: fresh memory would cost a page fault per page on every save. Allocated again whenever the
        state's layout (names, shapes, dtypes) changes, as the optimizer's does when a head warm-up ends. Safe
        because the previous save has finished writing by the time the next one stages (one in flight)."""
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        if self._host_copy is None or self._host_copy[0] != live.layout:
            host = _create_cpu_state_dict(live.state, pin_memory=torch.cuda.is_available())
            self._host_copy = (live.layout, host)
        return _copy_state_dict(live.state, self._host_copy[1])

    def _write(self, future: Future[Location], step: int, staged: Any, files: dict[str, bytes], stall: float) -> None:
        """The background half of a save: every rank's files, then (rank 0) the marker listing them all."""
        try:
            started = time.perf_counter()
            location = self.store.step_location(step)
            if self.rank == 0:
                # Leftovers of a save of this step that crashed before its commit.
                self.store.storage.delete(location)
            self._barrier()
            written = FileLog()
            fs = StoreFileSystem(self.store.storage, written)
            for name, data in files.items():
                with fs.create_stream(location / name, "wb") as stream:
                    stream.write(data)
            writer = ShardWriter(location, self.store.storage, written)
            _dcp().save(staged, storage_writer=writer, process_group=self.group, no_dist=self.group is None)
            everyone = self._gather(written.records())
            if self.rank == 0:
                self.store.commit(step, {name: record for part in everyone for name, record in part.items()})
                log.info(
                    "checkpoint saved step=%d uri=%s stall_seconds=%.3f write_seconds=%.2f",
                    step, location.uri, stall, time.perf_counter() - started,
                )  # fmt: skip
            # Every rank's save ends with the commit: a rank that stops after `wait` never leaves rank 0 mid-commit
            # (torchrun's agent kills the other workers 30 s after the first one exits).
            self._barrier()
            future.set_result(location)
        except BaseException as err:  # surfaced in the training thread by poll() or wait()
            future.set_exception(err)

    def _barrier(self) -> None:
        if self.group is not None:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def _gather(self, records: dict[str, FileRecord]) -> list[dict[str, FileRecord]]:
        if self.group is None:
            return [records]
        import torch.distributed as dist

        everyone: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, records, group=self.group)
        return everyone

    def poll(self) -> Location | None:
        """The checkpoint the save in flight committed, once it has finished (then only once, reported); its error
        if it failed; None while it runs or when none is in flight."""
        if self._in_flight is None or not self._in_flight.done():
            return None
        return self.wait()

    def wait(self) -> Location | None:
        """Block until the save in flight (if any) has committed, report it and apply retention; returns its
        location, raises its error."""
        future, self._in_flight = self._in_flight, None
        if future is None:
            return None
        try:
            location = future.result()
        except CheckpointError:
            raise
        except BaseException as err:
            raise CheckpointError(f"saving a checkpoint failed: {clip(_first_failure(err), 500)}") from err
        self.latest = location
        self._committed(location)
        return location

    def _committed(self, location: Location) -> None:
        """Report a committed checkpoint, then prune: retention runs only once the newer one has been heard of."""
        if self.report is None or self.report(location):
            self.reported = location
        self.prune()

    def prune(self) -> list[Location]:
        """Rank 0: apply `keep_last`, never deleting the newest reported checkpoint or the one resumed from."""
        if self.rank != 0:
            return []
        pruned = self.store.prune(self.keep_last, protect=(self.resumed_from, self.reported))
        if pruned:
            log.info("pruned %s", ", ".join(location.name for location in pruned))
        return pruned

    def load(self, location: Location, allow_fingerprint_change: bool = False) -> int:
        """Restore every part and this rank's RNG from an intact checkpoint, report it (the run goes on from
        there) and apply retention; returns its step."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        marker = self.store.verify(location)
        storage = self.store.storage
        saved = self._read_json(location, STATE_FILE, marker.files)
        if not isinstance(saved, dict) or "fingerprint" not in saved:
            raise CheckpointError(f"{(location / STATE_FILE).uri}: not a trainer state")
        if saved["fingerprint"] != self.fingerprint and not allow_fingerprint_change:
            raise CheckpointError(
                f"{location.uri} was written with a different config or recipe (fingerprint {saved['fingerprint']}, "
                f"now {self.fingerprint}); pass --allow-config-change to resume from it anyway"
            )
        reader = ShardReader(location, storage, marker.files)
        # Every parameter gets optimizer state to load into (get_state_dict makes it for an empty optimizer); the
        # target keeps only what the checkpoint holds, and parameters without saved state are left without.
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()
        modules_sd, optim_sd = get_state_dict(self.modules, self.optimizer)
        try:
            saved_keys = reader.read_metadata().state_dict_metadata
            target = {**_split(modules_sd), "optimizer": _with_saved_state(optim_sd, saved_keys)}
            _dcp().load(
                target, storage_reader=reader, planner=SafeLoadPlanner(), process_group=self.group,
                no_dist=self.group is None,
            )  # fmt: skip
        except (Exception, _dcp().api.CheckpointException) as err:
            raise CheckpointError(f"{location.uri}: cannot be loaded: {clip(_first_failure(err), 500)}") from err
        # A run resumed on more ranks than saved it: the new ranks reuse rank 0's generator state.
        rng_file = f"rng_rank{self.rank}.json" if f"rng_rank{self.rank}.json" in marker.files else "rng_rank0.json"
        rng = self._read_json(location, rng_file, marker.files)
        try:
            set_rng_state(rng)
        except (TypeError, KeyError, ValueError, IndexError, RuntimeError) as err:
            raise CheckpointError(f"{(location / rng_file).uri}: not an RNG state ({clip(str(err), 200)})") from None
        set_model_state_dict(self.modules, {**target["model"], **target["algorithm"]})
        # Not strict: a parameter the checkpoint holds no optimizer state for has none after loading.
        set_optimizer_state_dict(
            self.modules, self.optimizer, target["optimizer"], options=StateDictOptions(strict=False)
        )
        for name, part in self.states.items():
            part.load_state_dict(saved[name])
        self.bytes_read = reader.bytes_read
        self.resumed_from = self.latest = location
        self._committed(location)
        return saved["step"]

    def _read_json(self, location: Location, name: str, files: dict[str, FileRecord]) -> Any:
        """A JSON part of the checkpoint (trainer or RNG state), checked against the marker; never a pickle."""
        data = self.store.storage.read_bytes(location / name)
        check_digest(location / name, data, files.get(name))
        self.bytes_read += len(data)
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise CheckpointError(f"{(location / name).uri}: not JSON ({clip(str(err), 200)})") from None

    @contextlib.contextmanager
    def save_final(self, mlflow_run_id: str | None = None) -> Iterator[Path]:
        """A local folder to write the final model into (HF save_pretrained layout); on exit it becomes
        <root>/final, committed like a checkpoint, its marker naming the MLflow run that trained it (where
        `wmtp eval` logs). Rank 0's job alone: the others need not wait for it."""
        location = self.store.final_location
        self.store.storage.delete(location)
        with self.store.storage.local_folder(location) as folder:
            yield folder
            records = {
                p.relative_to(folder).as_posix(): FileRecord(p.stat().st_size) for p in folder.rglob("*") if p.is_file()
            }
        self.store.mark_committed(location, records, **({"mlflow_run_id": mlflow_run_id} if mlflow_run_id else {}))
