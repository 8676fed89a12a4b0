"""What a reconcile pass decides, as data: each step's decision, and the plan they fold into (the actions to apply
in order, the status fields that change, the Events to post, when to look again); and what the API server said
when it refused one of the actions.

Kept apart from the state machine (`reconcile`) so that the API adapter (`kube`) depends on these shapes alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from wmtp.config import clip, redact_uri
from wmtp_operator.state import State
from wmtp_operator.status import Condition

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Create:
    """Create `obj`; if it exists and this run controls it, merge-patch it with `obj` when `update`."""

    obj: dict[str, Any]
    update: bool = False


@dataclass(frozen=True)
class Delete:
    """Delete a child this run controls (uid precondition: never a namesake); already gone is fine."""

    kind: str
    name: str
    uid: str


@dataclass(frozen=True)
class PatchRun:
    """Merge-patch the WMTPRun itself (its uid as precondition); `state` is the record it writes, if any."""

    patch: dict[str, Any]
    state: State | None = None


Action = Create | Delete | PatchRun


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    jobs: Sequence[Obj] = ()  # Jobs labelled with the run's name (of this run or a namesake)
    pods: Sequence[Obj] = ()  # pods labelled with the run's name, of any attempt
    recipe_text: str | None = None  # the recipeRef ConfigMap's value, None if it does not exist
    account_missing: str | None = None  # the ServiceAccount the spec names, when it does not exist
    account: Obj | None = None  # the ServiceAccount the spec names, as read (its labels say whether it opted in)


@dataclass(frozen=True)
class Plan:
    actions: list[Action] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)  # the fields that change (None removes one)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None  # reconcile again after this many seconds even if nothing happens
    final: bool = False  # the run is over: no further passes are needed


def say(text: str) -> str:
    """Any text bound for a status, an Event or a log: credentials redacted, length clipped."""
    return clip(redact_uri(" ".join(str(text).split())))


@dataclass(frozen=True)
class Refused:
    """What the API server said when it refused to create a child (or a namesake holds its name)."""

    kind: str
    name: str
    code: int
    reason: str
    message: str


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What one step of a pass decided: the state record it leaves, the actions to apply in order (among them the
    record's write, before what it announces), the Events and conditions it sets, and how soon to look again.
    Each step's own kind adds what the status needs from it."""

    state: State
    actions: tuple[Action, ...] = ()
    events: tuple[Event, ...] = ()
    conditions: tuple[Condition, ...] = ()
    requeue: float | None = None


D = TypeVar("D", bound=Decision)


def chain(earlier: Decision, later: D) -> D:
    """`later`, decided from the state `earlier` left, with what both do and say in order; a later requeue wins."""
    return replace(
        later,
        actions=earlier.actions + later.actions,
        events=earlier.events + later.events,
        conditions=earlier.conditions + later.conditions,
        requeue=earlier.requeue if later.requeue is None else later.requeue,
    )


def write(state: State) -> PatchRun:
    """The write of the state record (a merge patch of its annotation)."""
    return PatchRun(state.patch(), state)
