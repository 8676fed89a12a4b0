from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wmtp.checkpoint import COMMITTED, CheckpointError, CheckpointManager, CheckpointStore, step_dir_name
from wmtp.checkpoint.manager import rng_state, set_rng_state
from wmtp.storage import Storage


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointStore:
    if request.param == "file":
        return CheckpointStore(str(tmp_path / "ckpt" / "run"), Storage())
    storage = request.getfixturevalue("s3_storage")
    bucket = request.getfixturevalue("s3_bucket")
    return CheckpointStore(f"s3://{bucket}/ckpt/run", storage)


def fake_checkpoint(store: CheckpointStore, step: int, committed: bool = True) -> None:
    store.storage.write_bytes(store.step_location(step) / "__0_0.distcp", b"shard")
    if committed:
        store.commit(step, ["__0_0.distcp"])


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
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        store.resolve("latest")


def test_prune_keeps_the_newest_and_removes_older_leftovers(store: CheckpointStore) -> None:
    for step in (10, 20, 30):
        fake_checkpoint(store, step)
    fake_checkpoint(store, 25, committed=False)  # a save that crashed before its commit
    fake_checkpoint(store, 40, committed=False)  # a save that may still be in progress
    store.prune(keep_last=2)
    assert steps(store, include_uncommitted=True) == [20, 30, 40]
    assert not store.storage.exists(store.step_location(10))


def test_prune_protects_the_resumed_checkpoint_until_a_newer_one_commits(store: CheckpointStore) -> None:
    fake_checkpoint(store, 10)
    fake_checkpoint(store, 20)
    store.prune(keep_last=1, protect=store.step_location(20))
    assert steps(store) == [20]
    store.prune(keep_last=1, protect=store.step_location(30))
    assert steps(store) == [20]
    fake_checkpoint(store, 30)
    store.prune(keep_last=1, protect=store.step_location(20))
    assert steps(store) == [30]


def test_commit_marker_records_time_and_files(store: CheckpointStore) -> None:
    fake_checkpoint(store, 10)
    marker = json.loads(store.storage.read_bytes(store.step_location(10) / COMMITTED))
    assert marker["step"] == 10 and marker["files"] == ["__0_0.distcp"] and marker["time"] > 0


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


def _manager(store: CheckpointStore, fingerprint: str = "abc") -> CheckpointManager:
    torch.manual_seed(0)
    modules = torch.nn.ModuleDict({"model": torch.nn.Linear(4, 4), "value_head": torch.nn.Linear(4, 1)})
    optimizer = torch.optim.AdamW(modules.parameters(), lr=0.1)
    return CheckpointManager(
        store, modules=modules, optimizer=optimizer, states={"counter": Counter()}, save_interval=10,
        keep_last=2, fingerprint=fingerprint,
    )  # fmt: skip


def test_manager_restores_every_named_part(store: CheckpointStore) -> None:
    saver = _manager(store)
    module, optimizer = saver.modules, saver.optimizer
    for _ in range(3):
        module["value_head"](module["model"](torch.randn(2, 4))).sum().backward()
        optimizer.step()
    saver.states["counter"].value = 7
    location = saver.save(3)

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
    assert store.is_committed(location)


def test_manager_refuses_a_checkpoint_of_another_fingerprint_unless_allowed(store: CheckpointStore) -> None:
    location = _manager(store, fingerprint="abc").save(10)
    with pytest.raises(CheckpointError, match=r"different config or recipe.*--allow-config-change"):
        _manager(store, fingerprint="xyz").load(location)
    assert _manager(store, fingerprint="xyz").load(location, allow_fingerprint_change=True) == 10
