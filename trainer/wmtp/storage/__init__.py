"""One resolver for every URI the project reads or writes (plain paths, file:// and s3://) and one object store
behind it, with a backend per scheme.

`parse_uri` is the only place a URI is taken apart: it splits off the scheme and lets that scheme's backend
read the rest. `BACKENDS` maps each scheme to its backend (`wmtp.storage.backend.Backend`: `file` in
`storage/file.py`, `s3` in `storage/s3.py`); a new store is one module and one line there. `Storage` hands each
call to the backend of its Location's scheme, so the puller, the model and data loaders and the checkpoint store
never ask which store a URI names. `describe_error` turns any S3 failure into one `StorageError` line with the
exit code that classifies it. `LocalTree` is the one way from a remote key to a local file: it refuses keys that
would leave its root and never follows a symbolic link below it.
"""

from __future__ import annotations

import os
import uuid
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from wmtp.storage.backend import Backend, Writer
from wmtp.storage.errors import StorageError, UnsafePath, describe_error, error_code, is_transient
from wmtp.storage.file import FileBackend
from wmtp.storage.local import LocalTree, safe_relative
from wmtp.storage.location import Location, ObjectInfo
from wmtp.storage.s3 import S3Backend

__all__ = [
    "BACKENDS",
    "Backend",
    "LocalTree",
    "Location",
    "ObjectInfo",
    "Storage",
    "StorageError",
    "UnsafePath",
    "Writer",
    "describe_error",
    "error_code",
    "is_transient",
    "parse_uri",
    "safe_relative",
]

# scheme → backend. A plain path (no "://") is the file scheme.
BACKENDS: dict[str, type[Backend]] = {"file": FileBackend, "s3": S3Backend}


def parse_uri(uri: str | os.PathLike[str]) -> Location:
    """`s3://bucket/key`, `file:///abs/path` or a plain (relative or absolute) path."""
    text = os.fspath(uri)
    scheme, rest = text.split("://", 1) if "://" in text else ("file", text)
    if scheme not in BACKENDS:
        known = " or ".join(f"{name}://" for name in BACKENDS)
        raise ValueError(f"{text!r}: unknown URI scheme {scheme!r}; use a path, {known}")
    return BACKENDS[scheme].parse(rest, text)


class Storage:
    """Every store behind one interface: each call goes to the backend of its Location's scheme.

    `settings[scheme]` configures that scheme's backend (`Storage(s3=config.s3)`); a scheme without settings
    gets its backend's defaults. Backends are made once, here; they open their clients on first use.
    """

    def __init__(self, **settings: Any) -> None:
        unknown = sorted(set(settings) - set(BACKENDS))
        if unknown:
            raise TypeError(f"no storage backend for the scheme(s) {', '.join(unknown)}")
        self.backends: dict[str, Backend] = {
            scheme: make(settings[scheme]) if scheme in settings else make()  # type: ignore[call-arg]
            for scheme, make in BACKENDS.items()
        }

    def backend(self, loc: Location) -> Backend:
        return self.backends[loc.scheme]

    def objects(self, loc: Location) -> list[ObjectInfo]:
        """Every file under `loc` as a folder or prefix, else the one file it names; [] if neither exists.
        Failures raise `StorageError`."""
        return self.backend(loc).objects(loc)

    def exists(self, loc: Location) -> bool:
        return self.backend(loc).exists(loc)

    def is_file(self, loc: Location) -> bool:
        return self.backend(loc).is_file(loc)

    def list_dir(self, loc: Location) -> list[str]:
        """Names of the immediate children (files and sub-folders), sorted; empty if nothing is there."""
        return self.backend(loc).list_dir(loc)

    def size(self, loc: Location) -> int:
        """Total bytes under a file or folder."""
        return self.backend(loc).size(loc)

    def read_bytes(self, loc: Location) -> bytes:
        return self.backend(loc).read_bytes(loc)

    def read_range(self, loc: Location, offset: int, length: int) -> bytes:
        """`length` bytes from `offset` (fewer at the end, b"" past it)."""
        return self.backend(loc).read_range(loc, offset, length)

    def write_bytes(self, loc: Location, data: bytes) -> None:
        """Readers see the old content or the new, never a partial file."""
        self.backend(loc).write_bytes(loc, data)

    def open_writer(self, loc: Location) -> Writer:
        """A stream to the file at `loc`: `finish` makes it whole there, `abort` gives it up."""
        return self.backend(loc).open_writer(loc)

    def rename(self, old: Location, new: Location) -> None:
        """Move a file within one store."""
        self.backend(old).rename(old, new)

    def delete(self, loc: Location) -> None:
        """Remove a file or a whole folder; absent is fine."""
        self.backend(loc).delete(loc)

    def download(self, loc: Location, dest: Path) -> Path:
        """Copy a file or folder to the local path `dest` (a folder is mirrored with its layout). A remote key
        that would land outside `dest` is refused (`UnsafePath`), and no link below `dest` is ever followed."""
        return self.backend(loc).download(loc, dest)

    def upload(self, src: Path, loc: Location) -> None:
        """Copy a local file or folder to `loc`."""
        self.backend(loc).upload(src, loc)

    def local_copy(self, loc: Location) -> AbstractContextManager[Path]:
        """A local path for `loc`: the path itself on disk, or a temporary download removed afterwards. Nothing
        there is one `StorageError` naming `loc` (not a later failure of whatever reads the path)."""
        return self.backend(loc).local_copy(loc)

    def local_folder(self, loc: Location) -> AbstractContextManager[Path]:
        """A local folder to write into whose files are at `loc` once the block ends without an error: the folder
        itself on disk, or a temporary one uploaded afterwards."""
        return self.backend(loc).local_folder(loc)

    def local_path(self, loc: Location) -> Path | None:
        """Where `loc` lies on this machine's file system, or None where it lies in a store elsewhere."""
        return self.backend(loc).local_path(loc)

    def missing(self, loc: Location, shown: str | None = None) -> StorageError:
        """The error for nothing at `loc` (named as `shown`, else its URI), with its store's exit code: bad input
        for a local path, not found for an object store."""
        return self.backend(loc).missing(shown or loc.uri)

    def probe(self, root: Location) -> None:
        """Write and delete a small object under `root`: a `StorageError` (or OSError) now, where a checkpoint
        could not be saved there later."""
        probe = root / f".wmtp-probe-{uuid.uuid4().hex}"
        self.write_bytes(probe, b"wmtp write probe\n")
        self.delete(probe)
