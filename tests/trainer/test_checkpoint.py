from __future__ import annotations

import copy
import hashlib
import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from wmtp.checkpoint import (
    COMMITTED,
    STATE_FILE,
    CheckpointError,
    CheckpointManager,
    CheckpointStore,
    FileRecord,
    plan_resume,
    step_dir_name,
)
from wmtp.checkpoint.manager import rng_state, set_rng_state
from wmtp.storage import Location, Storage


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointStore:
    if request.param == "file":
        return CheckpointStore(str(tmp_path / "ckpt" / "run"), Storage())
    storage = request.getfixturevalue("s3_storage")
    bucket = request.getfixturevalue("s3_bucket")
    return CheckpointStore(f"s3://{bucket}/ckpt/run", storage)


def fake_checkpoint(store: CheckpointStore, step: int, committed: bool = True) -> None:
    for name in ("__0_0.distcp", "__1_0.distcp"):
        store.storage.write_bytes(store.step_location(step) / name, b"shard")
    if committed:
        store.commit(step, {"__0_0.distcp": FileRecord(5), "__1_0.distcp": FileRecord(5)})


def steps(store: CheckpointStore, **kwargs: bool) -> list[int]:
    return [info.step for info in store.list(**kwargs)]


def test_layout_is_zero_padded_step_folders() -> None:
    assert step_dir_name(1000) == "checkpoint_step_00001000"


def test_listing_ignores_uncommitted_checkpoints_and_other_files(store: CheckpointStore) -> None:
    fake_checkpoint(store, 10)
    fake_checkpoint(store, 20, committed=False)
    store.storage.write_bytes(store.root / "notes.txt", b"x")
    fake_checkpoint(store, 5)
    assert steps(store) == [5, 10]
    assert steps(store, include_uncommitted=True) == [5, 10, 20]
    assert store.latest().step == 10


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("latest", 20), ("auto", 20), ("step_10", 10), ("never", None), (None, None)],
)
def test_resolve(store: CheckpointStore, spec: str | None, expected: int | None) -> None:
    for step in (10, 20):
        fake_checkpoint(store, step)
    fake_checkpoint(store, 30, committed=False)
    location = store.resolve(spec)
    assert (location.name if location else None) == (step_dir_name(expected) if expected else None)


def test_resolve_a_uri_requires_a_committed_checkpoint(store: CheckpointStore) -> None:
    fake_checkpoint(store, 10)
    fake_checkpoint(store, 20, committed=False)
    assert store.resolve(store.step_location(10).uri) == store.step_location(10)
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        store.resolve(store.step_location(20).uri)


def test_missing_step_lists_the_steps_that_exist(store: CheckpointStore) -> None:
    for step in (10, 20):
        fake_checkpoint(store, step)
    with pytest.raises(CheckpointError, match=r"step_15.*committed steps: step_10, step_20"):
        store.resolve("step_15")


def test_auto_starts_fresh_but_latest_fails_on_an_empty_store(store: CheckpointStore) -> None:
    assert store.resolve("auto") is None
    with pytest.raises(CheckpointError, match="no intact committed checkpoint"):
        store.resolve("latest")


def test_prune_keeps_the_newest_and_removes_older_leftovers(store: CheckpointStore) -> None:
    for step in (10, 20, 30):
        fake_checkpoint(store, step)
    fake_checkpoint(store, 25, committed=False)  # a save that crashed before its commit
    fake_checkpoint(store, 40, committed=False)  # a save that may still be in progress
    store.prune(keep_last=2)
    assert steps(store, include_uncommitted=True) == [20, 30, 40]
    assert not store.storage.exists(store.step_location(10))


def test_commit_marker_records_time_and_every_file_with_its_size(store: CheckpointStore) -> None:
    fake_checkpoint(store, 10)
    marker = json.loads(store.storage.read_bytes(store.step_location(10) / COMMITTED))
    assert marker["step"] == 10 and marker["time"] > 0
    assert marker["files"] == {"__0_0.distcp": {"size": 5}, "__1_0.distcp": {"size": 5}}


def damage(store: CheckpointStore, step: int, how: str) -> str:
    """Break checkpoint `step` as a real store can; returns what the error must say."""
    location = store.step_location(step)
    if how == "missing shard":
        store.storage.delete(location / "__1_0.distcp")
        return "__1_0.distcp is missing"
    if how == "truncated shard":
        store.storage.write_bytes(location / "__1_0.distcp", b"sh")
        return "__1_0.distcp has 2 bytes, the marker says 5"
    store.storage.write_bytes(location / COMMITTED, b"")
    return f"its {COMMITTED} marker is unreadable (empty)"


