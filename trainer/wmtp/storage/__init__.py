"""One resolver for every URI the project reads or writes (plain paths, file:// and s3://), and the one S3 layer.

`parse_uri` is the only place a URI is taken apart; `Storage` reads, lists, writes (atomically) and deletes
through it, so the puller, the model and data loaders and the checkpoint store behave the same on disk and on
S3. `describe_error` turns any S3 failure into one `StorageError` line with the exit code that classifies it.
`LocalTree` is the one way from a remote key to a local file: it refuses keys that would leave its root and
never follows a symbolic link below it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from wmtp.contract import ExitCode
from wmtp.storage.errors import StorageError, UnsafePath, describe_error, error_code, is_transient
from wmtp.storage.local import LocalTree, safe_relative

__all__ = [
    "SCHEMES",
    "LocalTree",
    "Location",
    "ObjectInfo",
    "S3Options",
    "Storage",
    "StorageError",
    "UnsafePath",
    "describe_error",
    "error_code",
    "is_transient",
    "make_s3_client",
    "parse_uri",
    "safe_relative",
]

SCHEMES = ("file", "s3")


@dataclass(frozen=True)
class Location:
    """A resolved URI: a local absolute path (scheme file) or a bucket and key (scheme s3)."""

    scheme: str
    path: str
    bucket: str = ""

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.path}".rstrip("/") if self.is_s3 else f"file://{self.path}"

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __truediv__(self, name: str) -> Location:
        base = self.path.rstrip("/")
        return Location(self.scheme, f"{base}/{name}" if base else name, self.bucket)

    def __str__(self) -> str:
        return self.uri


def parse_uri(uri: str | os.PathLike[str]) -> Location:
    """`s3://bucket/key`, `file:///abs/path` or a plain (relative or absolute) path."""
    text = os.fspath(uri)
    if "://" not in text:
        return Location("file", str(Path(text).expanduser().resolve()))
    scheme, rest = text.split("://", 1)
    if scheme == "file":
        return Location("file", str(Path(rest).expanduser().resolve()))
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"{text!r}: an s3 URI needs a bucket, as in s3://bucket/key")
        return Location("s3", key.strip("/"), bucket)
    raise ValueError(f"{text!r}: unknown URI scheme {scheme!r}; use a path, file:// or s3://")


class S3Options(Protocol):
    """The config's s3 section as the storage layer reads it (`wmtp.config.S3Settings`)."""

    endpoint_url: str | None
    region: str | None
    access_key_id: Any
    secret_access_key: Any


@dataclass(frozen=True)
class ObjectInfo:
    """One S3 object: where it is, its size and ETag, and its key relative to the URI it was listed under."""

    loc: Location
    size: int
    etag: str
    rel: str


def make_s3_client(settings: S3Options | None = None) -> Any:
    """A boto3 client from the config, falling back to the standard AWS chain for anything unset."""
    import boto3
    from botocore.config import Config as BotoConfig

    kwargs: dict[str, Any] = {}
    if settings is not None:
        if settings.endpoint_url:
            kwargs["endpoint_url"] = settings.endpoint_url
        if settings.region:
            kwargs["region_name"] = settings.region
        if settings.access_key_id and settings.secret_access_key:
            kwargs["aws_access_key_id"] = settings.access_key_id.get_secret_value()
            kwargs["aws_secret_access_key"] = settings.secret_access_key.get_secret_value()
    # "standard" retries back off exponentially with jitter on throttling and 5xx.
    retry = BotoConfig(retries={"max_attempts": 8, "mode": "standard"}, max_pool_connections=32)
    return boto3.client("s3", config=retry, **kwargs)


