"""Hostile checkpoint and model stores: whoever can write a bucket can write the COMMITTED marker too, so the digests
catch damage, not an attacker. Planted pickles (`.metadata`, a non-tensor value in a shard, an RNG file, a model's
`pytorch_model.bin`) are refused with one line naming what was refused, and their payload never runs (it would
write a file; each test asserts the file is not there). Hostile markers make their own checkpoint DAMAGED and
nothing else: listing, pruning, `auto` and `wmtp eval`'s lookup of the training run go on."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wmtp.checkpoint import COMMITTED, CheckpointError, CheckpointStore, FileRecord
from wmtp.cli import app
from wmtp.eval.runner import training_run
from wmtp.storage import Storage

runner = CliRunner(env={"COLUMNS": "300"})


def marker_with(**fields: object) -> bytes:
    return json.dumps({"time": 1.0, "files": {"__0_0.distcp": {"size": 5}}, **fields}).encode()


# name → (marker bytes, whether it is damaged)
MARKERS = {
    "deep list": (b"[" * 100_000, True),
    "deep object": (b'{"files":' * 50_000, True),
    "deep but closed": (b"[" * 5_000 + b"]" * 5_000, True),
    "oversized": (b" " * 2048 + marker_with(), True),  # the cap is lowered to 1 KiB for this table
    "not UTF-8": (b"\xff\xfe\x00{", True),
    "not JSON": (b"COMMITTED", True),
    "a list": (b"[]", True),
    "null": (b"null", True),
    "files a string": (json.dumps({"time": 1.0, "files": "abc"}).encode(), True),
    "files of lists": (json.dumps({"time": 1.0, "files": [[1]]}).encode(), True),
    "entry a list": (marker_with(files={"a": [1]}), True),
    "size not a number": (marker_with(files={"a": {"size": "x"}}), True),
    "size infinite": (marker_with(files={"a": {"size": 1e400}}), True),
    "size of 5000 digits": (b'{"time": 1, "files": {"a": {"size": 1' + b"0" * 5000 + b"}}}", True),
    "digest not hex": (marker_with(files={"a": {"size": 1, "sha256": ["x"]}}), True),
    "time missing": (json.dumps({"files": {}}).encode(), True),
    "time NaN": (b'{"files": {}, "time": NaN}', True),
    "time infinite": (b'{"files": {}, "time": 1e400}', True),
    "time of 400 digits": (b'{"files": {}, "time": 1' + b"0" * 400 + b"}", True),
    "time negative": (marker_with(time=-1), True),
    "brackets inside a string": (marker_with(note="[[[[[[[[[[[[[[[[{{{{{{{{"), False),
    "a step that is not a number": (marker_with(step=[1]), False),
}


@pytest.fixture
def small_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("wmtp.checkpoint.store.MAX_MARKER_BYTES", 1024)


def fake_checkpoint(store: CheckpointStore, step: int, marker: bytes | None = None) -> None:
    store.storage.write_bytes(store.step_location(step) / "__0_0.distcp", b"shard")
    store.commit(step, {"__0_0.distcp": FileRecord(5)})
    if marker is not None:
        store.storage.write_bytes(store.step_location(step) / COMMITTED, marker)


@pytest.mark.parametrize("name", list(MARKERS))
def test_a_hostile_marker_damages_its_own_checkpoint_and_nothing_else(
    tmp_path: Path, small_cap: None, name: str
) -> None:
    marker, damaged = MARKERS[name]
    store = CheckpointStore(str(tmp_path / "run"), Storage())
    for step in (10, 20):
        fake_checkpoint(store, step)
    fake_checkpoint(store, 30, marker)
    started = time.perf_counter()

    listed = store.list()
    assert [info.step for info in listed] == [10, 20, 30]
    problem = listed[-1].problem
    assert (problem is not None) == damaged, problem
    if damaged:
        assert problem.startswith(f"{store.step_location(30).uri}: damaged checkpoint: its COMMITTED marker is")
        assert "\n" not in problem and len(problem) < 600
        assert store.resolve("auto") == store.resolve("latest") == store.step_location(20)
        with pytest.raises(CheckpointError, match="damaged checkpoint"):
            store.resolve("step_30")
    assert time.perf_counter() - started < 10

    listing = runner.invoke(app, ["checkpoints", "list", str(store.root.path)])
    assert listing.exit_code == 0, listing.output
    row = next(line for line in listing.output.splitlines() if line.count("│") > 3 and "│ 30 " in line)
    assert ("DAMAGED" in row) == damaged, row
    pruned = runner.invoke(app, ["checkpoints", "prune", str(store.root.path), "--keep", "1"])
    assert pruned.exit_code == 0, pruned.output
    assert store.storage.exists(store.step_location(20 if damaged else 30))


@pytest.mark.parametrize("name", [name for name, (_, damaged) in MARKERS.items() if damaged])
def test_eval_treats_a_final_model_with_a_hostile_marker_as_naming_no_training_run(
    tmp_path: Path, small_cap: None, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / COMMITTED).write_bytes(MARKERS[name][0])
    with caplog.at_level(logging.WARNING):
        assert training_run(str(final), Storage()) is None
    assert any("damaged checkpoint" in record.getMessage() for record in caplog.records)


def test_eval_of_a_plain_model_folder_looks_up_no_run_and_warns_of_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert training_run(str(tmp_path), Storage()) is None
    assert not caplog.records
