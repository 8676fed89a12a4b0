"""What a pull has to do: the spec's jobs, the objects each source names, and which of them are already in place."""

from __future__ import annotations

import logging
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wmtp.config import uris
from wmtp.config.documents import ConfigError, clip, parse_yaml
from wmtp.contract import PULL_WEIGHTS, PULL_WEIGHTS_ALL, PULL_WEIGHTS_RANK0, ExitCode, is_weight_file
from wmtp.pull.state import STATE_DIR, digest
from wmtp.storage import Backend, LocalTree, Location, ObjectInfo, StorageError, UnsafePath, safe_relative

log = logging.getLogger(__name__)
MAX_NAME_BYTES = 255  # of one file name on every local file system the puller writes to
_SOURCE = re.compile(uris.S3_ROOT)
_DEST = re.compile(f"{uris.ABSOLUTE}|{uris.RELATIVE}")


@dataclass(frozen=True)
class Job:
    """Copy what `uri` names (a prefix or one object) into the folder `dest`; with `weights` PULL_WEIGHTS_RANK0,
    its weight files (`contract.is_weight_file`) only on node rank 0."""

    uri: str
    dest: str
    weights: str = PULL_WEIGHTS_ALL

    def leaves_out(self, rel: str, node_rank: int | None) -> bool:
        """Whether the puller on `node_rank` (None: unknown) leaves the file `rel` to rank 0."""
        return self.weights == PULL_WEIGHTS_RANK0 and node_rank not in (None, 0) and is_weight_file(rel)


_REQUIRED, _OPTIONAL = {"uri", "dest"}, {PULL_WEIGHTS: (PULL_WEIGHTS_ALL, PULL_WEIGHTS_RANK0)}


def load_spec(path: Path) -> list[Job]:
    """The `--spec` file: a YAML or JSON list of {uri, dest} mappings, each with an optional `weights`."""
    try:
        items = parse_yaml(path.read_bytes(), source=str(path))
    except OSError as err:
        raise StorageError(f"cannot read the spec {path}: {err.strerror}", ExitCode.BAD_INPUT) from err
    except ConfigError as err:
        raise StorageError(str(err), ExitCode.BAD_INPUT) from err
    if not (isinstance(items, list) and items and all(_is_job(item) for item in items)):
        weights = f"{PULL_WEIGHTS}: {' | '.join(_OPTIONAL[PULL_WEIGHTS])}"
        message = f"{path}: expected a non-empty list of {{uri, dest}} mappings (each may add {weights})"
        raise StorageError(message, ExitCode.BAD_INPUT)
    return [Job(**item) for item in items]


def _is_job(item: object) -> bool:
    return (
        isinstance(item, dict)
        and _REQUIRED <= set(item) <= _REQUIRED | set(_OPTIONAL)
        and all(isinstance(item[key], str) for key in _REQUIRED)
        and all(item[key] in allowed for key, allowed in _OPTIONAL.items() if key in item)
    )


def check_job(job: Job) -> None:
    """A job the puller can do: an s3:// source (a valid bucket, no `..` key segment) and a local folder (no `..`,
    no `~user` of nobody, no name longer than a file system takes); StorageError (bad input) otherwise."""
    if not _SOURCE.fullmatch(job.uri):
        raise StorageError(
            f"{clip(job.uri, 200)!r}: pull copies from s3://bucket[/prefix] (no `..`)", ExitCode.BAD_INPUT
        )
    if not _DEST.fullmatch(job.dest) or not _short_names(job.dest):
        raise StorageError(f"{clip(job.dest, 200)!r}: not a local folder to pull into", ExitCode.BAD_INPUT)
    try:
        Path(job.dest).expanduser()
    except RuntimeError as err:  # ~user of a user that does not exist
        raise StorageError(f"{clip(job.dest, 200)!r}: {err}", ExitCode.BAD_INPUT) from None


def _short_names(path: str) -> bool:
    return all(len(part.encode()) <= MAX_NAME_BYTES for part in path.split("/"))


