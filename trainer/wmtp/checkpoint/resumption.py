"""Where a run starts: the resume plan, resolved from the store before any weights load, so that a `--resume`
that names nothing usable fails in seconds rather than after the models have loaded.

`--resume` beats the recipe's `auto_resume_latest` (which means `auto`), which beats starting fresh. A resume the
operator chose (`fallback`: it passes the checkpoint last reported) falls back to the newest intact checkpoint
when that one is gone or damaged, and the plan says so; a resume a user named must be usable as named.
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
) -> ResumePlan:
    """The plan for `spec` (`latest`, `step_N`, a URI, `auto`, `never` or None), or `auto` when unset and `auto`."""
    spec = spec or (RESUME_AUTO if auto else None)
    try:
        return ResumePlan(store.resolve(spec), allow_config_change)
    except CheckpointError as err:
        if not fallback:
            raise
        problem = str(err)
    location = store.newest_intact()
    instead = f"resuming from {location.uri} instead" if location else "starting fresh"
    return ResumePlan(location, allow_config_change, f"{problem}; {instead}")
