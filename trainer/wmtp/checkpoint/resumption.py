"""Where a run starts: the resume plan, resolved from the store before any weights load, so that a `--resume`
that names nothing usable fails in seconds rather than after the models have loaded.

`--resume` beats the recipe's `auto_resume_latest` (which means `auto`), which beats starting fresh. A resume the
operator chose (`fallback`: a checkpoint it validated as the run's) is a floor, not a place: the run goes on from
the newest intact checkpoint under its prefix when that one is newer (a report lost, a save it never heard of) or
the chosen one is gone or damaged, and the plan says so; a resume a user named must be usable as named. A fresh
start never writes over committed checkpoints unless the recipe says `checkpointing.overwrite`.
"""

from __future__ import annotations

from dataclasses import dataclass

from wmtp.checkpoint.store import CheckpointError, CheckpointStore
from wmtp.contract import RESUME_AUTO
from wmtp.storage import Location


@dataclass(frozen=True)
class ResumePlan:
    """The checkpoint to continue from (None: start fresh), whether it may have been written for another config or
    recipe, and what went wrong on the way to it without stopping the run."""

    location: Location | None = None
    allow_config_change: bool = False
    warning: str | None = None


def plan_resume(
    store: CheckpointStore,
    spec: str | None,
    *,
    auto: bool = False,
    fallback: bool = False,
    allow_config_change: bool = False,
    overwrite: bool = False,
) -> ResumePlan:
    """The plan for `spec` (`latest`, `step_N`, a URI, `auto`, `never` or None), or `auto` when unset and `auto`."""
    spec = spec or (RESUME_AUTO if auto else None)
    try:
        named, problem = store.resolve(spec), None
    except CheckpointError as err:
        if not fallback:
            raise
        named, problem = None, str(err)
    if fallback:
        newest = store.newest_intact()
        if newest is not None and (named is None or _step(store, newest) > _step(store, named)):
            why = problem or f"{newest.uri} is newer than {named.uri if named else 'the checkpoint chosen'}"
            return ResumePlan(newest, allow_config_change, f"{why}; resuming from {newest.uri} instead")
        if problem is not None:
            return ResumePlan(None, allow_config_change, f"{problem}; starting fresh")
    if named is None and not overwrite:
        _check_fresh_start(store)
    return ResumePlan(named, allow_config_change)


def _step(store: CheckpointStore, location: Location) -> int:
    """The step of one of the run's checkpoints; -1 for one outside its prefix (where the run came from)."""
    step = store.step_of(location)
    return -1 if step is None else step


def _check_fresh_start(store: CheckpointStore) -> None:
    """A fresh start saves from step 0 into the run's prefix: never over committed checkpoints (an earlier run's of
    the same name, or this run's after a lost resume)."""
    committed = store.list()
    if committed:
        steps = ", ".join(str(info.step) for info in committed[-3:])
        raise CheckpointError(
            f"{store.root.uri} already holds committed checkpoints (newest steps: {steps}); a fresh start would "
            "overwrite them: resume (--resume auto), use another run name or checkpoint path, or set "
            "checkpointing.overwrite: true in the recipe"
        )
