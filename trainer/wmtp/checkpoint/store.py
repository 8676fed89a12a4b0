"""The checkpoint store: the one place that knows the layout, the commit marker, retention and resume resolution.

    <root>/checkpoint_step_00001000/   model + optimizer (torch.distributed.checkpoint shards and .metadata),
                                       trainer_state.json, rng_rank<r>.json, COMMITTED (written last)
    <root>/final/                      the final model: HF save_pretrained layout + MTP heads + tokenizer, and
                                       algorithm.safetensors: the algorithm's trained modules (a value head)

A checkpoint exists only once COMMITTED is present. The marker lists every file with its size and the SHA-256
computed while it was written, so a checkpoint whose files are missing or cut short is found before anything is
loaded, and reported as one line naming what is wrong. Listing never fails because one marker is unreadable: that
checkpoint is shown as damaged and skipped by `auto`, `latest` and the fallback, and retention treats it as a
leftover. `root` is `<base_path>/<run name>` on any URI the storage resolves.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from wmtp.config import clip
from wmtp.contract import (
    CHECKPOINT_PREFIX,
    COMMITTED,
    FINAL_DIR,
    MLFLOW_RUN_ID,
    RESUME_AUTO,
    RESUME_LATEST,
    RESUME_NEVER,
    RESUME_STEP_PREFIX,
    step_dir_name,
)
from wmtp.storage import Location, Storage, StorageError, parse_uri

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
FINAL_ALGORITHM = "algorithm.safetensors"  # in final/: the algorithm's trainable modules, by their module keys
MAX_MARKER_BYTES = 16 * 2**20  # a marker lists files; anything larger is not one
MAX_MARKER_DEPTH = 8  # a marker nests three levels (marker → files → file); deeper is not one
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_TIME = 1e11  # seconds since the epoch: the year 5138
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
_RUN_ID = re.compile(MLFLOW_RUN_ID)

__all__ = [
    "COMMITTED",
    "FINAL_ALGORITHM",
    "STATE_FILE",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointStore",
    "FileRecord",
    "step_dir_name",
]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resolved or used; the message says why and lists what exists."""


@dataclass(frozen=True)
class FileRecord:
    """One file of a checkpoint as its writer saw it: size, and SHA-256 when it was computed while writing."""

    size: int
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, **({"sha256": self.sha256} if self.sha256 else {})}


@dataclass(frozen=True)
class Marker:
    """A parsed COMMITTED marker: the files it vouches for, when it was written, and (the final model's) the
    MLflow run that trained it, for `wmtp eval` to log to."""

    files: dict[str, FileRecord]
    time: float
    step: int | None = None
    mlflow_run_id: str | None = None


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    location: Location
    committed: bool
    committed_at: float | None = None
    problem: str | None = None  # why a committed checkpoint cannot be used (an unreadable marker)

    @property
    def usable(self) -> bool:
        return self.committed and self.problem is None


def _marker_json(raw: bytes) -> Any:
    """`raw` parsed as JSON once it is small and shallow enough to be a marker: the size and nesting are checked
    before parsing (C-speed passes over the bytes), so no marker can exhaust memory or recursion; ValueError else.
    """
    if len(raw) > MAX_MARKER_BYTES:
        raise ValueError(f"{len(raw)} bytes, more than the {MAX_MARKER_BYTES} a marker may have")
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    for _ in range(MAX_MARKER_DEPTH):  # each pass removes the innermost level of every nest
        brackets, before = brackets.replace(b"[]", b"").replace(b"{}", b""), brackets
        if brackets == before:
            break
    if brackets:
        raise ValueError(f"nested more than {MAX_MARKER_DEPTH} levels deep, or unbalanced")
    try:
        return json.loads(raw)
    except RecursionError:  # the pre-scan should make this unreachable; it must never escape as RecursionError
        raise ValueError("nested too deep") from None