DAMAGE = ["missing shard", "truncated shard", "empty marker"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_checkpoint_is_one_clear_error_when_named(store: CheckpointStore, how: str) -> None:
    fake_checkpoint(store, 10)
    fake_checkpoint(store, 20)
    expected = damage(store, 20, how)
    for spec in ("step_20", store.step_location(20).uri):
        with pytest.raises(CheckpointError) as caught:
            store.resolve(spec)
        message = str(caught.value)
        assert message.startswith(f"--resume {spec}: ") and "damaged checkpoint" in message and expected in message
        assert "\n" not in message


@pytest.mark.parametrize("how", DAMAGE)
def test_auto_and_latest_skip_a_damaged_checkpoint_and_list_shows_the_others(store: CheckpointStore, how: str) -> None:
    for step in (10, 20, 30):
        fake_checkpoint(store, step)
    damage(store, 30, how)
    assert store.resolve("auto") == store.step_location(20)
    assert store.resolve("latest") == store.step_location(20)
    assert store.latest().step == 20
    listed = store.list()
    assert [info.step for info in listed] == [10, 20, 30]
    assert [info.problem is not None for info in listed] == [False, False, how == "empty marker"]


def test_an_empty_marker_never_hides_the_other_checkpoints_from_prune(store: CheckpointStore) -> None:
    for step in (10, 20, 30, 40):
        fake_checkpoint(store, step)
    damage(store, 20, "empty marker")
    store.prune(keep_last=1)
    assert steps(store, include_uncommitted=True) == [40]


def test_prune_never_deletes_the_reported_or_the_resumed_checkpoint(store: CheckpointStore) -> None:
    for step in (10, 20, 30, 40):
        fake_checkpoint(store, step)
    store.prune(keep_last=1, protect=(store.step_location(10), store.step_location(30), None))
    assert steps(store) == [10, 30, 40]


def test_newest_intact_says_which_newer_ones_it_skipped(store: CheckpointStore) -> None:
    fake_checkpoint(store, 10)
    fake_checkpoint(store, 20)
    damage(store, 20, "missing shard")
    skipped: list[str] = []
    assert store.newest_intact(skipped) == store.step_location(10)
    assert len(skipped) == 1 and "__1_0.distcp is missing" in skipped[0]


FRESH = "already holds committed checkpoints (newest steps: 10, 20)"


@pytest.mark.parametrize(
    ("spec", "auto", "fallback", "overwrite", "expected", "warning"),
    [(None, False, False, True, None, None), ("never", True, False, True, None, None),
     (None, False, False, False, CheckpointError, FRESH), ("never", False, False, False, CheckpointError, FRESH),
     (None, True, False, False, 20, None), ("step_10", True, False, False, 10, None),
     ("step_15", False, True, False, 20, "step_15"), ("step_10", False, True, False, 20, "is newer than"),
     ("step_20", False, True, False, 20, None), ("auto", False, True, False, 20, None),
     ("step_15", False, False, False, CheckpointError, "committed steps: step_10, step_20")],
)  # fmt: skip
def test_the_resume_plan_takes_the_flag_over_the_recipe_and_the_newest_when_the_operator_chose(
    tmp_path: Path, spec: str | None, auto: bool, fallback: bool, overwrite: bool, expected: Any, warning: str | None
) -> None:
    """A user's resume is used as named; the operator's is a floor (a newer intact checkpoint wins, a missing one
    falls back); a fresh start never writes over committed checkpoints unless told to overwrite."""
    store = CheckpointStore(str(tmp_path / "run"), Storage())
    for step in (10, 20):
        fake_checkpoint(store, step)
    settings = {"auto": auto, "fallback": fallback, "overwrite": overwrite}
    if expected is CheckpointError:
        with pytest.raises(CheckpointError, match=re.escape(warning)):
            plan_resume(store, spec, **settings)
        return
    plan = plan_resume(store, spec, allow_config_change=True, **settings)
    assert plan.location == (store.step_location(expected) if expected else None) and plan.allow_config_change
    assert (plan.warning is None) == (warning is None)
    if warning:
        assert warning in plan.warning and plan.warning.endswith(f"resuming from {plan.location.uri} instead")


def test_rng_state_round_trips_through_json() -> None:
    import random

    import numpy as np

    state = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


class Counter:
    """A stateful part that is neither a module nor an optimizer."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.value = state["value"]


def _manager(store: CheckpointStore, fingerprint: str = "abc", **settings: Any) -> CheckpointManager:
    torch.manual_seed(0)
    modules = torch.nn.ModuleDict({"model": torch.nn.Linear(4, 4), "value_head": torch.nn.Linear(4, 1)})
    optimizer = torch.optim.AdamW(modules.parameters(), lr=0.1)
    settings = {"save_interval": 10, "keep_last": 100, **settings}
    return CheckpointManager(
        store, modules=modules, optimizer=optimizer, states={"counter": Counter()}, fingerprint=fingerprint,
        **settings,
    )  # fmt: skip


def train_a_little(manager: CheckpointManager) -> None:
    module, optimizer = manager.modules, manager.optimizer
    for _ in range(3):
        module["value_head"](module["model"](torch.randn(2, 4))).sum().backward()
        optimizer.step()


def save(manager: CheckpointManager, step: int) -> Location:
    """Checkpoint `step` now, whatever the interval: as at the last step, the save has committed on return."""
    manager.save(step, last=True)
    assert manager.latest == manager.store.step_location(step)
    return manager.latest


@pytest.mark.parametrize(
    ("interval", "last", "heard", "keep_last", "saved", "kept"),
    [(10, 25, {10, 20, 25}, 2, [10, 20, 25], [20, 25]),
     (10, 30, {10, 20, 30}, 1, [10, 20, 30], [30]),
     (10, 30, {10}, 1, [10, 20, 30], [10, 30]),  # the status never heard of 20 or 30: 10 is what it resumes
     (7, 14, set(), 1, [7, 14], [14]),
     (100, 3, {3}, 1, [3], [3])],
)  # fmt: skip
def test_the_manager_saves_on_its_cadence_reports_each_commit_once_and_keeps_what_was_reported(
    tmp_path: Path, interval: int, last: int, heard: set[int], keep_last: int, saved: list[int], kept: list[int]
) -> None:
    store = CheckpointStore(str(tmp_path / "run"), Storage())
    told: list[int] = []

    def report(location: Location) -> bool:
        told.append(int(location.name.removeprefix("checkpoint_step_")))
        return told[-1] in heard

    manager = _manager(store, save_interval=interval, keep_last=keep_last, report=report)
    for step in range(1, last + 1):
        manager.save(step, last=step == last)
    assert told == saved  # each once, in order, the last one before save returned
    assert steps(store) == kept
    assert manager.latest == store.step_location(last) and manager.wait() is None


def test_manager_restores_every_named_part(store: CheckpointStore) -> None:
    saver = _manager(store)
    train_a_little(saver)
    module, optimizer = saver.modules, saver.optimizer
    saver.states["counter"].value = 7
    location = save(saver, 3)

    loader = _manager(store)
    assert loader.load(location) == 3
    restored, restored_opt = loader.modules, loader.optimizer
    assert loader.states["counter"].value == 7
    for a, b in zip(module.state_dict().values(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    saved_opt, loaded_opt = optimizer.state_dict()["state"], restored_opt.state_dict()["state"]
    for key in saved_opt:
        for name in saved_opt[key]:
            assert torch.equal(saved_opt[key][name], loaded_opt[key][name])
    assert loader.resumed_from == location and loader.bytes_read > 0


def _everything(manager: CheckpointManager) -> dict[str, Any]:
    optimizer = manager.optimizer.state_dict()
    lrs = [group["lr"] for group in optimizer["param_groups"]]
    return {"modules": manager.modules.state_dict(), "optimizer": optimizer["state"], "lr": lrs}


def test_each_save_holds_the_state_of_its_moment_before_during_and_after_a_resume(store: CheckpointStore) -> None:
    # The manager keeps the names of what it saves from save to save; every checkpoint must still hold the values
    # of the moment it was taken: after steps and lr changes, after a load, and after tensors were replaced.
    saver = _manager(store)
    moments: dict[int, dict[str, Any]] = {}
    for step in range(1, 4):
        train_a_little(saver)
        saver.optimizer.param_groups[0]["lr"] = 0.1 / (step + 1)
        moments[step] = copy.deepcopy(_everything(saver))
        save(saver, step)
    saver.load(store.step_location(1))
    train_a_little(saver)
    for state in saver.optimizer.state.values():  # an optimizer that replaces its tensors instead of updating them
        state["exp_avg"] = state["exp_avg"] * 2
    moments[5] = copy.deepcopy(_everything(saver))
    save(saver, 5)

    for step, expected in moments.items():
        loader = _manager(store)
        loader.load(store.step_location(step))
        loaded = _everything(loader)
        assert loaded["lr"] == expected["lr"], step
        for name, tensor in expected["modules"].items():
            assert torch.equal(loaded["modules"][name], tensor), (step, name)
        assert loaded["optimizer"].keys() == expected["optimizer"].keys(), step
        for index, state in expected["optimizer"].items():
            for name, tensor in state.items():
                assert torch.equal(loaded["optimizer"][index][name], tensor), (step, index, name)


def train_value_head_then_model(manager: CheckpointManager, steps: range, model_from: int) -> None:
    """Optimizer steps `steps`, the model updated only from step `model_from` on: as in a head warm-up, it gets
    no gradient, and so no optimizer state, until then. Each step's input depends on the step alone."""
    module, optimizer = manager.modules, manager.optimizer
    for step in steps:
        inputs = torch.randn(2, 4, generator=torch.Generator().manual_seed(step))
        module["value_head"](module["model"](inputs)).sum().backward()
        if step < model_from:
            for param in module["model"].parameters():
                param.grad = None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_saves_before_across_and_after_the_optimizer_gains_state_resume_exactly(store: CheckpointStore) -> None:
    # The host copy kept from save to save matches the first save's state; once the model trains, the optimizer
    # holds state for it too, and the next saves must hold that. A checkpoint from before resumes without any.
    saver = _manager(store)
    moments: dict[int, dict[str, Any]] = {}
    for step in (2, 4, 6):
        train_value_head_then_model(saver, range(step - 2, step), model_from=3)
        moments[step] = copy.deepcopy(_everything(saver))
        save(saver, step)

    for step, expected in moments.items():
        loader = _manager(store)
        loader.load(store.step_location(step))
        loaded = _everything(loader)
        assert loaded["optimizer"].keys() == expected["optimizer"].keys(), step
        for index, state in expected["optimizer"].items():
            assert loaded["optimizer"][index].keys() == state.keys(), (step, index)
            assert all(torch.equal(loaded["optimizer"][index][k], v) for k, v in state.items()), (step, index)
    assert len(moments[2]["optimizer"]) == 2 and len(moments[4]["optimizer"]) == 4  # the value head's, then all

    resumed = _manager(store)
    resumed.load(store.step_location(2))
    assert not any(param in resumed.optimizer.state for param in resumed.modules["model"].parameters())
    train_value_head_then_model(resumed, range(2, 6), model_from=3)
    for a, b in zip(saver.modules.state_dict().values(), resumed.modules.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the model's first updates, from fresh optimizer state, as in the run that went on


def _saved_tensor(location: Location, key: str) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(location.path).read_metadata().state_dict_metadata[key]


@pytest.mark.parametrize(
    ("change", "key", "expected"),
    [("a new state name", "optimizer.state.value_head.bias.extra", (3,)),
     ("a shape", "optimizer.state.value_head.weight.exp_avg", (1,)),
     ("a dtype", "optimizer.state.value_head.weight.exp_avg", torch.float64)],
)  # fmt: skip
def test_the_host_copy_is_made_again_when_the_optimizer_states_layout_changes(
    tmp_path: Path, change: str, key: str, expected: object
) -> None:
    store = CheckpointStore(str(tmp_path / "run"), Storage())
    manager = _manager(store)
    train_a_little(manager)
    save(manager, 1)
    head = manager.modules["value_head"]
    state = manager.optimizer.state
    if change == "a new state name":
        state[head.bias]["extra"] = torch.ones(3)
    elif change == "a shape":  # a copy into the old host tensor would broadcast, silently
        state[head.weight]["exp_avg"] = torch.ones(1)
    else:  # a copy into the old host tensor would convert, silently
        state[head.weight]["exp_avg"] = state[head.weight]["exp_avg"].double()
    saved = _saved_tensor(save(manager, 2), key)
    assert (saved.properties.dtype if isinstance(expected, torch.dtype) else tuple(saved.size)) == expected


def test_the_marker_lists_every_file_written_with_its_size_and_digest(store: CheckpointStore) -> None:
    location = save(_manager(store), 3)
    marker = store.verify(location)
    names = set(store.storage.list_dir(location)) - {COMMITTED}
    assert set(marker.files) == names and {".metadata", STATE_FILE, "rng_rank0.json", "__0_0.distcp"} <= names
    for name, record in marker.files.items():
        assert record.size == store.storage.size(location / name)
        assert record.sha256 == hashlib.sha256(store.storage.read_bytes(location / name)).hexdigest()


def test_a_trainer_state_that_does_not_match_its_digest_is_refused(store: CheckpointStore) -> None:
    location = save(_manager(store), 3)
    state = store.storage.read_bytes(location / STATE_FILE)
    store.storage.write_bytes(location / STATE_FILE, state.replace(b'"value": 0', b'"value": 9'))
    with pytest.raises(CheckpointError, match="does not match the marker's SHA-256"):
        _manager(store).load(location)


def test_a_shard_corrupted_in_place_is_one_checkpoint_error_not_a_torch_exception(store: CheckpointStore) -> None:
    location = save(_manager(store), 3)
    shard = location / "__0_0.distcp"
    data = store.storage.read_bytes(shard)
    store.storage.write_bytes(shard, bytes(len(data)))  # the same size, every byte zero: only loading can tell
    with pytest.raises(CheckpointError, match=r"cannot be loaded: ") as caught:
        _manager(store).load(location)
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)


def test_training_goes_on_while_a_save_is_written_and_commits_only_when_every_file_is(
    store: CheckpointStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    original = CheckpointStore.commit

    def slow_commit(self: CheckpointStore, step: int, files: dict[str, FileRecord]) -> Location:
        assert release.wait(30)
        return original(self, step, files)

    monkeypatch.setattr(CheckpointStore, "commit", slow_commit)
    manager = _manager(store)
    manager.save(10)
    train_a_little(manager)  # the staged copy is what gets written, not these newer weights
    assert manager.poll() is None and not store.is_committed(store.step_location(10))
    release.set()
    assert manager.wait() == store.step_location(10)
    assert manager.poll() is None  # reported once

    loader = _manager(store)
    loader.load(store.step_location(10))
    fresh = _manager(store)
    for a, b in zip(fresh.modules.state_dict().values(), loader.modules.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_save_that_fails_in_the_background_surfaces_and_commits_nothing(
    store: CheckpointStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("wmtp.checkpoint.manager.ShardWriter.write_data", broken)
    manager = _manager(store)
    manager.save(10)
    with pytest.raises(CheckpointError, match=r"saving a checkpoint failed: .*disk full"):
        manager.wait()
    assert not store.is_committed(store.step_location(10))


def test_manager_refuses_a_checkpoint_of_another_fingerprint_unless_allowed(store: CheckpointStore) -> None:
    location = save(_manager(store, fingerprint="abc"), 10)
    with pytest.raises(CheckpointError, match=r"different config or recipe.*--allow-config-change"):
        _manager(store, fingerprint="xyz").load(location)
    assert _manager(store, fingerprint="xyz").load(location, allow_fingerprint_change=True) == 10


def test_checkpoints_list_shows_a_damaged_checkpoint_and_the_others(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wmtp.cli import app

    store = CheckpointStore(str(tmp_path / "run"), Storage())
    for step in (10, 20, 30):
        fake_checkpoint(store, step)
    damage(store, 20, "missing shard")
    damage(store, 30, "empty marker")
    listed = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["checkpoints", "list", str(store.root.path)])
    assert listed.exit_code == 0, listed.output
    rows = {line.split("│")[1].strip(): line for line in listed.output.splitlines() if line.count("│") > 3}
    assert "yes" in rows["10"]
    assert "DAMAGED: __1_0.distcp is missing" in rows["20"]
    assert "DAMAGED" in rows["30"] and "unreadable (empty)" in rows["30"]


@pytest.mark.parametrize(
    ("run_id", "parsed"),
    [("0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef"), ("../../etc", None),
     ("x" * 65, None), (7, None), ({"id": "a"}, None), ("a b", None), (None, None)],
)  # fmt: skip
def test_the_final_models_marker_names_its_mlflow_run_and_refuses_anything_else(
    run_id: object, parsed: str | None, tmp_path: Path
) -> None:
    manager = _manager(CheckpointStore(str(tmp_path / "run"), Storage()))
    with manager.save_final(run_id if isinstance(run_id, str) else None) as folder:
        (folder / "model.safetensors").write_bytes(b"weights")
    store, final = manager.store, manager.store.final_location
    if not isinstance(run_id, str):  # what only a tampered marker holds
        marker = json.loads(store.storage.read_bytes(final / COMMITTED))
        store.storage.write_bytes(final / COMMITTED, json.dumps({**marker, "mlflow_run_id": run_id}).encode())
    assert store.read_marker(final).mlflow_run_id == parsed
    assert store.verify(final).files["model.safetensors"].size == 7