class Storage:
    """File and S3 operations behind one interface; S3 clients are created lazily, once."""

    def __init__(self, s3: S3Options | None = None, client: Any = None) -> None:
        self._s3_settings = s3
        self._client: Any = client

    @property
    def s3(self) -> Any:
        if self._client is None:
            try:
                self._client = make_s3_client(self._s3_settings)
            except ValueError as err:  # botocore: "Invalid endpoint: ..."
                raise StorageError(f"s3.endpoint_url: {err}", ExitCode.BAD_INPUT) from None
        return self._client

    @contextlib.contextmanager
    def _reported(self, loc: Location) -> Iterator[None]:
        """Any S3 failure inside as one `StorageError` naming `loc`, classified by its exit code."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError, Boto3Error) as err:
            raise describe_error(err, loc.uri) from err

    def _keys(self, loc: Location) -> Iterator[dict[str, Any]]:
        prefix = loc.path.rstrip("/") + "/" if loc.path else ""
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    def objects(self, loc: Location) -> list[ObjectInfo]:
        """The objects an s3 URI names: everything under it as a prefix, else the one object it names; [] if
        neither exists. Failures raise `StorageError`."""
        from botocore.exceptions import BotoCoreError, ClientError

        prefix = f"{loc.path}/" if loc.path else ""
        try:
            found = [
                ObjectInfo(Location("s3", o["Key"], loc.bucket), o["Size"], o["ETag"], o["Key"][len(prefix) :])
                for o in self._keys(loc)
                if not o["Key"].endswith("/")  # zero-byte "folder" markers made by consoles
            ]
        except ClientError as err:
            # A role with s3:GetObject but not s3:ListBucket may still read a single object.
            if not (loc.path and describe_error(err, loc.uri).code == ExitCode.DENIED):
                raise describe_error(err, loc.uri) from err
            found = []
        except BotoCoreError as err:
            raise describe_error(err, loc.uri) from err
        if found or not loc.path:
            return found
        try:
            head = self.s3.head_object(Bucket=loc.bucket, Key=loc.path)
        except (BotoCoreError, ClientError) as err:
            if describe_error(err, loc.uri).code == ExitCode.NOT_FOUND and error_code(err) != "NoSuchBucket":
                return []
            raise describe_error(err, loc.uri) from err
        return [ObjectInfo(loc, head["ContentLength"], head["ETag"], loc.name)]

    def exists(self, loc: Location) -> bool:
        if not loc.is_s3:
            return Path(loc.path).exists()
        if self.is_file(loc):
            return True
        with self._reported(loc):
            return next(self._keys(loc), None) is not None

    def is_file(self, loc: Location) -> bool:
        if not loc.is_s3:
            return Path(loc.path).is_file()
        if not loc.path:  # a bucket
            return False
        from botocore.exceptions import ClientError

        with self._reported(loc):
            try:
                self.s3.head_object(Bucket=loc.bucket, Key=loc.path)
                return True
            except ClientError as err:
                if error_code(err) in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

    def list_dir(self, loc: Location) -> list[str]:
        """Names of the immediate children (files and sub-folders), sorted; empty if nothing is there."""
        if not loc.is_s3:
            path = Path(loc.path)
            return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        prefix = loc.path.rstrip("/") + "/" if loc.path else ""
        names: set[str] = set()
        with self._reported(loc):
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                names.update(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
                names.update(o["Key"][len(prefix) :] for o in page.get("Contents", []))
        return sorted(n for n in names if n)

    def size(self, loc: Location) -> int:
        """Total bytes under a file or folder."""
        if not loc.is_s3:
            path = Path(loc.path)
            if path.is_file():
                return path.stat().st_size
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        with self._reported(loc):
            if self.is_file(loc):
                return self.s3.head_object(Bucket=loc.bucket, Key=loc.path)["ContentLength"]
            return sum(o["Size"] for o in self._keys(loc))

    def read_bytes(self, loc: Location) -> bytes:
        if not loc.is_s3:
            return Path(loc.path).read_bytes()
        with self._reported(loc):
            return self.s3.get_object(Bucket=loc.bucket, Key=loc.path)["Body"].read()

    def write_bytes(self, loc: Location, data: bytes) -> None:
        """Readers see the old content or the new, never a partial file (S3 PUTs are atomic already)."""
        if loc.is_s3:
            with self._reported(loc):
                self.s3.put_object(Bucket=loc.bucket, Key=loc.path, Body=data)
            return
        path = Path(loc.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def delete(self, loc: Location) -> None:
        """Remove a file or a whole folder; absent is fine."""
        if not loc.is_s3:
            path = Path(loc.path)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            return
        with self._reported(loc):
            keys = [{"Key": o["Key"]} for o in self._keys(loc)]
            if self.is_file(loc):
                keys.append({"Key": loc.path})
            for i in range(0, len(keys), 1000):
                self.s3.delete_objects(Bucket=loc.bucket, Delete={"Objects": keys[i : i + 1000], "Quiet": True})

    def download(self, loc: Location, dest: Path) -> Path:
        """Copy a file or folder to the local path `dest` (a folder is mirrored with its layout). An S3 key that
        would land outside `dest` is refused (`UnsafePath`), and no link below `dest` is ever followed."""
        if not loc.is_s3:
            src = Path(loc.path)
            if src.is_dir():
                shutil.copytree(src, dest, dirs_exist_ok=True)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)
            return dest
        with self._reported(loc):
            if self.is_file(loc):
                fetch = self._fetcher(loc.bucket, loc.path)
                LocalTree(dest.parent).write_atomic(safe_relative(dest.name, loc.uri), fetch)
                return dest
            prefix = loc.path.rstrip("/") + "/" if loc.path else ""
            keys = [o["Key"] for o in self._keys(loc) if not o["Key"].endswith("/")]  # "folder" markers hold nothing
            if not keys:
                raise StorageError(f"{loc.uri}: no such object or prefix", ExitCode.NOT_FOUND)
            rels = [safe_relative(key[len(prefix) :], loc.uri) for key in keys]  # all checked before any write
            tree = LocalTree(dest)
            for key, rel in zip(keys, rels, strict=True):
                tree.write_atomic(rel, self._fetcher(loc.bucket, key))
        return dest

    def _fetcher(self, bucket: str, key: str) -> Callable[[Any], object]:
        return lambda f: self.s3.download_fileobj(bucket, key, f)

    def upload(self, src: Path, loc: Location) -> None:
        """Copy a local file or folder to `loc`."""
        files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
        for file in files:
            target = loc if src.is_file() else loc / file.relative_to(src).as_posix()
            if target.is_s3:
                with self._reported(target):
                    self.s3.upload_file(str(file), target.bucket, target.path)
            else:
                Path(target.path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target.path)

    @contextlib.contextmanager
    def local_copy(self, loc: Location) -> Iterator[Path]:
        """A local path for `loc`: the path itself on disk, or a temporary download removed afterwards. Nothing
        there is one `StorageError` naming `loc` (not a later failure of whatever reads the path)."""
        if not loc.is_s3:
            if not Path(loc.path).exists():
                raise StorageError(f"{loc.uri}: no such file or folder", ExitCode.BAD_INPUT)
            yield Path(loc.path)
            return
        with tempfile.TemporaryDirectory(prefix="wmtp-") as tmp:
            yield self.download(loc, Path(tmp) / safe_relative(loc.name or "root", loc.uri))

    def probe(self, root: Location) -> None:
        """Write and delete a small object under `root`: a `StorageError` (or OSError) now, where a checkpoint
        could not be saved there later."""
        probe = root / f".wmtp-probe-{uuid.uuid4().hex}"
        self.write_bytes(probe, b"wmtp write probe\n")
        self.delete(probe)
