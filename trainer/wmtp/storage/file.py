"""The `file` backend: plain paths and file:// URIs on this machine's file system (a local disk or a mounted
volume). Folders are real here, so a listing of an empty one is empty and a missing path is bad input (exit 2),
not a missing object."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from wmtp.contract import ExitCode
from wmtp.storage.backend import files_to_upload
from wmtp.storage.errors import StorageError
from wmtp.storage.location import Location, ObjectInfo


class FileWriter:
    """A file written in place as it streams; `finish` syncs it, since a commit marker will vouch for it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "wb")  # noqa: SIM115 - closed by finish or abort

    def write(self, data: memoryview) -> None:
        self._file.write(data)

    def finish(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


class FileBackend:
    """Paths on this machine; nothing is copied to read or write them in place."""

    @staticmethod
    def parse(rest: str, uri: str) -> Location:
        return Location("file", str(Path(rest).expanduser().resolve()))

    def exists(self, loc: Location) -> bool:
        return Path(loc.path).exists()

    def is_file(self, loc: Location) -> bool:
        return Path(loc.path).is_file()

    def size(self, loc: Location) -> int:
        path = Path(loc.path)
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    def list_dir(self, loc: Location) -> list[str]:
        path = Path(loc.path)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

    def objects(self, loc: Location) -> list[ObjectInfo]:
        path = Path(loc.path)
        if path.is_file():
            return [ObjectInfo(loc, path.stat().st_size, "", loc.name)]
        found = []
        for file in path.rglob("*"):
            if file.is_file():
                rel = file.relative_to(path).as_posix()
                found.append(ObjectInfo(loc / rel, file.stat().st_size, "", rel))
        return found

    def read_bytes(self, loc: Location) -> bytes:
        return Path(loc.path).read_bytes()

    def read_range(self, loc: Location, offset: int, length: int) -> bytes:
        with open(loc.path, "rb") as file:
            file.seek(offset)
            return file.read(length)

    def write_bytes(self, loc: Location, data: bytes) -> None:
        path = Path(loc.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def open_writer(self, loc: Location) -> FileWriter:
        return FileWriter(Path(loc.path))

    def rename(self, old: Location, new: Location) -> None:
        os.replace(old.path, new.path)

    def delete(self, loc: Location) -> None:
        path = Path(loc.path)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def download(self, loc: Location, dest: Path) -> Path:
        src = Path(loc.path)
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
        return dest

    def upload(self, src: Path, loc: Location) -> None:
        for file, target in files_to_upload(src, loc):
            Path(target.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target.path)

    @contextlib.contextmanager
    def local_copy(self, loc: Location) -> Iterator[Path]:
        if not Path(loc.path).exists():
            raise self.missing(loc.uri)
        yield Path(loc.path)

    @contextlib.contextmanager
    def local_folder(self, loc: Location) -> Iterator[Path]:
        path = Path(loc.path)
        path.mkdir(parents=True, exist_ok=True)
        yield path

    def local_path(self, loc: Location) -> Path | None:
        return Path(loc.path)

    def missing(self, shown: str) -> StorageError:
        return StorageError(f"{shown}: no such file or folder", ExitCode.BAD_INPUT)
