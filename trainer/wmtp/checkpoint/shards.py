"""torch.distributed.checkpoint (DCP) straight to and from the store, whichever backend holds it, with nothing
staged whole.

`ShardWriter` streams each rank's shard files to their final place through the store's `Writer` (S3: a
multipart upload, one part in memory at a time) and records every file it wrote with its size and SHA-256,
computed on the way: the commit marker is made from these records. `ShardReader` reads only the byte ranges of
the tensors its rank needs (`read_range`: one ranged GET per tensor slice on S3), and checks `.metadata` against
the marker before unpickling it. Both count their bytes.

Nothing read from a store runs code. `.metadata` is a pickle, but `MetadataUnpickler` creates only the classes
DCP's `Metadata` is made of (its dataclasses, `torch.Size`, dtypes and layouts: the globals of real `.metadata`
files); anything else is refused before it exists. DCP's stock planner unpickles each non-tensor value (the
optimizer's param groups) with `torch.load(weights_only=False)`: `SafeLoadPlanner` loads them with
`weights_only=True`, as DCP already loads tensors. The marker sits in the same store as the files it vouches for,
so its digests catch damage, not an attacker: these refusals are what keep a writable store from running code.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from wmtp.checkpoint.store import CheckpointError, FileRecord
from wmtp.config import clip
from wmtp.storage import Location, Storage, Writer

METADATA = ".metadata"
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# The globals a DCP `.metadata` holds (listed from real ones with pickletools), besides torch's dtypes.
_DCP_CLASSES = ("Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
                "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")  # fmt: skip
METADATA_GLOBALS = frozenset(
    {(_DCP_METADATA, name) for name in _DCP_CLASSES}
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # a layout from its name: torch.strided
        ("collections", "OrderedDict"),
    }
)


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` and nothing else: a global outside `METADATA_GLOBALS` and torch's dtypes is
    refused (pickle.UnpicklingError) before it is looked up, so a planted pickle can create no other object and
    call no other function."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(vars(torch).get(name), torch.dtype)  # no lazy import
        if (module, name) in METADATA_GLOBALS or dtype:
            return super().find_class(module, name)
        if (module, name) == ("builtins", "getattr"):  # DCP pickles enum members as getattr(EnumClass, "NAME")
            return _member
        raise pickle.UnpicklingError(f"{module}.{name} is not part of checkpoint metadata")


def _member(owner: Any, name: str) -> Any:
    """getattr for a pickle, limited to a public attribute of a class the allow-list already admitted."""
    allowed = any(owner is vars(__import__(m, fromlist=[n])).get(n) for m, n in METADATA_GLOBALS)
    if not allowed or not isinstance(name, str) or name.startswith("_"):
        raise pickle.UnpicklingError(f"getattr({owner!r}, {name!r}) is not part of checkpoint metadata")
    return getattr(owner, name)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but the non-tensor values (the optimizer's param groups, saved with
    `torch.save`) load with `weights_only=True`: plain values and tensors, never code."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:  # what torch raises for a global outside its weights-only set
            reason = " ".join(str(err).split())
            raise CheckpointError(f"{fqn}: refused: its saved value is not plain data ({clip(reason, 200)})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


class FileLog:
    """What one rank wrote into a checkpoint: name → FileRecord. Writer threads add to it concurrently."""

    def __init__(self) -> None:
        self._records: dict[str, FileRecord] = {}
        self._lock = threading.Lock()

    def add(self, name: str, record: FileRecord) -> None:
        with self._lock:
            self._records[name] = record

    def move(self, old: str, new: str) -> None:
        with self._lock:
            self._records[new] = self._records.pop(old)

    def records(self) -> dict[str, FileRecord]:
        with self._lock:
            return dict(self._records)


class _RecordedStream(io.RawIOBase):
    """What DCP writes, passed on to a store's `Writer` while it is counted and hashed for the marker's record."""

    def __init__(self, sink: Writer) -> None:
        super().__init__()
        self._sink = sink
        self._hash = hashlib.sha256()
        self._size = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._size

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._sink.write(view)
        self._hash.update(view)
        self._size += len(view)
        return len(view)

    def record(self) -> FileRecord:
        return FileRecord(self._size, self._hash.hexdigest())


class StoreFileSystem(FileSystemBase):
    """DCP's file operations on `Location`s through `Storage`; writes are recorded in `written`.

    A stream opened for reading is its Location alone: `ShardReader` reads exactly the byte range of each tensor
    slice (one ranged GET on S3), never through a buffer."""

    def __init__(self, storage: Storage, written: FileLog | None = None) -> None:
        self.storage = storage
        self.written = written if written is not None else FileLog()
        self.bytes_read = [0]

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        location: Location = path
        if "r" in mode:
            yield location
            return
        sink = self.storage.open_writer(location)
        stream = _RecordedStream(sink)
        try:
            yield stream
        except BaseException:
            sink.abort()
            raise
        sink.finish()  # the marker will vouch for this file: it must be whole in the store first
        self.written.add(location.name, stream.record())

    def concat_path(self, path: Any, suffix: str) -> Location:
        return path / suffix

    def init_path(self, path: Any) -> Location:
        return path

    def rename(self, path: Any, new_path: Any) -> None:
        self.storage.rename(path, new_path)
        self.written.move(path.name, new_path.name)

    def mkdir(self, path: Any) -> None:
        """Nothing to do: every writer makes the folders its file needs (and an object store has none)."""

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return isinstance(checkpoint_id, Location)

    def exists(self, path: Any) -> bool:
        return self.storage.is_file(path)

    def rm_file(self, path: Any) -> None:
        self.storage.delete(path)


class ShardWriter(FileSystemWriter):
    """Each rank's shards (one file per rank) and rank 0's `.metadata`, written straight to `location`."""

    def __init__(self, location: Location, storage: Storage, written: FileLog) -> None:
        # The stock writer's own file system is replaced at once; fsync happens as each file is finished.
        super().__init__(location.path, sync_files=False, overwrite=True)
        self.fs = StoreFileSystem(storage, written)
        self.path = location

    def storage_meta(self) -> StorageMeta | None:
        # The stock one records the checkpoint id (here a Location) in the pickled metadata: a plain string.
        return StorageMeta(checkpoint_id=self.path.uri, save_id=self.save_id)


class ShardReader(FileSystemReader):
    """Reads only the byte ranges this rank's tensors need; `.metadata` is checked against the marker."""

    def __init__(self, location: Location, storage: Storage, expected: dict[str, FileRecord]) -> None:
        super().__init__(location.path)
        self.fs = StoreFileSystem(storage)
        self.path = location
        self.expected = expected
        self._metadata: Metadata | None = None

    @property
    def bytes_read(self) -> int:
        return self.fs.bytes_read[0]

    def _slice_file(self, file: Any, sinfo: Any) -> io.BytesIO:
        if sinfo.relative_path not in self.expected:  # the metadata names the shard files: only the marker's
            raise CheckpointError(f"{self.path.uri}: refused: {METADATA} names {clip(repr(sinfo.relative_path), 200)}, "
                                  "which the marker does not list")  # fmt: skip
        data = self.fs.storage.read_range(file, sinfo.offset, sinfo.length)
        self.fs.bytes_read[0] += len(data)
        if len(data) != sinfo.length:
            raise CheckpointError(f"{self.path.uri}: damaged checkpoint: {sinfo.relative_path} ends early")
        return io.BytesIO(data)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """`.metadata`, read, checked and unpickled once. Call it before `dcp.load`: a refusal is then one error
        naming the file, where DCP would log it twice with tracebacks and raise an AssertionError quoting it."""
        if self._metadata is None:
            location = self.path / METADATA
            data = self.fs.storage.read_bytes(location)
            self.fs.bytes_read[0] += len(data)
            check_digest(location, data, self.expected.get(METADATA))
            self._metadata = unpickle_metadata(location, data)
        metadata = self._metadata
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def check_digest(location: Location, data: bytes, record: FileRecord | None) -> None:
    """CheckpointError unless `data` is what the marker recorded for `location` (when it recorded a digest)."""
    if record is None:
        raise CheckpointError(f"{location.uri}: not listed in the checkpoint's marker")
    if record.sha256 and hashlib.sha256(data).hexdigest() != record.sha256:
        raise CheckpointError(f"{location.uri}: damaged checkpoint: its content does not match the marker's SHA-256")


def unpickle_metadata(location: Location, data: bytes) -> Metadata:
    """The DCP `Metadata` in `data`, through `MetadataUnpickler`; CheckpointError naming `location` for anything
    else (a pickle that wants another class or function, or one that is not DCP metadata at all)."""
    try:
        metadata = MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as err:  # a damaged pickle raises whatever its opcodes lead to
        raise CheckpointError(f"{location.uri}: refused: {clip(f'{type(err).__name__}: {err}', 300)}") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{location.uri}: refused: a {type(metadata).__name__}, not checkpoint metadata")
    return metadata