def parse_marker(raw: bytes, where: str) -> Marker:
    """The marker's content, or CheckpointError naming `where` and what is wrong with it: whatever the bytes (too
    large, too deep, not JSON, wrong types), a bad marker makes its own checkpoint damaged and nothing else."""
    try:
        data = _marker_json(raw)
        files = data["files"]
        if not isinstance(files, dict | list):
            raise TypeError(f"files is a {type(files).__name__}")
        # Markers of earlier versions list names only; their sizes cannot be checked.
        entries = files if isinstance(files, dict) else {name: {"size": -1} for name in files}
        records = {str(n): FileRecord(int(e["size"]), _digest(e.get("sha256"))) for n, e in entries.items()}
        run_id = data.get("mlflow_run_id")
        run_id = run_id if isinstance(run_id, str) and _RUN_ID.fullmatch(run_id) else None
        step = data.get("step")
        step = step if isinstance(step, int) and not isinstance(step, bool) else None
        written = float(data["time"])
        if not 0 <= written < MAX_TIME:  # NaN too: it would break every use of the time
            raise ValueError(f"a time that is not a date: {written}")
        return Marker(records, written, step, run_id)
    except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as err:
        detail = "empty" if not raw.strip() else f"{type(err).__name__}: {err}"
        raise CheckpointError(
            f"{where}: damaged checkpoint: its {COMMITTED} marker is unreadable ({clip(detail, 200)})"
        ) from None


def _digest(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and _SHA256.fullmatch(value)):
        return value
    raise ValueError(f"a sha256 that is not 64 hex digits: {clip(repr(value), 80)}")


