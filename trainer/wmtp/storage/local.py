"""The one way from a remote key to a local file: `safe_relative` refuses keys that would leave their folder, and
`LocalTree` never follows a symbolic link below its root."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from wmtp.storage.errors import UnsafePath


def safe_relative(key: str, source: str = "") -> str:
    """`key` as a path below a folder: plain segments only (no empty, `.` or `..` segment, no leading `/`, no NUL).

    S3 keys are arbitrary strings: `a/../../etc/x`, `a//b` (which joins as `/b`) or `/x` are all valid keys.
    """
    if not key or "\0" in key or any(part in ("", ".", "..") for part in key.split("/")):
        shown = repr(key[:200]) + ("…" if len(key) > 200 else "")
        raise UnsafePath(f"{source + ': ' if source else ''}key {shown} does not map to a path inside the folder")
    return key


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class LocalTree:
    """A local folder that remote keys are written into, safely.

    Every path below `root` is reached one segment at a time from an open folder (openat) with O_NOFOLLOW, so a
    symbolic link planted anywhere below it stops the operation with `UnsafePath` instead of sending a write, a
    truncation or a rename outside; swapping a folder for a link mid-way cannot redirect it either. `root`
    itself is the caller's choice and may be a link.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        return self.root / safe_relative(rel)

    def _refusal(self, err: OSError, shown: str, fd: int, name: str) -> OSError:
        """UnsafePath when `name` in the folder `fd` is a link (O_NOFOLLOW gives ELOOP, or ENOTDIR with
        O_DIRECTORY) or a file where a folder is needed; any other error as it is."""
        if err.errno not in (errno.ELOOP, errno.ENOTDIR):
            return err
        try:
            is_link = stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
        except OSError:
            is_link = False
        if is_link:
            return UnsafePath(f"{self.root / shown}: a symbolic link, never followed below {self.root}; remove it")
        return UnsafePath(f"{self.root / shown}: a file where a folder is needed; remove it")

    def _folder(self, folders: list[str], create: bool) -> int:
        """An fd of root/folders..., reached segment by segment; with `create`, missing folders are made."""
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for depth, folder in enumerate(folders, start=1):
            try:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(folder, 0o755, dir_fd=fd)
                child = os.open(folder, _DIR_FLAGS, dir_fd=fd)
            except OSError as err:
                raise self._refusal(err, "/".join(folders[:depth]), fd, folder) from None
            finally:
                os.close(fd)
            fd = child
        return fd

    @contextlib.contextmanager
    def _parent(self, rel: str, create: bool) -> Iterator[tuple[int, str]]:
        """(an fd of rel's folder, rel's last segment)."""
        *folders, name = safe_relative(rel).split("/")
        fd = self._folder(folders, create)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def open(self, rel: str, flags: int, mode: int = 0o644) -> int:
        """`os.open` of root/rel, never through a link; with O_CREAT, missing folders are made."""
        with self._parent(rel, create=bool(flags & os.O_CREAT)) as (fd, name):
            try:
                return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
            except OSError as err:
                raise self._refusal(err, rel, fd, name) from None

    def read(self, rel: str, limit: int) -> bytes:
        """Up to `limit` + 1 bytes of root/rel (one more than allowed tells the caller it is too large)."""
        with os.fdopen(self.open(rel, os.O_RDONLY), "rb") as f:
            return f.read(limit + 1)

    def lstat(self, rel: str) -> os.stat_result | None:
        """The entry itself (a link is not followed), or None when absent."""
        try:
            with self._parent(rel, create=False) as (fd, name):
                return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def mkdir(self, rel: str) -> None:
        """Make the folder root/rel and its parents; a link or a file in the way is refused."""
        os.close(self._folder(safe_relative(rel).split("/"), create=True))

    def replace(self, src: str, dst: str) -> None:
        """Rename root/src to root/dst, making dst's folders; a link at dst is replaced, never followed."""
        with self._parent(src, create=False) as (src_fd, src_name), self._parent(dst, create=True) as (fd, name):
            os.replace(src_name, name, src_dir_fd=src_fd, dst_dir_fd=fd)

    def remove(self, rel: str) -> None:
        """Remove root/rel: a file, a link (not what it points to) or a whole folder; absent is fine."""
        with contextlib.suppress(FileNotFoundError), self._parent(rel, create=False) as (fd, name):
            if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                shutil.rmtree(name, dir_fd=fd)  # fd-based: it never follows a link inside either
            else:
                os.unlink(name, dir_fd=fd)

    def write_atomic(self, rel: str, write: Callable[[Any], object]) -> None:
        """Create root/rel by `write(binary file)` into a temporary sibling, synced and renamed into place."""
        with self._parent(rel, create=True) as (fd, name):
            tmp = f".{name[:100]}.{uuid.uuid4().hex}.tmp"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                with os.fdopen(os.open(tmp, flags, 0o644, dir_fd=fd), "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=fd)
                raise
