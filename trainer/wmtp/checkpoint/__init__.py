"""Checkpoints: the store (layout, commit marker, listing, retention, resume resolution), the resume plan (where
a run starts), the shard files (DCP straight to and from the store) and the manager (a run's named stateful
parts, when to save them, asynchronous sharded save and sharded load, reporting and retention)."""

from wmtp.checkpoint.manager import CheckpointManager, Stateful
from wmtp.checkpoint.resumption import ResumePlan, plan_resume
from wmtp.checkpoint.store import (
    COMMITTED,
    FINAL_ALGORITHM,
    STATE_FILE,
    CheckpointError,
    CheckpointInfo,
    CheckpointStore,
    FileRecord,
    step_dir_name,
)

__all__ = [
    "COMMITTED",
    "FINAL_ALGORITHM",
    "STATE_FILE",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointStore",
    "FileRecord",
    "ResumePlan",
    "Stateful",
    "plan_resume",
    "step_dir_name",
]
