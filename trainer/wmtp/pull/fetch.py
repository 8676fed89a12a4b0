"""Fetching S3 objects into a destination: ranged GETs on a shared pool, retries, verification, progress.

Used by `wmtp.pull`, which decides what to fetch; this module fetches it and raises `StorageError` (one line,
an exit code) for anything the user has to act on.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    FlexibleChecksumError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from wmtp.pull.state import DestState, digest
from wmtp.storage import ObjectInfo, StorageError, describe_error, is_transient

log = logging.getLogger(__name__)

MiB = 1 << 20
_PART_ATTEMPTS = 5  # on top of botocore's own retries of each request: these also cover a stream cut mid-body
_LOG_EVERY_S = 15.0
# CRC32C and CRC64NVME need awscrt, which is not a dependency; objects with only those fall back to the ETag.
_CHECKSUMS = (("ChecksumSHA256", "sha256"), ("ChecksumSHA1", "sha1"), ("ChecksumCRC32", "crc32"))


class _ShortRead(Exception):
    """A response body that ended before its byte range did."""


_STREAM_ERRORS = (ResponseStreamingError, ReadTimeoutError, IncompleteReadError, ConnectionClosedError,
                  FlexibleChecksumError, _ShortRead)  # fmt: skip


def expected_digest(head: dict[str, Any]) -> tuple[str, str] | None:
    """(algorithm, value) that S3's HEAD/GET headers promise for the whole object, or None if they promise none."""
    etag = head.get("ETag", "").strip('"')
    multipart = "-" in etag
    # A COMPOSITE checksum, the multipart default, is a checksum of the parts' checksums, not of the data.
    if head.get("ChecksumType") == "FULL_OBJECT" or (head.get("ChecksumType") is None and not multipart):
        for header, algo in _CHECKSUMS:
            if head.get(header) and "-" not in head[header]:
                return algo, head[header]
    # A multipart ETag is the MD5 of the parts' MD5s: it cannot be recomputed without the uploader's part sizes.
    # Under SSE-KMS or SSE-C the ETag is not an MD5 of the data either.
    encrypted = head.get("SSECustomerAlgorithm") or str(head.get("ServerSideEncryption", "")).startswith("aws:kms")
    if not multipart and not encrypted and re.fullmatch(r"[0-9a-f]{32}", etag):
        return "md5", etag
    return None


@dataclass
class _Transfer:
    obj: ObjectInfo
    tmp: str  # relative to the destination, like obj.rel: every access goes through its LocalTree
    ranged: bool
    ranges: list[tuple[int, int]]  # inclusive byte ranges
    left: int = 0
    head: dict[str, Any] = field(default_factory=dict)


class Meter:
    """Bytes fetched: a rich progress bar on a terminal, else a log line every 15 s."""

    def __init__(self, tty: bool) -> None:
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        self.bar = Progress(*columns, TimeRemainingColumn(), console=Console(stderr=True), disable=not tty)
        self.tty = tty
        self._lock = threading.Lock()
        self._task = TaskID(-1)
        self._label, self._done, self._total, self._started, self._logged = "", 0, 0, 0.0, 0.0

    def start(self, label: str, total: int) -> None:
        self._task = self.bar.add_task(label, total=total)
        self._label, self._done, self._total = label, 0, total
        self._started = self._logged = time.monotonic()

    def grow(self, n: int) -> None:
        with self._lock:
            self._total += n
            self.bar.update(self._task, total=self._total)

    def advance(self, n: int) -> None:
        self.bar.advance(self._task, n)
        with self._lock:
            self._done += n
            now = time.monotonic()
            due = not self.tty and now - self._logged > _LOG_EVERY_S
            if due:
                self._logged = now
        if due:
            rate = self._done / 1e6 / (now - self._started)
            log.info("%s: %.2f of %.2f GB, %.0f MB/s", self._label, self._done / 1e9, self._total / 1e9, rate)


