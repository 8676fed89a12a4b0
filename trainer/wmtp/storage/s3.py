"""The `s3` backend: s3://bucket/key URIs on AWS S3 or any S3-compatible endpoint (MinIO, moto).

There are no folders in S3: a "folder" is a key prefix, which exists while something is under it, and the
zero-byte "folder/" markers consoles make hold nothing. Any S3 failure the user has to act on becomes one
`StorageError` naming the URI, classified by `describe_error`. The boto3 client is made on first use, once, from
the config's s3 section and the standard AWS chain; boto3 itself is imported only then (the operator imports
this package through the config models and ships no boto3).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from wmtp.contract import ExitCode
from wmtp.storage.backend import files_to_upload
from wmtp.storage.errors import StorageError, describe_error, error_code
from wmtp.storage.local import LocalTree, safe_relative
from wmtp.storage.location import Location, ObjectInfo

PART_SIZE = 64 * 2**20  # multipart upload part; S3 wants at least 5 MiB for every part but the last


class S3Options(Protocol):
    """The config's s3 section as the storage layer reads it (`wmtp.config.S3Settings`)."""

    endpoint_url: str | None
    region: str | None
    access_key_id: Any
    secret_access_key: Any


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


class S3Upload:
    """A multipart upload fed part by part (a single PUT when the object is smaller than one part)."""

    def __init__(self, client: Any, location: Location, part_size: int = PART_SIZE) -> None:
        self._client, self._part_size = client, part_size
        self._where = {"Bucket": location.bucket, "Key": location.path}
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    def write(self, data: memoryview) -> None:
        self._buffer += data
        while len(self._buffer) >= self._part_size:
            self._send(bytes(self._buffer[: self._part_size]))
            del self._buffer[: self._part_size]

    def _send(self, part: bytes) -> None:
        if self._upload_id is None:
            self._upload_id = self._client.create_multipart_upload(**self._where)["UploadId"]
        number = len(self._parts) + 1
        answer = self._client.upload_part(**self._where, UploadId=self._upload_id, PartNumber=number, Body=part)
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    def finish(self) -> None:
        if self._upload_id is None:
            self._client.put_object(**self._where, Body=bytes(self._buffer))
            return
        if self._buffer:
            self._send(bytes(self._buffer))
        self._client.complete_multipart_upload(
            **self._where, UploadId=self._upload_id, MultipartUpload={"Parts": self._parts}
        )

    def abort(self) -> None:
        if self._upload_id is not None:
            self._client.abort_multipart_upload(**self._where, UploadId=self._upload_id)