def list_sources(store: Backend, loc: Location) -> list[ObjectInfo]:
    """The objects a URI names, each with the path it takes under the destination."""
    found = store.objects(loc)
    if not found:
        raise store.missing(loc.uri)
    return [ObjectInfo(o.loc, o.size, o.etag, _relative(o.rel, loc)) for o in found]


def _relative(rel: str, loc: Location) -> str:
    safe_relative(rel, loc.uri)
    if not _short_names(rel):
        raise UnsafePath(f"{loc.uri}: key {clip(rel, 200)!r} has a name longer than {MAX_NAME_BYTES} bytes")
    if rel.split("/")[0] == STATE_DIR:
        raise UnsafePath(f"{loc.uri}: key {rel!r} would land in the puller's own state folder {STATE_DIR}/")
    return rel


def _listed(obj: ObjectInfo) -> dict[str, Any]:
    return {"bucket": obj.loc.bucket, "key": obj.loc.path, "size": obj.size, "etag": obj.etag}


def _unchanged(entry: dict[str, Any] | None, obj: ObjectInfo, tree: LocalTree) -> bool:
    if entry is None or any(entry.get(k) != v for k, v in _listed(obj).items()):
        return False
    found = tree.lstat(obj.rel)  # a link in a file's place is never trusted: it is fetched again and replaced
    return (
        found is not None
        and stat.S_ISREG(found.st_mode)
        and found.st_size == obj.size
        and found.st_mtime_ns == entry.get("mtime_ns")
    )


def _adoptable(obj: ObjectInfo, tree: LocalTree) -> bool:
    """A file in place without a trusted record, which its single-part ETag (an MD5) can vouch for."""
    found = tree.lstat(obj.rel)
    etag = obj.etag.strip('"')
    return (
        found is not None
        and stat.S_ISREG(found.st_mode)
        and found.st_size == obj.size
        and re.fullmatch(r"[0-9a-f]{32}", etag) is not None
    )


def plan(
    objs: dict[str, ObjectInfo],
    known: dict[str, dict[str, Any]],
    tree: LocalTree,
    hash_map: Callable[..., Any] = map,
    *,
    rehash: bool = False,
    adopt: bool = True,
) -> tuple[dict[str, dict[str, Any]], list[ObjectInfo]]:
    """(entries of the files already in place, objects to fetch); files are hashed through `hash_map` (a pool's).

    `rehash` re-hashes the recorded files too. With `adopt`, files in place without a trusted
    record (a first pull onto a copy, or state that was ignored) are hashed when their ETag is an MD5 and kept
    if it matches, so losing the state costs a read of the destination rather than a download.
    """
    keep = {rel: known[rel] for rel, obj in objs.items() if _unchanged(known.get(rel), obj, tree)}
    check = {rel: keep[rel]["digest"]["algo"] for rel in keep} if rehash else {}
    adopt_rels = [rel for rel, obj in objs.items() if adopt and rel not in keep and _adoptable(obj, tree)]
    check.update({rel: "md5" for rel in adopt_rels})
    values = dict(zip(check, hash_map(lambda rel: _digest_or_none(tree, rel, check[rel]), list(check)), strict=True))
    for rel in adopt_rels:
        found = tree.lstat(rel)
        if found is not None and values[rel] == objs[rel].etag.strip('"'):
            md5 = {"algo": "md5", "value": values[rel]}
            keep[rel] = {**_listed(objs[rel]), "mtime_ns": found.st_mtime_ns, "digest": md5, "verified": True}
    for rel in list(keep):
        if rel in check and rel not in adopt_rels and values[rel] != keep[rel]["digest"]["value"]:
            log.warning("%s does not match its recorded %s; fetching it again", tree.root / rel, check[rel])
            del keep[rel]
    return keep, [obj for rel, obj in sorted(objs.items()) if rel not in keep]


def _digest_or_none(tree: LocalTree, rel: str, algo: str) -> str | None:
    try:
        return digest(tree, rel, algo)
    except OSError:  # gone or unreadable since it was listed: fetch it
        return None
