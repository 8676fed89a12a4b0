"""Hostile input into `wmtp pull` (moto S3): traversal keys, symlinks planted at every path it writes, tampered
and truncated state. Each row asserts the outcome: refused with one bounded line, or pulled correctly; and
nothing is ever written outside the destination."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from wmtp.pull import main
from wmtp.pull import state as pull_state
from wmtp.pull.state import STATE_DIR

MODEL = {"config.json": b'{"n_heads": 4}', "tokenizer/vocab.json": b"v" * 3000, "w/model.bin": os.urandom(70_000)}


@pytest.fixture
def source(s3_client: Any, s3_bucket: str) -> str:
    for rel, data in MODEL.items():
        s3_client.put_object(Bucket=s3_bucket, Key=f"m/{rel}", Body=data)
    return f"s3://{s3_bucket}/m"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the destination that links planted in it point to; nothing may ever change here."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "victim").write_bytes(b"precious")
    return folder


def pull_cli(uri: str, dest: Path, endpoint: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = main([uri], dest, None, workers=2, part_size_mb=1, verify=False, endpoint_url=endpoint, region=None)
    out, err = capsys.readouterr()
    return rc, out, err


def pulled(dest: Path) -> dict[str, bytes]:
    return {
        p.relative_to(dest).as_posix(): p.read_bytes()
        for p in sorted(dest.rglob("*"))
        if p.is_file() and not p.is_symlink() and STATE_DIR not in p.relative_to(dest).parts
    }


def untouched(outside: Path) -> bool:
    return {p.name: p.read_bytes() for p in outside.iterdir()} == {"victim": b"precious"}


@pytest.mark.parametrize(
    ("key", "pulled_uri"),
    [
        ("m/../../escape.txt", "m"),
        ("m//abs.txt", "m"),
        ("m/./dot.txt", "m"),
        ("m/a/../../../x", "m"),
        ("/root.txt", ""),
        (f"m/{STATE_DIR}/lock", "m"),
    ],
)
def test_a_traversal_key_is_refused_before_anything_is_written(
    s3_client: Any, s3_bucket: str, s3_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture,
    key: str, pulled_uri: str,
) -> None:  # fmt: skip
    s3_client.put_object(Bucket=s3_bucket, Key="m/ok.txt", Body=b"ok")
    s3_client.put_object(Bucket=s3_bucket, Key=key, Body=b"evil")
    dest = tmp_path / "a" / "b" / "dest"

    rc, out, err = pull_cli(f"s3://{s3_bucket}/{pulled_uri}".rstrip("/"), dest, s3_endpoint, capsys)

    assert rc == 2 and out == "" and err.count("\n") == 1 and len(err) < 500, err
    assert "does not map to a path inside" in err or "state folder" in err
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def link(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


# (row, plant(dest, outside) before the pull, whether the pull then succeeds)
PLANTED: list[tuple[str, Callable[[Path, Path], None], bool]] = [
    ("destination file", lambda d, o: link(d / "config.json", o / "victim"), True),
    ("destination folder", lambda d, o: link(d / "tokenizer", o), False),
    ("state folder", lambda d, o: link(d / STATE_DIR, o), True),
    ("lock", lambda d, o: link(d / STATE_DIR / "lock", o / "victim"), True),
    ("marker", lambda d, o: link(d / STATE_DIR / "marker.json", o / "victim"), True),
    ("journal", lambda d, o: link(d / STATE_DIR / "journal.jsonl", o / "victim"), True),
    ("tmp folder", lambda d, o: link(d / STATE_DIR / "tmp", o), True),
    ("inside tmp", lambda d, o: link(d / STATE_DIR / "tmp" / "escape", o), True),
]


@pytest.mark.parametrize(("row", "plant", "succeeds"), PLANTED, ids=[row for row, _, _ in PLANTED])
@pytest.mark.parametrize("when", ["fresh", "rerun"])
def test_a_planted_symlink_never_sends_a_write_outside_the_destination(
    source: str, s3_endpoint: str, tmp_path: Path, outside: Path, capsys: pytest.CaptureFixture,
    row: str, plant: Callable[[Path, Path], None], succeeds: bool, when: str,
) -> None:  # fmt: skip
    dest = tmp_path / "dest"
    if when == "rerun":
        assert pull_cli(source, dest, s3_endpoint, capsys)[0] == 0
        _remove(dest, row)
    plant(dest, outside)

    rc, _, err = pull_cli(source, dest, s3_endpoint, capsys)

    assert untouched(outside), row
    if succeeds:
        assert rc == 0, err
        assert pulled(dest) == MODEL
    else:
        assert rc == 2 and err.count("\n") == 1 and "symbolic link" in err and len(err) < 500, err


def _remove(dest: Path, row: str) -> None:
    """Clear the path a row plants at, as an attacker replacing it would."""
    paths = {
        "destination file": dest / "config.json",
        "destination folder": dest / "tokenizer",
        "state folder": dest / STATE_DIR,
        "lock": dest / STATE_DIR / "lock",
        "marker": dest / STATE_DIR / "marker.json",
        "journal": dest / STATE_DIR / "journal.jsonl",
        "tmp folder": dest / STATE_DIR / "tmp",
        "inside tmp": dest / STATE_DIR / "tmp" / "escape",
    }
    path = paths[row]
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def marker_doc(dest: Path) -> dict[str, Any]:
    return json.loads((dest / STATE_DIR / "marker.json").read_text())


def with_files(dest: Path, change: Callable[[dict[str, Any]], Any]) -> bytes:
    doc = marker_doc(dest)
    change(doc["files"])
    return json.dumps(doc).encode()


# (row, new marker.json bytes given the destination)
TAMPERED_MARKERS: list[tuple[str, Callable[[Path], bytes]]] = [
    ("truncated", lambda d: (d / STATE_DIR / "marker.json").read_bytes()[:200]),
    ("empty", lambda d: b""),
    ("binary", lambda d: os.urandom(512)),
    ("a list", lambda d: b"[]"),
    ("nested deep", lambda d: b"[" * 100_000),
    ("complete missing", lambda d: b'{"files": {}}'),
    ("size a string", lambda d: with_files(d, lambda f: f["config.json"].update(size="14"))),
    ("digest unknown", lambda d: with_files(d, lambda f: f["config.json"].update(digest={"algo": "x", "value": ""}))),
    ("path escapes", lambda d: with_files(d, lambda f: f.update({"../../escape": f["config.json"]}))),
    ("entry not a mapping", lambda d: with_files(d, lambda f: f.update({"config.json": [1]}))),
]


@pytest.mark.parametrize(("row", "tamper"), TAMPERED_MARKERS, ids=[row for row, _ in TAMPERED_MARKERS])
def test_a_tampered_marker_is_ignored_with_a_warning_and_the_files_are_verified_again(
    source: str, s3_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture,
    row: str, tamper: Callable[[Path], bytes],
) -> None:  # fmt: skip
    dest = tmp_path / "dest"
    assert pull_cli(source, dest, s3_endpoint, capsys)[0] == 0
    (dest / STATE_DIR / "marker.json").write_bytes(tamper(dest))

    with caplog.at_level(logging.WARNING, logger="wmtp"):
        rc, out, err = pull_cli(source, dest, s3_endpoint, capsys)

    assert rc == 0, err
    summary = json.loads(out.splitlines()[-1])
    # Every file in place matched its single-part ETag (an MD5), so nothing was downloaded again.
    assert (summary["files"], summary["skipped"]) == (0, len(MODEL)), summary
    assert pulled(dest) == MODEL
    assert marker_doc(dest)["complete"] is True and set(marker_doc(dest)["files"]) == set(MODEL)
    if row not in ("truncated", "empty"):  # an empty or cut marker may also be read as "no marker yet"
        assert any("marker.json" in r.message and "ignoring it" in r.message for r in caplog.records)
    assert all(len(r.getMessage()) < 800 for r in caplog.records)


def test_tampered_state_with_a_corrupted_file_fetches_that_file_again(
    source: str, s3_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dest = tmp_path / "dest"
    assert pull_cli(source, dest, s3_endpoint, capsys)[0] == 0
    (dest / STATE_DIR / "marker.json").write_bytes(b"{not json")
    (dest / "w" / "model.bin").write_bytes(bytes(len(MODEL["w/model.bin"])))

    rc, out, err = pull_cli(source, dest, s3_endpoint, capsys)

    assert rc == 0, err
    assert json.loads(out.splitlines()[-1])["files"] == 1
    assert pulled(dest) == MODEL


@pytest.mark.parametrize(
    "journal",
    [
        b'{"rel": "config.json", "size": ',
        b"\x00\xff" * 300,
        b'{"rel": "../x", "size": 1}\n[1, 2]\n"str"\n',
        b"[" * 50_000,
    ],
    ids=["cut mid-line", "binary", "wrong shapes", "nested deep"],
)
def test_a_tampered_journal_is_skipped_and_the_pull_completes(
    source: str, s3_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture, journal: bytes
) -> None:
    dest = tmp_path / "dest"
    assert pull_cli(source, dest, s3_endpoint, capsys)[0] == 0
    doc = marker_doc(dest) | {"complete": False}  # as a crashed pull leaves it
    (dest / STATE_DIR / "marker.json").write_text(json.dumps(doc))
    (dest / STATE_DIR / "journal.jsonl").write_bytes(journal)

    rc, _, err = pull_cli(source, dest, s3_endpoint, capsys)

    assert rc == 0, err
    assert pulled(dest) == MODEL and marker_doc(dest)["complete"] is True
    assert not (dest / STATE_DIR / "journal.jsonl").exists()


def test_an_oversized_state_file_is_ignored_without_reading_it_whole(
    source: str, s3_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "dest"
    assert pull_cli(source, dest, s3_endpoint, capsys)[0] == 0
    monkeypatch.setattr(pull_state, "_MAX_STATE_BYTES", 64)
    rc, out, err = pull_cli(source, dest, s3_endpoint, capsys)
    assert rc == 0 and json.loads(out.splitlines()[-1])["files"] == 0, err


def test_a_garbage_lock_record_is_taken_over(
    source: str, s3_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dest = tmp_path / "dest"
    (dest / STATE_DIR).mkdir(parents=True)
    (dest / STATE_DIR / "lock").write_bytes(b"[" * 2048)
    rc, _, err = pull_cli(source, dest, s3_endpoint, capsys)
    assert rc == 0, err
    assert pulled(dest) == MODEL