class S3Backend:
    """Buckets and keys through one boto3 client (thread-safe, shared by every caller of this backend)."""

    def __init__(self, settings: S3Options | None = None, client: Any = None) -> None:
        self._settings = settings
        self._client: Any = client

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                self._client = make_s3_client(self._settings)
            except ValueError as err:  # botocore: "Invalid endpoint: ..."
                raise StorageError(f"s3.endpoint_url: {err}", ExitCode.BAD_INPUT) from None
        return self._client

    @staticmethod
    def parse(rest: str, uri: str) -> Location:
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"{uri!r}: an s3 URI needs a bucket, as in s3://bucket/key")
        return Location("s3", key.strip("/"), bucket)

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
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    def objects(self, loc: Location) -> list[ObjectInfo]:
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
            head = self.client.head_object(Bucket=loc.bucket, Key=loc.path)
        except (BotoCoreError, ClientError) as err:
            if describe_error(err, loc.uri).code == ExitCode.NOT_FOUND and error_code(err) != "NoSuchBucket":
                return []
            raise describe_error(err, loc.uri) from err
        return [ObjectInfo(loc, head["ContentLength"], head["ETag"], loc.name)]

    def exists(self, loc: Location) -> bool:
        if self.is_file(loc):
            return True
        with self._reported(loc):
            return next(self._keys(loc), None) is not None

    def is_file(self, loc: Location) -> bool:
        if not loc.path:  # a bucket
            return False
        from botocore.exceptions import ClientError

        with self._reported(loc):
            try:
                self.client.head_object(Bucket=loc.bucket, Key=loc.path)
                return True
            except ClientError as err:
                if error_code(err) in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

    def list_dir(self, loc: Location) -> list[str]:
        prefix = loc.path.rstrip("/") + "/" if loc.path else ""
        names: set[str] = set()
        with self._reported(loc):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=loc.bucket, Prefix=prefix, Delimiter="/"
            )
            for page in pages:
                names.update(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
                names.update(o["Key"][len(prefix) :] for o in page.get("Contents", []))
        return sorted(n for n in names if n)

    def size(self, loc: Location) -> int:
        with self._reported(loc):
            if self.is_file(loc):
                return self.client.head_object(Bucket=loc.bucket, Key=loc.path)["ContentLength"]
            return sum(o["Size"] for o in self._keys(loc))

    def read_bytes(self, loc: Location) -> bytes:
        with self._reported(loc):
            return self.client.get_object(Bucket=loc.bucket, Key=loc.path)["Body"].read()

    def read_range(self, loc: Location, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(
                Bucket=loc.bucket, Key=loc.path, Range=f"bytes={offset}-{offset + length - 1}"
            )["Body"].read()
        except ClientError as err:
            if error_code(err) == "InvalidRange":  # at or past the end
                return b""
            raise

    def write_bytes(self, loc: Location, data: bytes) -> None:
        with self._reported(loc):  # a PUT is atomic already
            self.client.put_object(Bucket=loc.bucket, Key=loc.path, Body=data)

    def open_writer(self, loc: Location) -> S3Upload:
        return S3Upload(self.client, loc)

    def rename(self, old: Location, new: Location) -> None:
        source = {"Bucket": old.bucket, "Key": old.path}
        self.client.copy_object(Bucket=new.bucket, Key=new.path, CopySource=source)
        self.client.delete_object(**source)

    def delete(self, loc: Location) -> None:
        with self._reported(loc):
            keys = [{"Key": o["Key"]} for o in self._keys(loc)]
            if self.is_file(loc):
                keys.append({"Key": loc.path})
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(Bucket=loc.bucket, Delete={"Objects": keys[i : i + 1000], "Quiet": True})

    def download(self, loc: Location, dest: Path) -> Path:
        with self._reported(loc):
            if self.is_file(loc):
                fetch = self._fetcher(loc.bucket, loc.path)
                LocalTree(dest.parent).write_atomic(safe_relative(dest.name, loc.uri), fetch)
                return dest
            prefix = loc.path.rstrip("/") + "/" if loc.path else ""
            keys = [o["Key"] for o in self._keys(loc) if not o["Key"].endswith("/")]  # "folder" markers hold nothing
            if not keys:
                raise self.missing(loc.uri)
            rels = [safe_relative(key[len(prefix) :], loc.uri) for key in keys]  # all checked before any write
            tree = LocalTree(dest)
            for key, rel in zip(keys, rels, strict=True):
                tree.write_atomic(rel, self._fetcher(loc.bucket, key))
        return dest

    def _fetcher(self, bucket: str, key: str) -> Callable[[Any], object]:
        return lambda f: self.client.download_fileobj(bucket, key, f)

    def upload(self, src: Path, loc: Location) -> None:
        for file, target in files_to_upload(src, loc):
            with self._reported(target):
                self.client.upload_file(str(file), target.bucket, target.path)

    @contextlib.contextmanager
    def local_copy(self, loc: Location) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="wmtp-") as tmp:
            yield self.download(loc, Path(tmp) / safe_relative(loc.name or "root", loc.uri))

    @contextlib.contextmanager
    def local_folder(self, loc: Location) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="wmtp-upload-") as tmp:
            yield Path(tmp)
            self.upload(Path(tmp), loc)

    def local_path(self, loc: Location) -> Path | None:
        return None

    def missing(self, shown: str) -> StorageError:
        return StorageError(f"{shown}: no such object or prefix", ExitCode.NOT_FOUND)
