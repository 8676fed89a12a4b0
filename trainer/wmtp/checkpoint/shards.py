"""torch.distributed.checkpoint (DCP) straight to and from the store, on disk or S3, with nothing staged whole.

`ShardWriter` streams each rank's shard files to their final place (S3: a multipart upload, one part in memory
at a time) and records every file it wrote with its size and SHA-256, computed on the way: the commit marker is
made from these records. `ShardReader` reads only the byte ranges of the tensors its rank needs (one ranged GET
per tensor slice on S3), and checks `.metadata` against the marker before unpickling it. Both count their bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from wmtp.checkpoint.store import CheckpointError, FileRecord
from wmtp.storage import Location, Storage

PART_SIZE = 64 * 2**20  # multipart upload part; S3 wants at least 5 MiB for every part but the last
READ_BUFFER = 8 * 2**20  # buffered reads of whole small files (.metadata): one GET for most of them
METADATA = ".metadata"


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


class _HashingWriter(io.RawIOBase):
    """Counts and hashes what passes through `write` to `sink`; `finish` returns the record."""

    def __init__(self) -> None:
        super().__init__()
        self._hash = hashlib.sha256()
        self._size = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._size

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._sink(view)
        self._hash.update(view)
        self._size += len(view)
        return len(view)

    def _sink(self, data: memoryview) -> None:
        raise NotImplementedError

    def record(self) -> FileRecord:
        return FileRecord(self._size, self._hash.hexdigest())


class _LocalFile(_HashingWriter):
    def __init__(self, path: Path) -> None:
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "wb")  # noqa: SIM115 - closed by finish or abort

    def _sink(self, data: memoryview) -> None:
        self._file.write(data)

    def finish(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())  # the marker will vouch for this file: it must be on disk first
        self._file.close()

    def abort(self) -> None:
        self._file.close()


class _S3Upload(_HashingWriter):
    """A multipart upload fed part by part (a single PUT when the object is smaller than one part)."""

    def __init__(self, client: Any, location: Location, part_size: int = PART_SIZE) -> None:
        super().__init__()
        self._client, self._location, self._part_size = client, location, part_size
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    def _sink(self, data: memoryview) -> None:
        self._buffer += data
        while len(self._buffer) >= self._part_size:
            self._send(bytes(self._buffer[: self._part_size]))
            del self._buffer[: self._part_size]

    def _send(self, part: bytes) -> None:
        where = {"Bucket": self._location.bucket, "Key": self._location.path}
        if self._upload_id is None:
            self._upload_id = self._client.create_multipart_upload(**where)["UploadId"]
        number = len(self._parts) + 1
        answer = self._client.upload_part(**where, UploadId=self._upload_id, PartNumber=number, Body=part)
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    def finish(self) -> None:
        where = {"Bucket": self._location.bucket, "Key": self._location.path}
        if self._upload_id is None:
            self._client.put_object(**where, Body=bytes(self._buffer))
            return
        if self._buffer:
            self._send(bytes(self._buffer))
        self._client.complete_multipart_upload(
            **where, UploadId=self._upload_id, MultipartUpload={"Parts": self._parts}
        )

    def abort(self) -> None:
        if self._upload_id is not None:
            where = {"Bucket": self._location.bucket, "Key": self._location.path}
            self._client.abort_multipart_upload(**where, UploadId=self._upload_id)


class _S3Ranges(io.RawIOBase):
    """An S3 object read by ranged GETs; `read_range` fetches exactly one slice."""

    def __init__(self, client: Any, location: Location, counter: list[int]) -> None:
        super().__init__()
        self._client, self._location, self._counter = client, location, counter
        self._position = 0

    def readable(self) -> bool:
        return True

    def read_range(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        from botocore.exceptions import ClientError

        try:
            body = self._client.get_object(
                Bucket=self._location.bucket, Key=self._location.path, Range=f"bytes={offset}-{offset + length - 1}"
            )["Body"].read()
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") == "InvalidRange":  # at or past the end
                return b""
            raise
        self._counter[0] += len(body)
        return body

    def readinto(self, buffer: Any) -> int:
        data = self.read_range(self._position, len(buffer))
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


class StoreFileSystem(FileSystemBase):
    """DCP's file operations on `Location`s through `Storage`; writes are recorded in `written`."""

    def __init__(self, storage: Storage, written: FileLog | None = None) -> None:
        self.storage = storage
        self.written = written if written is not None else FileLog()
        self.bytes_read = [0]

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        location: Location = path
        if "r" in mode:
            if location.is_s3:
                raw = _S3Ranges(self.storage.s3, location, self.bytes_read)
                yield io.BufferedReader(raw, buffer_size=READ_BUFFER)
            else:
                with open(location.path, "rb") as file:
                    yield file
            return
        stream = _S3Upload(self.storage.s3, location) if location.is_s3 else _LocalFile(Path(location.path))
        try:
            yield stream
        except BaseException:
            stream.abort()
            raise
        stream.finish()
        self.written.add(location.name, stream.record())

    def concat_path(self, path: Any, suffix: str) -> Location:
        return path / suffix

    def init_path(self, path: Any) -> Location:
        return path

    def rename(self, path: Any, new_path: Any) -> None:
        old, new = path, new_path
        if old.is_s3:
            source = {"Bucket": old.bucket, "Key": old.path}
            self.storage.s3.copy_object(Bucket=new.bucket, Key=new.path, CopySource=source)
            self.storage.s3.delete_object(**source)
        else:
            os.replace(old.path, new.path)
        self.written.move(old.name, new.name)

    def mkdir(self, path: Any) -> None:
        if not path.is_s3:
            Path(path.path).mkdir(parents=True, exist_ok=True)

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

    @property
    def bytes_read(self) -> int:
        return self.fs.bytes_read[0]

    def _slice_file(self, file: Any, sinfo: Any) -> io.BytesIO:
        raw = getattr(file, "raw", None)
        if isinstance(raw, _S3Ranges):
            data = raw.read_range(sinfo.offset, sinfo.length)
        else:
            file.seek(sinfo.offset)
            data = file.read(sinfo.length)
            self.fs.bytes_read[0] += len(data)
        if len(data) != sinfo.length:
            raise CheckpointError(f"{self.path.uri}: damaged checkpoint: {sinfo.relative_path} ends early")
        return io.BytesIO(data)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        location = self.path / METADATA
        data = self.fs.storage.read_bytes(location)
        self.fs.bytes_read[0] += len(data)
        check_digest(location, data, self.expected.get(METADATA))
        metadata = pickle.loads(data)
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
