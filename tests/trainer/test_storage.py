"""`wmtp.storage`: the one safe way from a remote key to a local path, and downloads through it (moto S3)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from wmtp.contract import ExitCode
from wmtp.storage import BACKENDS, Backend, LocalTree, Location, Storage, UnsafePath, parse_uri, safe_relative


def files_in(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/a/b/", Location("s3", "a/b", "bucket")),
        ("s3://bucket", Location("s3", "", "bucket")),
        ("file:///x/y", Location("file", "/x/y")),
        ("/x/./y", Location("file", "/x/y")),
    ],
)
def test_parse_uri_hands_the_rest_of_a_uri_to_its_schemes_backend(uri: str, expected: Location) -> None:
    assert parse_uri(uri) == expected
    assert parse_uri(expected.uri) == expected  # a Location's URI reads back as the same Location


def test_parse_uri_refuses_an_unknown_scheme_and_an_s3_uri_without_a_bucket() -> None:
    with pytest.raises(ValueError, match="unknown URI scheme 'gs'; use a path, file:// or s3://"):
        parse_uri("gs://bucket/key")
    with pytest.raises(ValueError, match="needs a bucket"):
        parse_uri("s3:///key")


def test_every_registered_backend_implements_the_whole_protocol() -> None:
    protocol = {name for name in vars(Backend) if not name.startswith("_")}
    for scheme, backend in BACKENDS.items():
        assert protocol <= set(dir(backend)), f"{scheme}: lacks {sorted(protocol - set(dir(backend)))}"


class MemoryBackend:
    """The smallest backend a test needs: bytes in a dict, its settings kept to show they arrive."""

    def __init__(self, settings: Any = None) -> None:
        self.settings, self.blobs = settings, {}

    @staticmethod
    def parse(rest: str, uri: str) -> Location:
        bucket, _, key = rest.partition("/")
        return Location("mem", key, bucket)

    def write_bytes(self, loc: Location, data: bytes) -> None:
        self.blobs[loc.uri] = data

    def read_bytes(self, loc: Location) -> bytes:
        return self.blobs[loc.uri]


def test_a_new_backend_is_one_class_and_one_registry_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BACKENDS, "mem", MemoryBackend)
    storage = Storage(mem="its settings")
    loc = parse_uri("mem://box/a/b")
    storage.write_bytes(loc, b"x")
    assert loc == Location("mem", "a/b", "box") and storage.read_bytes(loc) == b"x"
    assert storage.backend(loc).settings == "its settings" and storage.backend(loc).blobs == {"mem://box/a/b": b"x"}
    with pytest.raises(TypeError, match="no storage backend for the scheme"):
        Storage(gs="settings for a scheme nobody registered")


@pytest.mark.parametrize("key", ["a.txt", "a/b/c.bin", "..a/b..", "a/.b", "a\\..\\b", "ünï/cødé"])
def test_safe_relative_keeps_plain_keys(key: str) -> None:
    assert safe_relative(key) == key


@pytest.mark.parametrize(
    "key", ["", "/abs", "a//b", "a/", "../x", "a/../../x", "a/./b", ".", "..", "a\0b", "/" * 5, "x/" + "../" * 99]
)
def test_safe_relative_refuses_keys_that_leave_the_folder(key: str) -> None:
    with pytest.raises(UnsafePath) as err:
        safe_relative(key, "s3://b/p")
    assert err.value.code == ExitCode.BAD_INPUT
    assert str(err.value).startswith("s3://b/p: key ") and len(str(err.value)) < 300


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path]:
    """(root, outside): `outside` holds a victim file and is the target of links planted below `root`."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious")
    return root, outside


def test_local_tree_never_writes_through_a_link_to_a_folder(planted: tuple[Path, Path]) -> None:
    root, outside = planted
    (root / "sub").symlink_to(outside)
    tree = LocalTree(root)
    for attempt in (
        lambda: tree.open("sub/new", os.O_WRONLY | os.O_CREAT),
        lambda: tree.write_atomic("sub/new", lambda f: f.write(b"x")),
        lambda: tree.mkdir("sub/deeper"),
        lambda: tree.read("sub/victim", 100),
    ):
        with pytest.raises(UnsafePath, match="symbolic link"):
            attempt()
    assert files_in(outside) == {"victim": b"precious"}


