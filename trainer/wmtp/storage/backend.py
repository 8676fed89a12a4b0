"""The one interface every store implements (`Backend`), so that nothing outside a backend asks which store a URI
names: the checkpoint store, the model and data loaders and the puller call these methods and the scheme picks
the implementation (`wmtp.storage.BACKENDS`).

Every method takes Locations of its own backend's scheme. Failures the user has to act on are `StorageError`s
(one line, an exit code); `read_range`, `open_writer` and `rename`, which DCP drives from inside a checkpoint save
or load, let the store's own errors through for the checkpoint manager to report.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from wmtp.storage.errors import StorageError
from wmtp.storage.location import Location, ObjectInfo


class Writer(Protocol):
    """A file being written by appending: `finish` makes it whole at its place, `abort` gives it up.

    Streams let a checkpoint shard go to the store as it is serialised (S3: a multipart upload, one part in
    memory at a time) instead of being staged whole first."""

    def write(self, data: memoryview) -> None: ...

    def finish(self) -> None: ...

    def abort(self) -> None: ...


class Backend(Protocol):
    """A store of files under URIs of one scheme: a local file system, an object store."""

    @staticmethod
    def parse(rest: str, uri: str) -> Location:
        """The Location `rest` (the URI after `scheme://`, or a plain path for the file scheme) names; ValueError
        naming `uri` where it names none. Called by `parse_uri` alone."""
        ...

    def exists(self, loc: Location) -> bool:
        """A file, a folder or a prefix with something under it."""
        ...

    def is_file(self, loc: Location) -> bool: ...

    def size(self, loc: Location) -> int:
        """Total bytes under a file or folder."""
        ...

    def list_dir(self, loc: Location) -> list[str]:
        """Names of the immediate children (files and sub-folders), sorted; empty if nothing is there."""
        ...

    def objects(self, loc: Location) -> list[ObjectInfo]:
        """Every file under `loc` as a folder or prefix, else the one file it names; [] if neither exists."""
        ...

    def read_bytes(self, loc: Location) -> bytes: ...

    def read_range(self, loc: Location, offset: int, length: int) -> bytes:
        """`length` bytes from `offset` (fewer at the end, b"" past it): a sharded load reads only its tensors."""
        ...

    def write_bytes(self, loc: Location, data: bytes) -> None:
        """Readers see the old content or the new, never a partial file."""
        ...

    def open_writer(self, loc: Location) -> Writer:
        """A stream to the file at `loc`; what a failed stream leaves is never vouched for (no marker lists it)."""
        ...

    def rename(self, old: Location, new: Location) -> None: ...

    def delete(self, loc: Location) -> None:
        """Remove a file or a whole folder; absent is fine."""
        ...

    def download(self, loc: Location, dest: Path) -> Path:
        """Copy a file or folder to the local path `dest` (a folder keeps its layout). Remote keys reach the disk
        only through `LocalTree`: one that would leave `dest` is refused, no link below `dest` is followed."""
        ...

    def upload(self, src: Path, loc: Location) -> None:
        """Copy a local file or folder to `loc`."""
        ...

    def local_copy(self, loc: Location) -> AbstractContextManager[Path]:
        """A local path holding what `loc` holds, for libraries that read paths (HF, torch); a temporary copy is
        removed afterwards. Nothing at `loc` is `missing(loc.uri)`."""
        ...

    def local_folder(self, loc: Location) -> AbstractContextManager[Path]:
        """A local folder whose files are at `loc` once the block ends without an error, for libraries that write
        folders (HF `save_pretrained`)."""
        ...

    def local_path(self, loc: Location) -> Path | None:
        """Where `loc` lies on this machine's file system, or None for a store elsewhere: a path is read in place,
        a URI elsewhere is one other machines can reach too."""
        ...

    def missing(self, shown: str) -> StorageError:
        """The error for nothing at `shown`, in this store's words and with its exit code."""
        ...


def files_to_upload(src: Path, loc: Location) -> list[tuple[Path, Location]]:
    """(local file, its target) for an upload of `src` to `loc`: the file itself, or a folder's files in order."""
    if src.is_file():
        return [(src, loc)]
    return [(file, loc / file.relative_to(src).as_posix()) for file in sorted(p for p in src.rglob("*") if p.is_file())]