class CheckpointStore:
    def __init__(self, root: str | Location, storage: Storage) -> None:
        self.root = root if isinstance(root, Location) else parse_uri(root)
        self.storage = storage

    def step_location(self, step: int) -> Location:
        return self.root / step_dir_name(step)

    def step_of(self, location: Location) -> int | None:
        """The step of `location` when it is one of this store's step checkpoints (by its name, nothing read)."""
        match = _NAME.match(location.name)
        return int(match.group(1)) if match and (self.root / location.name).uri == location.uri else None

    @property
    def final_location(self) -> Location:
        return self.root / FINAL_DIR

    def is_committed(self, location: Location) -> bool:
        return self.storage.is_file(location / COMMITTED)

    def read_marker(self, location: Location) -> Marker:
        """The checkpoint's marker; CheckpointError if there is none or it cannot be read."""
        marker = location / COMMITTED
        if not self.storage.is_file(marker):
            raise CheckpointError(f"{location.uri}: not a committed checkpoint (no {COMMITTED} marker)")
        if self.storage.size(marker) > MAX_MARKER_BYTES:
            raise CheckpointError(f"{location.uri}: damaged checkpoint: its {COMMITTED} marker is too large")
        return parse_marker(self.storage.read_bytes(marker), location.uri)

    def verify(self, location: Location) -> Marker:
        """The marker, once every file it lists is present with its recorded size; else CheckpointError saying
        which files are missing or have another size. One listing: nothing is downloaded."""
        marker = self.read_marker(location)
        present = self._sizes(location)
        problems = []
        for name, record in sorted(marker.files.items()):
            if name not in present:
                problems.append(f"{name} is missing")
            elif record.size >= 0 and present[name] != record.size:
                problems.append(f"{name} has {present[name]} bytes, the marker says {record.size}")
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise CheckpointError(f"{location.uri}: damaged checkpoint: {'; '.join(problems[:3])}{more}")
        return marker

    def _sizes(self, location: Location) -> dict[str, int]:
        return {info.rel: info.size for info in self.storage.objects(location)}

    def list(self, include_uncommitted: bool = False) -> list[CheckpointInfo]:
        """Checkpoints by ascending step, those with an unreadable marker included (with their problem);
        uncommitted ones only on request (for `checkpoints list`)."""
        infos = []
        for name in self.storage.list_dir(self.root):
            match = _NAME.match(name)
            if not match:
                continue
            location = self.root / name
            info = CheckpointInfo(int(match.group(1)), location, committed=False)
            if self.is_committed(location):
                try:
                    info = CheckpointInfo(info.step, location, True, self.read_marker(location).time)
                except CheckpointError as err:
                    info = CheckpointInfo(info.step, location, True, problem=str(err))
            if info.committed or include_uncommitted:
                infos.append(info)
        return sorted(infos, key=lambda info: info.step)

    def newest_intact(self, skipped: list[str] | None = None) -> Location | None:
        """The newest committed checkpoint whose files match its marker; the problems of the newer, damaged
        ones are appended to `skipped`."""
        for info in reversed(self.list()):
            try:
                if info.problem:
                    raise CheckpointError(info.problem)
                self.verify(info.location)
                return info.location
            except CheckpointError as err:
                log.warning("skipping %s", err)
                if skipped is not None:
                    skipped.append(str(err))
        return None

    def latest(self) -> CheckpointInfo | None:
        """The newest intact checkpoint."""
        location = self.newest_intact()
        return next(info for info in self.list() if info.location == location) if location else None

    def commit(self, step: int, files: dict[str, FileRecord]) -> Location:
        """Make a fully written checkpoint visible; the marker records what it contains."""
        return self.mark_committed(self.step_location(step), files, step=step)

    def mark_committed(self, location: Location, files: dict[str, FileRecord], **fields: Any) -> Location:
        """Write the COMMITTED marker (time, files and `fields`) last, once everything else is in place."""
        entries = {name: record.to_json() for name, record in sorted(files.items())}
        payload = {**fields, "time": time.time(), "files": entries}
        self.storage.write_bytes(location / COMMITTED, json.dumps(payload).encode())
        return location

    def prune(self, keep_last: int, protect: Iterable[Location | None] = ()) -> list[Location]:
        """Delete all but the newest `keep_last` committed checkpoints and every one in `protect` (the newest
        reported one, the one the run resumed from), and leftovers older than the newest commit: uncommitted
        saves and checkpoints whose marker cannot be read."""
        everything = self.list(include_uncommitted=True)
        usable = [info for info in everything if info.usable]
        if not usable:
            return []
        newest = usable[-1].step
        keep = {info.location for info in usable[-keep_last:]} | {p for p in protect if p is not None}
        doomed = [
            info.location for info in everything if info.location not in keep and (info.usable or info.step < newest)
        ]
        for location in doomed:
            # The marker goes first so that an interrupted delete never leaves a "committed" partial checkpoint.
            self.storage.delete(location / COMMITTED)
            self.storage.delete(location)
        return doomed

    def resolve(self, spec: str | None) -> Location | None:
        """`never`/None → start fresh; `auto` → the newest intact checkpoint if any; `latest` (the same, but one
        must exist); `step_N`; or a checkpoint URI. A named checkpoint must be intact: CheckpointError otherwise."""
        if spec is None or spec == RESUME_NEVER:
            return None
        if spec in (RESUME_AUTO, RESUME_LATEST):
            latest = self.newest_intact()
            if latest is None and spec == RESUME_LATEST:
                raise CheckpointError(f"--resume {spec}: no intact committed checkpoint under {self.root.uri}")
            return latest
        step_match = re.fullmatch(rf"{RESUME_STEP_PREFIX}(\d+)", spec)
        if step_match:
            location = self.step_location(int(step_match.group(1)))
            if not self.is_committed(location):
                have = ", ".join(f"{RESUME_STEP_PREFIX}{info.step}" for info in self.list()) or "none"
                raise CheckpointError(
                    f"--resume {spec}: no committed checkpoint at that step under {self.root.uri}; "
                    f"committed steps: {have}"
                )
        else:
            try:
                location = parse_uri(spec)
            except ValueError as err:
                raise CheckpointError(f"--resume {spec}: {err}") from None
        try:
            self.verify(location)
        except CheckpointError as err:
            raise CheckpointError(f"--resume {spec}: {err}") from None
        except StorageError as err:
            raise CheckpointError(f"--resume {spec}: {err}") from None
        return location
