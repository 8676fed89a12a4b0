"""Hostile checkpoint and model stores: whoever can write a bucket can write the COMMITTED marker too, so the digests
catch damage, not an attacker. Planted pickles (`.metadata`, a non-tensor value in a shard, an RNG file, a model's
`pytorch_model.bin`) are refused with one line naming what was refused, and their payload never runs (it would
write a file; each test asserts the file is not there). Hostile markers make their own checkpoint DAMAGED and
nothing else: listing, pruning, `auto` and `wmtp eval`'s lookup of the training run go on."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from typer.testing import CliRunner

from support.runs import write_run_files
from wmtp.checkpoint import COMMITTED, STATE_FILE, CheckpointError, CheckpointManager, CheckpointStore, FileRecord
from wmtp.checkpoint.shards import METADATA, unpickle_metadata
from wmtp.cli import app
from wmtp.eval.runner import training_run
from wmtp.models.loading import ModelError, load_mtp_model
from wmtp.storage import Location, Storage

runner = CliRunner(env={"COLUMNS": "300"})


class Payload:
    """Unpickled, it creates `proof`: the sign that loading ran code from the store."""

    def __init__(self, proof: Path) -> None:
        self.proof = proof

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"open({str(self.proof)!r}, 'w').close()",)


def torch_saved(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def recommit(store: CheckpointStore, location: Location) -> None:
    """What an attacker with write access does after planting: a marker that vouches for every file as it is now."""
    files = {}
    for info in store.storage.objects(location):
        if info.rel != COMMITTED:
            data = store.storage.read_bytes(info.loc)
            files[info.rel] = FileRecord(len(data), hashlib.sha256(data).hexdigest())
    store.mark_committed(location, files, step=int(location.name.rsplit("_", 1)[1]))


def manager(store: CheckpointStore) -> CheckpointManager:
    torch.manual_seed(0)
    modules = torch.nn.ModuleDict({"model": torch.nn.Linear(4, 4)})
    optimizer = torch.optim.AdamW(modules.parameters(), lr=0.1)
    return CheckpointManager(
        store, modules=modules, optimizer=optimizer, states={}, save_interval=10, keep_last=2, fingerprint="abc"
    )


@pytest.fixture
def saved(tmp_path: Path) -> tuple[CheckpointStore, Location]:
    store = CheckpointStore(str(tmp_path / "ckpt" / "run"), Storage())
    saver = manager(store)
    saver.modules["model"](torch.randn(2, 4)).sum().backward()
    saver.optimizer.step()
    saver.save(10)
    return store, saver.wait()


def plant_metadata(store: CheckpointStore, location: Location, proof: Path) -> None:
    store.storage.write_bytes(location / METADATA, pickle.dumps(Payload(proof)))


def plant_rng(store: CheckpointStore, location: Location, proof: Path) -> None:
    store.storage.write_bytes(location / "rng_rank0.json", pickle.dumps(Payload(proof)))


def plant_param_group(store: CheckpointStore, location: Location, proof: Path) -> None:
    """DCP stores each non-tensor value (the optimizer's lr, betas, ...) as a torch.save pickle, which its stock
    planner loads with weights_only=False: point the lr at a payload in a shard file of its own."""
    metadata = unpickle_metadata(location / METADATA, store.storage.read_bytes(location / METADATA))
    (index,) = [i for i in metadata.storage_data if i.fqn == "optimizer.param_groups.0.lr"]
    assert isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata)
    payload = torch_saved(Payload(proof))
    store.storage.write_bytes(location / "__9_0.distcp", payload)
    metadata.storage_data[index] = _StorageInfo("__9_0.distcp", 0, len(payload))
    store.storage.write_bytes(location / METADATA, pickle.dumps(metadata))


def plant_outside(store: CheckpointStore, location: Location, proof: Path) -> None:
    """`.metadata` names the files to read: one outside the checkpoint (the marker cannot vouch for it)."""
    metadata = unpickle_metadata(location / METADATA, store.storage.read_bytes(location / METADATA))
    index = next(i for i in metadata.storage_data if i.fqn == "optimizer.param_groups.0.lr")
    payload = torch_saved(Payload(proof))
    store.storage.write_bytes(store.root / "elsewhere.distcp", payload)
    metadata.storage_data[index] = _StorageInfo("../elsewhere.distcp", 0, len(payload))
    store.storage.write_bytes(location / METADATA, pickle.dumps(metadata))


@pytest.mark.parametrize(
    ("plant", "refused"),
    [
        (plant_metadata, r"\.metadata: refused: UnpicklingError: builtins\.exec is not part of checkpoint metadata"),
        (plant_param_group, r"optimizer\.param_groups\.0\.lr: refused: its saved value is not plain data"),
        (plant_rng, r"rng_rank0\.json: not JSON"),
        (plant_outside, r"refused: \.metadata names '\.\./elsewhere\.distcp', which the marker does not list"),
    ],
)
def test_a_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(
    saved: tuple[CheckpointStore, Location], tmp_path: Path, plant: object, refused: str
) -> None:
    store, location = saved
    proof = tmp_path / "payload-ran"
    plant(store, location, proof)  # type: ignore[operator]
    recommit(store, location)
    assert store.resolve("auto") == location  # the marker vouches for it: only loading can tell

    with pytest.raises(CheckpointError, match=refused) as caught:
        manager(store).load(location)
    assert "\n" not in str(caught.value) and location.uri in str(caught.value)
    assert not proof.exists()


def test_the_planted_param_group_would_run_through_dcps_stock_planner(
    saved: tuple[CheckpointStore, Location], tmp_path: Path
) -> None:
    """The control for the row above: the payload is real, and the stock planner runs it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from wmtp.checkpoint.shards import ShardReader

    store, location = saved
    proof = tmp_path / "payload-ran"
    plant_param_group(store, location, proof)
    recommit(store, location)
    loader = manager(store)
    _, optim_sd = get_state_dict(loader.modules, loader.optimizer)
    reader = ShardReader(location, store.storage, store.verify(location).files)
    dcp.load({"optimizer": optim_sd}, storage_reader=reader, no_dist=True)
    assert proof.exists()


def test_the_metadata_of_a_real_save_needs_no_global_outside_the_allow_list(
    saved: tuple[CheckpointStore, Location],
) -> None:
    store, location = saved
    metadata = unpickle_metadata(location / METADATA, store.storage.read_bytes(location / METADATA))
    assert metadata.state_dict_metadata and metadata.storage_data


@pytest.mark.slow
def test_resume_auto_onto_a_planted_newest_checkpoint_exits_2_naming_the_file(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """The attack as it happens: a trainer resumed with `auto` takes the newest checkpoint, a planted one."""
    config, recipe = write_run_files(
        tmp_path, tiny_models, "baseline-mtp", steps=2, **{"paths.checkpoints.save_interval": 2}
    )
    first = runner.invoke(app, ["train", "-c", str(config), "-r", str(recipe), "--log-level", "warning"])
    assert first.exit_code == 0, first.output
    (root,) = [p.parent for p in tmp_path.rglob("checkpoint_step_00000002")]
    store = CheckpointStore(str(root), Storage())
    planted = store.step_location(99)
    shutil.copytree(root / "checkpoint_step_00000002", root / planted.name)
    proof = tmp_path / "payload-ran"
    plant_metadata(store, planted, proof)
    recommit(store, planted)

    again = runner.invoke(app, ["train", "-c", str(config), "-r", str(recipe), "--resume", "auto"])

    assert again.exit_code == 2, again.output
    (line,) = [line for line in again.stderr.splitlines() if "refused" in line]
    assert line.startswith(f"error: {planted.uri}: cannot be loaded: {planted.uri}/.metadata: refused: "), line
    assert not proof.exists()


def test_a_pickled_model_file_is_never_loaded(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    folder = tmp_path / "base"
    shutil.copytree(tiny_models["base"], folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    proof = tmp_path / "payload-ran"
    (folder / "pytorch_model.bin").write_bytes(torch_saved({"model.embed_tokens.weight": Payload(proof)}))

    with pytest.raises(ModelError, match=r"base: cannot load a model from it: .*model\.safetensors") as caught:
        load_mtp_model(str(folder), Storage(), 2, "linear")
    assert "\n" not in str(caught.value)
    assert not proof.exists()


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


def test_a_trainer_state_that_is_not_json_is_refused_naming_it(saved: tuple[CheckpointStore, Location]) -> None:
    store, location = saved
    store.storage.write_bytes(location / STATE_FILE, b"\x80\x04K\x01.")  # pickle.dumps(1)
    recommit(store, location)
    with pytest.raises(CheckpointError, match=rf"{STATE_FILE}: not JSON"):
        manager(store).load(location)
