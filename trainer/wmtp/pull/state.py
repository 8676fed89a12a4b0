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
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

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

    def __init__(self, path: Path, *, stale_after: float = 30.0, heartbeat: float = 5.0, poll: float = 0.25) -> None:
        self.path = path
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
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        seen, since, waiting_for = "", time.monotonic(), None
        while True:
            record = self._read()
            owner = _parse(record)
            if record != seen:
                seen, since = record, time.monotonic()
            if self._try_flock():
                if (
                    not record
                    or (owner.get("host") == socket.gethostname() and self._flock_excludes())
                    or time.monotonic() - since > self.stale_after
                ) and self._claim():
                    return
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            if record and owner.get("token") != waiting_for:
                waiting_for = owner.get("token")
                log.info("%s is being pulled by %s; waiting", self.path.parent.parent, _describe(owner))
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
        fd = os.open(self.path, os.O_RDWR)
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
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict[str, Any]) -> str:
    return f"host {owner.get('host', '?')} pid {owner.get('pid', '?')}"


class DestState:
    """The marker and journal of one destination; call `begin`, `record` and `commit` only under its lock."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.dir = dest / STATE_DIR
        self.lock_path = self.dir / "lock"
        self.tmp = self.dir / "tmp"
        self._marker = self.dir / "marker.json"
        self._journal = self.dir / "journal.jsonl"
        self._journal_lock = threading.Lock()

    def marker(self) -> dict[str, Any]:
        try:
            return json.loads(self._marker.read_text())
        except (FileNotFoundError, ValueError):
            return {"complete": False, "files": {}}

    def known(self) -> dict[str, dict[str, Any]]:
        """Entries of every file finished so far: the marker's, updated by the journal of a crashed pull."""
        files = dict(self.marker().get("files", {}))
        with contextlib.suppress(FileNotFoundError), open(self._journal) as f:
            for line in f:
                with contextlib.suppress(ValueError):  # a line cut short by the crash
                    entry = json.loads(line)
                    files[entry.pop("rel")] = entry
        return files

    def begin(self, sources: list[str], files: dict[str, dict[str, Any]]) -> None:
        """Record what is already good as incomplete, and drop what a killed puller left half-written."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self._write_marker(sources, files, complete=False)
        self._journal.unlink(missing_ok=True)

    def record(self, rel: str, entry: dict[str, Any]) -> None:
        line = json.dumps({"rel": rel, **entry}) + "\n"
        with self._journal_lock, open(self._journal, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def commit(self, sources: list[str], files: dict[str, dict[str, Any]]) -> None:
        self._write_marker(sources, files, complete=True)
        self._journal.unlink(missing_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _write_marker(self, sources: list[str], files: dict[str, dict[str, Any]], complete: bool) -> None:
        doc = {"version": 1, "complete": complete, "sources": sources, "files": files}
        tmp = self.dir / f"marker.{uuid.uuid4().hex}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._marker)


def digest(path: Path, algo: str) -> str:
    """A file's digest in the form S3 reports it: hex for md5 (the ETag), base64 for the additional checksums."""
    crc = 0
    hasher = None if algo == "crc32" else hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            if hasher is None:
                crc = zlib.crc32(chunk, crc)
            else:
                hasher.update(chunk)
    if hasher is None:
        return base64.b64encode(crc.to_bytes(4, "big")).decode()
    return hasher.hexdigest() if algo == "md5" else base64.b64encode(hasher.digest()).decode()