class Fetcher:
    """Fetches one destination's objects as range tasks on the shared pool; the thread that finishes an
    object's last range verifies it and renames it into place."""

    def __init__(self, client: Any, pool: ThreadPoolExecutor, state: DestState, part_size: int, meter: Meter):
        self.client, self.pool, self.state, self.part_size, self.meter = client, pool, state, part_size, meter
        self.entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._abort = threading.Event()
        self._token = uuid.uuid4().hex[:8]  # temporary names of two overlapping pullers never collide

    def run(self, objs: list[ObjectInfo]) -> dict[str, dict[str, Any]]:
        transfers = [self._transfer(obj, n) for n, obj in enumerate(objs)]
        futures = [self.pool.submit(self._fetch, t, a, b) for t in transfers for a, b in t.ranges]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            self._abort.set()
            for future in futures:
                future.cancel()
            raise
        return self.entries

    def _transfer(self, obj: ObjectInfo, n: int) -> _Transfer:
        ranged = obj.size > self.part_size
        starts = range(0, obj.size, self.part_size) if ranged else [0]
        ranges = [(s, min(s + self.part_size, obj.size) - 1) for s in starts]
        t = _Transfer(obj, f"{self.state.tmp_rel}/{self._token}-{n}.part", ranged, ranges, len(ranges))
        self._preallocate(t)
        return t

    def _preallocate(self, t: _Transfer) -> None:
        fd = self.state.tree.open(t.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.ftruncate(fd, t.obj.size)
        finally:
            os.close(fd)

    def _fetch(self, t: _Transfer, start: int, end: int) -> None:
        if self._abort.is_set():
            return
        try:
            self._get(t, start, end)
            with self._lock:
                t.left -= 1
                last = t.left == 0
            if last:
                self._finish(t)
        except (BotoCoreError, ClientError) as err:
            raise describe_error(err, t.obj.loc.uri) from err

    def _get(self, t: _Transfer, start: int, end: int) -> None:
        # IfMatch pins every range to the version listed, so a file is never stitched from two versions.
        args = {"Bucket": t.obj.loc.bucket, "Key": t.obj.loc.path, "IfMatch": t.obj.etag}
        if t.ranged:
            args["Range"] = f"bytes={start}-{end}"
        else:  # a whole-object GET also returns the checksums to verify against
            args["ChecksumMode"] = "ENABLED"
        for attempt in range(1, _PART_ATTEMPTS + 1):
            written = 0
            try:
                response = self.client.get_object(**args)
                fd = self.state.tree.open(t.tmp, os.O_WRONLY)
                try:
                    for chunk in response["Body"].iter_chunks(MiB):
                        written += os.pwrite(fd, chunk, start + written)
                        self.meter.advance(len(chunk))
                finally:
                    os.close(fd)
                if written != end - start + 1:
                    raise _ShortRead(f"got {written} of {end - start + 1} bytes")
                if not t.ranged:
                    t.head = response
                return
            except (BotoCoreError, ClientError, _ShortRead) as err:
                self.meter.advance(-written)
                if attempt == _PART_ATTEMPTS or not _transient(err):
                    raise
                delay = random.uniform(0, min(20.0, 0.5 * 2**attempt))  # exponential backoff, full jitter
                log.warning("%s bytes %d-%d: %s; retry in %.1f s", t.obj.loc.uri, start, end, err, delay)
                time.sleep(delay)

    def _finish(self, t: _Transfer) -> None:
        obj, tree = t.obj, self.state.tree
        final = tree.root / obj.rel
        for attempt in (1, 2):
            head = t.head
            if t.ranged:
                loc = {"Bucket": obj.loc.bucket, "Key": obj.loc.path}
                head = self.client.head_object(**loc, IfMatch=obj.etag, ChecksumMode="ENABLED")
            expected = expected_digest(head)
            algo = expected[0] if expected else "crc32"  # recorded even when unverifiable, for `--verify`
            size = tree.lstat(t.tmp).st_size  # type: ignore[union-attr]
            value = digest(tree, t.tmp, algo) if size == obj.size else ""
            if size == obj.size and (expected is None or value == expected[1]):
                break
            if value == "" or expected is None:
                problem = f"size {size} instead of {obj.size}"
            else:
                problem = f"{algo} {value} instead of {expected[1]}"
            if attempt == 2:
                raise StorageError(f"{obj.loc.uri} → {final}: {problem}, again after downloading it twice")
            log.warning("%s: %s; downloading it again", obj.loc.uri, problem)
            self.meter.grow(obj.size)
            self._preallocate(t)
            for start, end in t.ranges:
                self._get(t, start, end)
        fd = tree.open(t.tmp, os.O_RDWR)
        try:
            os.fsync(fd)  # the marker must never vouch for data still only in the page cache
            mtime_ns = os.fstat(fd).st_mtime_ns
        finally:
            os.close(fd)
        tree.replace(t.tmp, obj.rel)  # a link planted at the final name is replaced, never written through
        entry = {"bucket": obj.loc.bucket, "key": obj.loc.path, "size": obj.size, "etag": obj.etag,
                 "mtime_ns": mtime_ns, "digest": {"algo": algo, "value": value},
                 "verified": expected is not None}  # fmt: skip
        self.state.record(obj.rel, entry)
        with self._lock:
            self.entries[obj.rel] = entry


def _transient(err: Exception) -> bool:
    return is_transient(err) or isinstance(err, _STREAM_ERRORS)
