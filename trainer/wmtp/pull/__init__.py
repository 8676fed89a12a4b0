"""`wmtp pull`: copy models and datasets from S3 into local folders — parallel, resumable, verified.

    wmtp pull s3://models/7B_1T_4 --dest /models/base
    wmtp pull --spec pulls.yaml

A URI naming a prefix is mirrored into the destination with its relative layout (key `m/7B/a/b.bin` under
`s3://bucket/m/7B` becomes `DEST/a/b.bin`); a URI naming one object lands as `DEST/<its name>`. Several URIs may
share a destination as long as no two of them produce the same path.

The spec file, which the operator renders into the init container, is a YAML (or JSON) list of {uri, dest}:

    - {uri: s3://models/7B_1T_4, dest: /models/base}
    - {uri: s3://models/Starling-RM-7B-alpha, dest: /models/rm}
    - {uri: s3://datasets/mbpp/train.jsonl, dest: /models/data/mbpp}

Speed: objects larger than the part size are fetched as parallel byte ranges written in place into a
preallocated temporary file; all objects share one pool of `workers` threads and one (thread-safe) S3 client.

Idempotence: each destination keeps a completion marker (layout in `wmtp.pull.state`) recording every object's
key, size and ETag with the local file's mtime and digest. A rerun lists the sources and fetches only what is
new, changed in S3, missing, or modified locally (size or mtime differ); `--verify` also re-hashes every local
file against its recorded digest, which catches corruption that leaves size and mtime alone. A crash loses only
the files in flight: data is written under temporary names and renamed into place once complete and verified.

Concurrency: pullers on one destination take its lock in turn; the first downloads, the next find everything
in place and exit. A rerun on a complete destination does not need the lock at all.

Verification: sizes always; then the object's S3 additional checksum when it covers the whole object (SHA256,
SHA1 or CRC32), else the MD5 of a single-part ETag. A mismatch downloads the file once more, then fails.

Exit codes: 0 done; 1 transfer or verification failed; 2 bad arguments or spec; 3 bucket, key or prefix
missing; 4 access denied or no credentials; 5 S3 endpoint unreachable. An error is one line on stderr; success
prints one JSON line on stdout: {"files", "bytes", "seconds", "mb_per_s", "skipped", "skipped_bytes"}, where
files and bytes count what was fetched and skipped what was already in place.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from wmtp.config.documents import clip
from wmtp.contract import ExitCode
from wmtp.pull.fetch import Fetcher, Meter, MiB
from wmtp.pull.plan import Job, check_job, list_sources, load_spec, plan
from wmtp.pull.state import DestLock, DestState
from wmtp.storage import Location, ObjectInfo, Storage, StorageError, parse_uri

__all__ = ["Job", "MiB", "load_spec", "main", "pull"]

log = logging.getLogger(__name__)


def _pull_dest(
    storage: Storage, pool: ThreadPoolExecutor, meter: Meter, dest: Path, sources: list[Location], part_size: int,
    verify: bool,
) -> Counter[str]:  # fmt: skip
    objs: dict[str, ObjectInfo] = {}
    for loc in sources:
        for obj in list_sources(storage, loc):
            if objs.setdefault(obj.rel, obj) is not obj:
                raise StorageError(
                    f"{dest / obj.rel} would come from {objs[obj.rel].loc.uri} and {obj.loc.uri}", ExitCode.BAD_INPUT
                )
    state = DestState(dest)
    state.prepare()
    marker = state.marker()
    if marker["complete"] and not verify:
        keep, fetch = plan(objs, marker["files"], state.tree, adopt=False)
        if not fetch:
            return Counter(skipped=len(keep), skipped_bytes=sum(e["size"] for e in keep.values()))
    uris = [loc.uri for loc in sources]
    with DestLock(state.tree, state.lock_rel):
        keep, fetch = plan(objs, state.known(), state.tree, pool.map, rehash=verify)
        size = sum(obj.size for obj in fetch)
        log.info("%s: fetching %d files (%.2f GB), %d already in place", dest, len(fetch), size / 1e9, len(keep))
        state.begin(uris, keep)
        meter.start(str(dest), size)
        entries = Fetcher(storage.s3, pool, state, part_size, meter).run(fetch)
        state.commit(uris, {**keep, **entries})
    skipped_bytes = sum(e["size"] for e in keep.values())
    return Counter(files=len(fetch), bytes=size, skipped=len(keep), skipped_bytes=skipped_bytes)


def pull(
    jobs: list[Job], storage: Storage, *, workers: int = 16, part_size: int = 64 * MiB, verify: bool = False,
    progress: bool = False,
) -> dict[str, float]:  # fmt: skip
    """Run every job (grouped by destination, one after another) and return the summary."""
    started = time.monotonic()
    groups: dict[Path, list[Location]] = {}
    for job in jobs:
        check_job(job)
        try:
            src, dest = parse_uri(job.uri), parse_uri(job.dest)
        except ValueError as err:
            raise StorageError(str(err), ExitCode.BAD_INPUT) from err
        if not src.is_s3 or dest.is_s3:
            message = f"{job.uri} → {job.dest}: pull copies from s3:// into a local folder"
            raise StorageError(message, ExitCode.BAD_INPUT)
        groups.setdefault(Path(dest.path), []).append(src)
    totals: Counter[str] = Counter()
    meter = Meter(progress)
    with ThreadPoolExecutor(workers, thread_name_prefix="wmtp-pull") as pool, meter.bar:
        for dest, sources in groups.items():
            totals += _pull_dest(storage, pool, meter, dest, sources, part_size, verify)
    seconds = time.monotonic() - started
    return {
        "files": totals["files"],
        "bytes": totals["bytes"],
        "seconds": round(seconds, 3),
        "mb_per_s": round(totals["bytes"] / 1e6 / seconds, 1),
        "skipped": totals["skipped"],
        "skipped_bytes": totals["skipped_bytes"],
    }


def main(
    sources: list[str], dest: Path | None, spec: Path | None, *, workers: int, part_size_mb: int, verify: bool,
    endpoint_url: str | None, region: str | None,
) -> int:  # fmt: skip
    """`wmtp pull`: the summary on stdout, or one error line on stderr; returns the exit code."""
    from wmtp.config import S3Settings

    try:
        if spec is not None and not sources and dest is None:
            jobs = load_spec(spec)
        elif spec is None and sources and dest is not None:
            jobs = [Job(uri, str(dest)) for uri in sources]
        else:
            raise StorageError("give SRC_URI... with --dest DIR, or --spec FILE", ExitCode.BAD_INPUT)
        storage = Storage(S3Settings(endpoint_url=endpoint_url, region=region))
        summary = pull(jobs, storage, workers=workers, part_size=part_size_mb * MiB, verify=verify,
                       progress=sys.stderr.isatty())  # fmt: skip
    except StorageError as err:
        print(f"error: {clip(str(err))}", file=sys.stderr)
        return err.code
    except OSError as err:
        print(f"error: {clip(str(err))}", file=sys.stderr)
        return ExitCode.ERROR
    print(json.dumps(summary), flush=True)
    return 0