def test_local_tree_never_opens_truncates_or_removes_through_a_link_to_a_file(planted: tuple[Path, Path]) -> None:
    root, outside = planted
    (root / "lock").symlink_to(outside / "victim")
    tree = LocalTree(root)
    with pytest.raises(UnsafePath):
        tree.open("lock", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    tree.remove("lock")  # the link goes, not what it points to
    assert not (root / "lock").is_symlink()
    assert files_in(outside) == {"victim": b"precious"}


def test_local_tree_replace_replaces_a_link_at_the_destination_instead_of_following_it(
    planted: tuple[Path, Path],
) -> None:
    root, outside = planted
    (root / "model.bin").symlink_to(outside / "victim")
    tree = LocalTree(root)
    tree.write_atomic("tmp/part", lambda f: f.write(b"fresh"))
    tree.replace("tmp/part", "model.bin")
    assert (root / "model.bin").read_bytes() == b"fresh" and not (root / "model.bin").is_symlink()
    assert files_in(outside) == {"victim": b"precious"}


def test_local_tree_remove_of_a_folder_never_descends_into_a_link(planted: tuple[Path, Path]) -> None:
    root, outside = planted
    (root / "tmp").mkdir()
    (root / "tmp" / "escape").symlink_to(outside)
    LocalTree(root).remove("tmp")
    assert not (root / "tmp").exists()
    assert files_in(outside) == {"victim": b"precious"}


def test_local_tree_refuses_a_file_where_a_folder_is_needed(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"")
    with pytest.raises(UnsafePath, match="a file where a folder is needed"):
        LocalTree(tmp_path).write_atomic("a/b", lambda f: f.write(b"x"))


TRAVERSAL_KEYS = ["m/../../escape.txt", "m//abs.txt", "m/./dot.txt", "m/a/../../../x"]


@pytest.mark.parametrize("bad_key", TRAVERSAL_KEYS)
def test_download_of_a_prefix_refuses_a_traversal_key_before_writing_anything(
    s3_storage: Storage, s3_client: Any, s3_bucket: str, tmp_path: Path, bad_key: str
) -> None:
    for key in ("m/ok.txt", bad_key):
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(UnsafePath) as err:
        s3_storage.download(parse_uri(f"s3://{s3_bucket}/m"), dest)
    assert bad_key.removeprefix("m/") in str(err.value)
    assert files_in(tmp_path) == {}


def test_download_of_the_bucket_root_refuses_an_absolute_key(
    s3_storage: Storage, s3_client: Any, s3_bucket: str, tmp_path: Path
) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="/etc/passwd", Body=b"x")
    with pytest.raises(UnsafePath, match="/etc/passwd"):
        s3_storage.download(parse_uri(f"s3://{s3_bucket}"), tmp_path / "dest")
    assert files_in(tmp_path) == {}


def test_local_copy_mirrors_a_prefix_and_refuses_a_dot_dot_object_name(
    s3_storage: Storage, s3_client: Any, s3_bucket: str, tmp_path: Path
) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="m/sub/w.bin", Body=b"weights")
    s3_client.put_object(Bucket=s3_bucket, Key="m/empty/", Body=b"")  # a console's folder marker
    with s3_storage.local_copy(parse_uri(f"s3://{s3_bucket}/m")) as local:
        assert files_in(local) == {"sub/w.bin": b"weights"}
    s3_client.put_object(Bucket=s3_bucket, Key="x/..", Body=b"x")
    with pytest.raises(UnsafePath), s3_storage.local_copy(parse_uri(f"s3://{s3_bucket}/x/..")):
        pass


def test_download_of_one_object_replaces_a_link_planted_at_its_name(
    s3_storage: Storage, s3_client: Any, s3_bucket: str, planted: tuple[Path, Path]
) -> None:
    root, outside = planted
    s3_client.put_object(Bucket=s3_bucket, Key="m/config.json", Body=b"{}")
    (root / "config.json").symlink_to(outside / "victim")
    s3_storage.download(parse_uri(f"s3://{s3_bucket}/m/config.json"), root / "config.json")
    assert (root / "config.json").read_bytes() == b"{}"
    assert files_in(outside) == {"victim": b"precious"}
