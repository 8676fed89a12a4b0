"""What a pull has to do: the spec's jobs, the objects each source names, and which of them are already in place."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wmtp.config.documents import ConfigError, parse_yaml
from wmtp.contract import ExitCode
from wmtp.pull.state import STATE_DIR, digest
from wmtp.storage import Location, ObjectInfo, Storage, StorageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """Copy what `uri` names (a prefix or one object) into the folder `dest`."""

    uri: str
    dest: str


def load_spec(path: Path) -> list[Job]:
    """The `--spec` file: a YAML or JSON list of {uri, dest} mappings."""
    try:
        items = parse_yaml(path.read_bytes(), str(path))
    except OSError as err:
        raise StorageError(f"cannot read the spec {path}: {err.strerror}", ExitCode.BAD_INPUT) from err
    except ConfigError as err:
        raise StorageError(str(err), ExitCode.BAD_INPUT) from err
    if not (isinstance(items, list) and items and all(_is_job(item) for item in items)):
        raise StorageError(f"{path}: expected a non-empty list of {{uri, dest}} mappings", ExitCode.BAD_INPUT)
    return [Job(item["uri"], item["dest"]) for item in items]


def _is_job(item: object) -> bool:
    return isinstance(item, dict) and set(item) == {"uri", "dest"} and all(isinstance(v, str) for v in item.values())


def list_sources(storage: Storage, loc: Location) -> list[ObjectInfo]:
    """The objects a URI names, each with the path it takes under the destination."""
    found = storage.objects(loc)
    if not found:
        raise StorageError(f"{loc.uri}: no such object or prefix", ExitCode.NOT_FOUND)
    return [ObjectInfo(o.loc, o.size, o.etag, _relative(o.rel, loc)) for o in found]


def _relative(rel: str, loc: Location) -> str:
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts) or parts[0] == STATE_DIR:
        raise StorageError(f"{loc.uri}: key {rel!r} does not map to a path inside the destination")
    return rel


def _unchanged(entry: dict[str, Any] | None, obj: ObjectInfo, dest: Path) -> bool:
    listed = {"bucket": obj.loc.bucket, "key": obj.loc.path, "size": obj.size, "etag": obj.etag}
    if entry is None or any(entry.get(k) != v for k, v in listed.items()):
        return False
    try:
        stat = (dest / obj.rel).stat()
    except OSError:
        return False
    return stat.st_size == obj.size and stat.st_mtime_ns == entry.get("mtime_ns")


def plan(
    objs: dict[str, ObjectInfo],
    known: dict[str, dict[str, Any]],
    dest: Path,
    rehash: Callable[..., Any] | None = None,
) -> tuple[dict[str, dict[str, Any]], list[ObjectInfo]]:
    """(entries of the files already in place, objects to fetch); `rehash` (a pool's map) re-hashes the former."""
    keep = {rel: known[rel] for rel, obj in objs.items() if _unchanged(known.get(rel), obj, dest)}
    if rehash is not None:
        intact = list(rehash(lambda rel: digest(dest / rel, keep[rel]["digest"]["algo"]), list(keep)))
        for (rel, entry), value in zip(list(keep.items()), intact, strict=True):
            if value != entry["digest"]["value"]:
                log.warning("%s does not match its recorded %s; fetching it again", dest / rel, entry["digest"]["algo"])
                del keep[rel]
    return keep, [obj for rel, obj in sorted(objs.items()) if rel not in keep]
