"""`wmtp pull`: copy models and datasets from S3 into local folders — parallel, resumable, verified.

    wmtp pull s3://models/7B_1T_4 --dest /models/base
    wmtp pull --spec pulls.yaml

A URI naming a prefix is mirrored into the destination with its relative layout (key `m/7B/a/b.bin` under
`s3://bucket/m/7B` becomes `DEST/a/b.bin`); a URI naming one object lands as `DEST/<its name>`. Several URIs may
share a destination as long as no two of them produce the same path.

The spec file, which the operator renders into the init container, is a YAML (or JSON) list of {uri, dest}:

    - {uri: s3://models/7B_1T_4, dest: /models/base, weights: rank0}
    - {uri: s3://models/Starling-RM-7B-alpha, dest: /models/rm, weights: rank0}
    - {uri: s3://datasets/mbpp/train.jsonl, dest: /models/data/mbpp}

Pull only what a pod reads: distributed, global rank 0 alone reads the weights. An entry with `weights: rank0`
(default `all`) has its weight files (`wmtp.contract.is_weight_file`: *.safetensors, *.bin, *.pth, ...) pulled
only by the puller of node rank 0; on any other node rank (`--node-rank`, default $NODE_RANK) only the config,
tokenizer and other small files land. Without a node rank, everything is pulled.

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
prints one JSON line on stdout: {"files", "bytes", "seconds", "mb_per_s", "skipped", "skipped_bytes",
"rank0_only", "rank0_only_bytes"}, where files and bytes count what was fetched, skipped what was already in
place, and rank0_only the weight files this node rank left to rank 0.
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
from wmtp.storage.s3 import S3Backend

__all__ = ["Job", "MiB", "load_spec", "main", "pull"]

log = logging.getLogger(__name__)


def _list(
    s3: S3Backend, dest: Path, sources: list[tuple[Location, Job]], node_rank: int | None
) -> tuple[dict[str, ObjectInfo], dict[str, ObjectInfo]]:
    """(objects to have in `dest`, objects this node rank leaves to rank 0), by relative path."""
    objs: dict[str, ObjectInfo] = {}
    left: dict[str, ObjectInfo] = {}
    for loc, job in sources:
        for obj in list_sources(s3, loc):
            seen = objs.get(obj.rel) or left.get(obj.rel)
            if seen is not None:
                raise StorageError(
                    f"{dest / obj.rel} would come from {seen.loc.uri} and {obj.loc.uri}", ExitCode.BAD_INPUT
                )
            (left if job.leaves_out(obj.rel, node_rank) else objs)[obj.rel] = obj
    if left:
        size = sum(obj.size for obj in left.values())
        log.info("%s: node rank %s leaves %d weight files (%.2f GB) to rank 0", dest, node_rank, len(left), size / 1e9)
    return objs, left


def _pull_dest(
    s3: S3Backend, pool: ThreadPoolExecutor, meter: Meter, dest: Path, sources: list[tuple[Location, Job]],
    part_size: int, verify: bool, node_rank: int | None,
) -> Counter[str]:  # fmt: skip
    objs, left = _list(s3, dest, sources, node_rank)
    left_out = Counter(rank0_only=len(left), rank0_only_bytes=sum(obj.size for obj in left.values()))
    state = DestState(dest)
    state.prepare()
    marker = state.marker()
    if marker["complete"] and not verify:
        keep, fetch = plan(objs, marker["files"], state.tree, adopt=False)
        if not fetch:
            return left_out + Counter(skipped=len(keep), skipped_bytes=sum(e["size"] for e in keep.values()))
    uris = [loc.uri for loc, _ in sources]
    with DestLock(state.tree, state.lock_rel):
        known = state.known()
        keep, fetch = plan(objs, known, state.tree, pool.map, rehash=verify)
        # On a shared volume another puller may have fetched what this one leaves out: its records stay, so the
        # next full pull finds those files in place instead of hashing or fetching them again.
        others = plan(left, known, state.tree, adopt=False)[0]
        size = sum(obj.size for obj in fetch)
        log.info("%s: fetching %d files (%.2f GB), %d already in place", dest, len(fetch), size / 1e9, len(keep))
        state.begin(uris, {**others, **keep})
        meter.start(str(dest), size)
        entries = Fetcher(s3.client, pool, state, part_size, meter).run(fetch)
        state.commit(uris, {**others, **keep, **entries})
    skipped_bytes = sum(e["size"] for e in keep.values())
    return left_out + Counter(files=len(fetch), bytes=size, skipped=len(keep), skipped_bytes=skipped_bytes)


def pull(
    jobs: list[Job], storage: Storage, *, workers: int = 16, part_size: int = 64 * MiB, verify: bool = False,
    progress: bool = False, node_rank: int | None = None,
) -> dict[str, float]:  # fmt: skip
    """Run every job (grouped by destination, one after another) and return the summary. On a `node_rank` other
    than 0, the weight files of jobs marked PULL_WEIGHTS_RANK0 are left out (counted as rank0_only)."""
    started = time.monotonic()
    groups: dict[Path, tuple[S3Backend, list[tuple[Location, Job]]]] = {}
    for job in jobs:
        check_job(job)
        try:
            src, dest = parse_uri(job.uri), parse_uri(job.dest)
        except ValueError as err:
            raise StorageError(str(err), ExitCode.BAD_INPUT) from err
        # The fetcher speaks S3's own API (ranged GETs pinned by ETag, S3's checksums) and writes to this machine.
        s3, folder = storage.backend(src), storage.local_path(dest)
        if not isinstance(s3, S3Backend) or folder is None:
            message = f"{job.uri} → {job.dest}: pull copies from s3:// into a local folder"
            raise StorageError(message, ExitCode.BAD_INPUT)
        groups.setdefault(folder, (s3, []))[1].append((src, job))
    totals: Counter[str] = Counter()
    meter = Meter(progress)
    with ThreadPoolExecutor(workers, thread_name_prefix="wmtp-pull") as pool, meter.bar:
        for dest, (s3, sources) in groups.items():
            totals += _pull_dest(s3, pool, meter, dest, sources, part_size, verify, node_rank)
    seconds = time.monotonic() - started
    return {
        "files": totals["files"],
        "bytes": totals["bytes"],
        "seconds": round(seconds, 3),
        "mb_per_s": round(totals["bytes"] / 1e6 / seconds, 1),
        "skipped": totals["skipped"],
        "skipped_bytes": totals["skipped_bytes"],
        "rank0_only": totals["rank0_only"],
        "rank0_only_bytes": totals["rank0_only_bytes"],
    }


def main(
    sources: list[str], dest: Path | None, spec: Path | None, *, workers: int, part_size_mb: int, verify: bool,
    endpoint_url: str | None, region: str | None, node_rank: int | None = None,
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
        storage = Storage(s3=S3Settings(endpoint_url=endpoint_url, region=region))
        summary = pull(jobs, storage, workers=workers, part_size=part_size_mb * MiB, verify=verify,
                       progress=sys.stderr.isatty(), node_rank=node_rank)  # fmt: skip
    except StorageError as err:
        print(f"error: {clip(str(err))}", file=sys.stderr)
        return err.code
    except OSError as err:
        print(f"error: {clip(str(err))}", file=sys.stderr)
        return ExitCode.ERROR
    print(json.dumps(summary), flush=True)
    return 0
