"""What a parsed URI is (`Location`) and what a listing returns (`ObjectInfo`): plain values every backend shares.

A Location never says which store it lies in beyond its scheme; `wmtp.storage.Storage` turns the scheme into a
backend. Its `uri` is written the same way for every scheme, so a new backend needs nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """A resolved URI: a scheme, a path (a local absolute path, or a key) and, in an object store, its bucket."""

    scheme: str
    path: str
    bucket: str = ""

    @property
    def uri(self) -> str:
        # file:///abs/path (a path has no bucket); s3://bucket/key, and s3://bucket for the bucket itself.
        return f"{self.scheme}://{self.bucket}/{self.path}".rstrip("/") if self.bucket else f"{self.scheme}://{self.path}"

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __truediv__(self, name: str) -> Location:
        base = self.path.rstrip("/")
        return Location(self.scheme, f"{base}/{name}" if base else name, self.bucket)

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class ObjectInfo:
    """One file or object: where it is, its size and ETag ("" where the store has none), and its key relative to
    the URI it was listed under."""

    loc: Location
    size: int
    etag: str
    rel: str
