"""Checkpoints: the store (layout, commit marker, listing, retention, resume resolution) and the manager (a
run's named stateful parts, when to save them, sharded save and load)."""

from wmtp.checkpoint.manager import CheckpointManager, Stateful
from wmtp.checkpoint.store import (
    COMMITTED,
    STATE_FILE,
    CheckpointError,
    CheckpointInfo,
    CheckpointStore,
    step_dir_name,
)

__all__ = [
    "COMMITTED",
    "STATE_FILE",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointStore",
    "Stateful",
    "step_dir_name",
]
