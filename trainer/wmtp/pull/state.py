"""What a destination folder knows about its pull: the lock, the completion marker, the journal, digests.

Everything lives in `DEST/.wmtp-pull/`, so the pulled layout itself stays clean:

    lock           flock'ed by the puller at work; holds its owner record {host, pid, token, beat}
    marker.json    {"version", "complete", "sources", "files": {relative path: entry}}; an entry records the
                   object's bucket, key, size and ETag, the local file's mtime_ns and a digest {algo, value}
    journal.jsonl  one entry per file finished since marker.json was written, so a crash loses no finished file
    tmp/           data being downloaded; renamed into place only once complete and verified
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import socket
import stat
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

from wmtp.config.documents import clip
from wmtp.storage import LocalTree, UnsafePath, safe_relative

log = logging.getLogger(__name__)

STATE_DIR = ".wmtp-pull"
_RECORD_BYTES = 512
_READ_CHUNK = 8 << 20


class DestLock:
    """Exclusive ownership of a destination across processes, pods and hosts.

    flock is the primary mechanism: the kernel (or the NFS server) drops it when its holder dies, so a killed
    puller on this host never blocks the next. Some shared filesystems accept flock without excluding anyone,
    and hosts (pods) cannot tell whether another host's flock reaches them, so the owner record is the second
    guard: its holder rewrites it every `heartbeat` seconds, and a waiter that sees another host's record
    unchanged for `stale_after` seconds of its own clock takes over. Comparing observations on one clock avoids
    trusting timestamps written by another host. If two pullers ever do overlap, they waste bandwidth but never
    corrupt anything: each writes under its own temporary name and renames a verified file into place.
    """

    def __init__(
        self, tree: LocalTree, rel: str, *, stale_after: float = 30.0, heartbeat: float = 5.0, poll: float = 0.25
    ) -> None:
        self.tree, self.rel = tree, rel
        self.path = tree.path(rel)
        self.stale_after, self.heartbeat, self.poll = stale_after, heartbeat, poll
        self.token = uuid.uuid4().hex
        self._fd = -1
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    def __enter__(self) -> DestLock:
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def acquire(self) -> None:
        self._fd = self.tree.open(self.rel, os.O_RDWR | os.O_CREAT)
        seen, since, waiting_for = "", time.monotonic(), None
        while True:
            record = self._read()
            owner = _parse(record)
            if record != seen:
                seen, since = record, time.monotonic()
            if self._try_flock():
                if (
                    not owner.get("token")  # nobody's record: empty, or garbage no puller writes
                    or (owner.get("host") == socket.gethostname() and self._flock_excludes())
                    or time.monotonic() - since > self.stale_after
                ) and self._claim():
                    return
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            if record and owner.get("token") != waiting_for:
                waiting_for = owner.get("token")
                log.info("%s is being pulled by %s; waiting", self.tree.root, _describe(owner))
            time.sleep(self.poll)

    def release(self) -> None:
        self._stop.set()
        if self._beater is not None:
            self._beater.join()
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)

    def _try_flock(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:  # ENOLCK, EOPNOTSUPP: no flock on this filesystem; the owner record alone decides
            pass
        return True

    def _flock_excludes(self) -> bool:
        """Whether flock really excludes here: a second open file must be refused while we hold the first."""
        fd = self.tree.open(self.rel, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def _claim(self) -> bool:
        beat = 0
        self._write(beat)
        # Without an excluding flock two waiters may claim at once; the later write wins, the other backs off.
        if not self._flock_excludes():
            time.sleep(self.poll)
            if _parse(self._read()).get("token") != self.token:
                return False

        def beat_forever() -> None:
            nonlocal beat
            while not self._stop.wait(self.heartbeat):
                beat += 1
                self._write(beat)

        self._beater = threading.Thread(target=beat_forever, name="wmtp-pull-heartbeat", daemon=True)
        self._beater.start()
        return True

    def _write(self, beat: int) -> None:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "beat": beat}
        # One fixed-size pwrite: a reader sees the old record or the new one, never an empty file in between.
        os.pwrite(self._fd, json.dumps(record).ljust(_RECORD_BYTES).encode(), 0)
        os.fsync(self._fd)

    def _read(self) -> str:
        return os.pread(self._fd, 4 * _RECORD_BYTES, 0).decode(errors="replace").strip()


def _parse(record: str) -> dict[str, Any]:
    try:
        owner = json.loads(record)
    except (ValueError, RecursionError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict[str, Any]) -> str:
    return clip(f"host {owner.get('host', '?')} pid {owner.get('pid', '?')}", 200)


_MAX_STATE_BYTES = 256 << 20  # a marker entry is ~300 bytes: room for ~800k files
DIGESTS = ("md5", "sha1", "sha256", "crc32")
_ENTRY = {"bucket": str, "key": str, "size": int, "etag": str, "mtime_ns": int, "digest": dict, "verified": bool}


def _marker_problem(doc: object) -> str | None:
    """Why a parsed marker cannot be trusted, or None."""
    if not (isinstance(doc, dict) and isinstance(doc.get("complete"), bool) and isinstance(doc.get("files"), dict)):
        return "not a pull marker"
    return next(filter(None, (_entry_problem(rel, entry) for rel, entry in doc["files"].items())), None)


def _entry_problem(rel: object, entry: object) -> str | None:
    """Why a recorded file entry cannot be trusted, or None if it is well-formed."""
    if not isinstance(rel, str) or not isinstance(entry, dict):
        return "an entry is not a {path: record} pair"
    try:
        safe_relative(rel)
    except UnsafePath:
        return f"path {rel[:100]!r} is outside the destination"
    for key, kind in _ENTRY.items():
        value = entry.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"{rel[:100]}: {key} is not a {kind.__name__}"
    algo, value = entry["digest"].get("algo"), entry["digest"].get("value")
    if algo not in DIGESTS or not isinstance(value, str):
        return f"{rel[:100]}: digest is not one of {', '.join(DIGESTS)} with a value"
    return None


class DestState:
    """The marker and journal of one destination; call `begin`, `record` and `commit` only under its lock.

    Everything here is read as untrusted: a state file that is too large, not JSON, not of the expected shape,
    or a symbolic link is ignored with a warning (and replaced when the pull begins), and the files it described
    are verified again (`plan`).
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.tree = LocalTree(dest)
        self.lock_rel = f"{STATE_DIR}/lock"
        self.tmp_rel = f"{STATE_DIR}/tmp"
        self._marker = f"{STATE_DIR}/marker.json"
        self._journal = f"{STATE_DIR}/journal.jsonl"
        self._journal_lock = threading.Lock()

    def prepare(self) -> None:
        """Make the state folder, removing anything but a folder in its place and anything but a file in the
        lock's (a puller never makes links: one there was planted to redirect a write or a truncation)."""
        self._remove_unless(STATE_DIR, stat.S_ISDIR, "a folder")
        self.tree.mkdir(STATE_DIR)
        self._remove_unless(self.lock_rel, stat.S_ISREG, "a file")

    def _remove_unless(self, rel: str, kind: Any, what: str) -> None:
        found = self.tree.lstat(rel)
        if found is not None and not kind(found.st_mode):
            log.warning("%s: not %s; removing it", self.dest / rel, what)
            self.tree.remove(rel)

    def _read(self, rel: str) -> bytes | None:
        """A state file's bytes; None when absent or untrustworthy (it is replaced when the pull begins)."""
        try:
            data = self.tree.read(rel, _MAX_STATE_BYTES)
        except FileNotFoundError:
            return None
        except (UnsafePath, OSError) as err:  # a link where a state file should be, say
            self._distrust(rel, f"cannot read it ({err})")
            return None
        if len(data) > _MAX_STATE_BYTES:
            self._distrust(rel, f"larger than {_MAX_STATE_BYTES >> 20} MiB")
            return None
        return data

    def _distrust(self, rel: str, why: str) -> None:
        log.warning("%s: %s; ignoring it, files in place are verified again", self.dest / rel, clip(why, 300))

    def marker(self) -> dict[str, Any]:
        """The completion marker, {"complete": False, "files": {}} when absent or untrustworthy."""
        data = self._read(self._marker)
        if data is None:
            return {"complete": False, "files": {}}
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as err:
            doc, problem = None, f"not JSON ({err})"
        else:
            problem = _marker_problem(doc)
        if problem:
            self._distrust(self._marker, problem)
            return {"complete": False, "files": {}}
        return doc

    def known(self) -> dict[str, dict[str, Any]]:
        """Entries of every file finished so far: the marker's, updated by the journal of a crashed pull."""
        files = dict(self.marker()["files"])
        data = self._read(self._journal)
        bad = 0
        for line in (data or b"").split(b"\n"):
            try:
                entry = json.loads(line) if line.strip() else None
            except (ValueError, RecursionError):  # a line cut short by the crash, or worse
                entry = None
            rel = entry.pop("rel", None) if isinstance(entry, dict) else None
            if entry is None or _entry_problem(rel, entry):
                bad += bool(line.strip())
                continue
            files[rel] = entry
        if bad:
            log.warning("%s: skipped %d unreadable journal line(s)", self.dest / self._journal, bad)
        return files

    def begin(self, sources: list[str], files: dict[str, dict[str, Any]]) -> None:
        """Record what is already good as incomplete, and drop what a killed puller left half-written."""
        self.tree.remove(self.tmp_rel)
        self.tree.mkdir(self.tmp_rel)
        self._write_marker(sources, files, complete=False)
        self.tree.remove(self._journal)

    def record(self, rel: str, entry: dict[str, Any]) -> None:
        line = (json.dumps({"rel": rel, **entry}) + "\n").encode()
        with self._journal_lock:
            fd = self.tree.open(self._journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def commit(self, sources: list[str], files: dict[str, dict[str, Any]]) -> None:
        self._write_marker(sources, files, complete=True)
        self.tree.remove(self._journal)
        self.tree.remove(self.tmp_rel)

    def _write_marker(self, sources: list[str], files: dict[str, dict[str, Any]], complete: bool) -> None:
        doc = {"version": 1, "complete": complete, "sources": sources, "files": files}
        self.tree.write_atomic(self._marker, lambda f: f.write(json.dumps(doc, indent=1, sort_keys=True).encode()))


def digest(tree: LocalTree, rel: str, algo: str) -> str:
    """A file's digest in the form S3 reports it: hex for md5 (the ETag), base64 for the additional checksums."""
    crc = 0
    hasher = None if algo == "crc32" else hashlib.new(algo)
    with os.fdopen(tree.open(rel, os.O_RDONLY), "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            if hasher is None:
                crc = zlib.crc32(chunk, crc)
            else:
                hasher.update(chunk)
    if hasher is None:
        return base64.b64encode(crc.to_bytes(4, "big")).decode()
    return hasher.hexdigest() if algo == "md5" else base64.b64encode(hasher.digest()).decode()
