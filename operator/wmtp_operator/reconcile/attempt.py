"""The current attempt, judged from its Job and pods and from what rank 0 reported: it goes on, it ended (its
ending recorded, then its Job deleted; the next attempt follows), or the run is over.

An ending carries its count (restarts + 1, or preemptions + 1 for an eviction, a disruption or a SIGTERM save) and
is written before the Job's deletion, so an operator killed in between counts nothing twice. Past backoffLimit, or
for a reason no retry can fix, the run fails instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from wmtp import contract
from wmtp_operator import pods as podstat
from wmtp_operator import render
from wmtp_operator.plan import Decision, Event, chain, say, write
from wmtp_operator.reconcile.view import View
from wmtp_operator.state import Ending, State, changed, operational_of, seconds_since
from wmtp_operator.status import Condition, Reported, parse_time, read_report

Obj = Mapping[str, Any]
# The kubelet's words for an image it cannot pull. No new attempt would pull it either, so none starts: the run waits
# up to spec.imagePullDeadline, the reason in its status, then fails without using a restart. (An invalid image name
# fails the run at once: `pods.FATAL_AT_ONCE`.)
PULL_FAILURES = frozenset({"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull"})


@dataclass(frozen=True, kw_only=True)
class Accepted(Decision):
    """Rank 0's report of the current attempt, accepted: its step and loss go to the status (None: no report of
    this attempt, the status keeps what it says)."""

    report: Reported | None = None


@dataclass(frozen=True, kw_only=True)
class Going(Decision):
    """The attempt goes on."""

    pods: tuple[str, str]  # how far its pods are (Pending, Pulling or Running) and in words: `pods.progress`
    seen: bool  # any of its pods exists (until then, an attempt started after an ending shows as Restarting)
    waiting: str | None  # why its pods have not started, in the kubelet's or the scheduler's words


@dataclass(frozen=True, kw_only=True)
class Ended(Decision):
    """The attempt ended (`state.ending`); the next one follows once its pods are gone."""


@dataclass(frozen=True, kw_only=True)
class Finished(Decision):
    """The run is over (`state.final`): the attempt succeeded, or failed for good."""


@dataclass(frozen=True, kw_only=True)
class Startup(Decision):
    """How the start of the attempt's pods goes: condition Started, and a look again when its next deadline (the
    grace for a missing object, startupTimeout) passes."""

    stop: podstat.Stop | None = None  # it cannot start
    waiting: str | None = None  # why its pods have not started, in the kubelet's or the scheduler's words


def recover(view: View) -> State:
    """The record, with an attempt whose Job exists but was never recorded taken as started (an operator killed
    between creating the Job and writing the record): the Job says."""
    state = view.recorded
    highest = max(map(render.attempt_of, view.jobs), default=0)
    if highest <= state.attempt:
        return state
    spec = view.run.spec if view.run else None
    resume = state.resume_from
    if spec is not None:  # what _create chose and wrote to spec.resumeFrom before the Job; the first: spec.resume
        resume = (spec.resume_from if state.attempt else None) or spec.resume
    return state.model_copy(
        update={
            "attempt": highest,
            "ending": None,
            "previous": state.ending,
            "refused": None,
            "resume_from": resume,
            "applied": operational_of(spec) if spec else state.applied,
            "start_time": state.start_time or view.now,
        }
    )


def accept_report(view: View, state: State) -> Accepted:
    """What rank 0 of the current attempt reported; a report of another attempt changes nothing."""
    report = read_report(view.old)
    if report is None or report.attempt != state.attempt or state.attempt == 0:
        return Accepted(state=state)
    offered = offer(view, state, report.checkpoint) if report.checkpoint else Decision(state=state)
    return chain(offered, Accepted(state=offered.state, report=report))


def offer(view: View, state: State, checkpoint: str) -> Decision:
    """A checkpoint a trainer named, in its report or its last words. The resume point only moves forward: to this
    one when it is one of this run's and newer (by step) than the one accepted, while an older one — a stale
    report, or a report that lost the race with a later save — changes nothing; one outside the run's root is
    refused with a Warning (once)."""
    if checkpoint in (state.checkpoint, state.rejected):
        return Decision(state=state)
    step = view.checkpoint_step(checkpoint)
    if step is None:
        base = view.run.spec.checkpoints.base_path if view.run else None
        warning = say(
            f"reported checkpoint {checkpoint} is not one of this run's (under {base}/{view.name}/"
            f"{contract.CHECKPOINT_PREFIX}N); it will not be resumed from"
        )
        rejected = state.model_copy(update={"rejected": checkpoint})
        return Decision(state=rejected, events=(Event("Warning", "CheckpointRejected", warning),))
    accepted = view.checkpoint_step(state.checkpoint)
    if accepted is not None and step <= accepted:
        return Decision(state=state)
    return Decision(state=state.model_copy(update={"checkpoint": checkpoint}))


def watch(view: View, state: State) -> Going | Ended | Finished:
    """The current attempt (recorded, not ended), from its Job and pods."""
    n = state.attempt
    if view.run is not None and view.run.spec.suspend:
        return _end(view, state, Ending(attempt=n, cause="suspend", reason="Suspended", message="suspended"))
    name = render.job_name(view.name, n)
    job = next((j for j in view.jobs if j["metadata"]["name"] == name), None)
    pods = [p for p in view.pods if render.attempt_of(p) == n]
    nodes = int((job or {}).get("spec", {}).get("completions") or (view.run.spec.nodes if view.run else 1))
    succeeded = podstat.attempt_succeeded(job, pods, nodes)
    stop = podstat.attempt_stop(job, pods, name)
    startup = Startup(state=state)
    if stop is None and job is not None and not succeeded:
        startup = _startup(view, state, job, pods, nodes)
        stop = startup.stop
    # Whatever the attempt does: an earlier attempt's Job whose deletion failed part-way goes.
    found = chain(Decision(state=state, actions=view.deletes(n - 1)), startup)
    if stop is not None:
        return chain(found, _stopped(view, state, stop, pods))
    if succeeded:
        warnings = podstat.warnings(pods)
        note = f" with warnings: {'; '.join(warnings)}" if warnings else ""
        events = tuple(Event("Warning", "TrainerWarning", say(warning)) for warning in warnings)
        return chain(found, _finish(view, state, "Succeeded", f"attempt {n} succeeded{note}", events))
    progress = podstat.progress(pods, nodes, n)
    conditions = _spec_applied(view, state)
    return chain(
        found, Going(state=state, conditions=conditions, pods=progress, seen=bool(pods), waiting=startup.waiting)
    )


def _startup(view: View, state: State, job: Obj, pods: list[Obj], nodes: int) -> Startup:
    if len(pods) >= nodes and all(map(podstat.started, pods)):
        return Startup(
            state=state, conditions=(view.condition("Started", "True", "Started", f"all {nodes} pods started"),)
        )
    timeout = view.startup_timeout
    stop, waiting = podstat.startup_stop(job, pods, nodes, view.now, timeout, view.account_missing)
    age = seconds_since(job["metadata"].get("creationTimestamp"), view.now)
    deadlines = [t - age for t in (min(podstat.MISSING_GRACE_SECONDS, timeout), timeout) if t > age]
    words = str(waiting) if waiting else None
    pull = _pull_failure(view, job, pods)
    if pull is not None and (stop is None or stop.reason == podstat.STARTUP_TIMEOUT):
        # The pull deadline decides, not startupTimeout: a new attempt would not pull the image either.
        waiting, left, words = pull
        stop = None if left > 0 else podstat.Stop(waiting.reason, words, fatal=True)
        deadlines = [left] if left > 0 else []
    if waiting is None:
        count = f"{sum(map(podstat.started, pods))}/{nodes} pods started"
        started = view.condition("Started", "False", "Starting", count)
    else:
        started = view.condition("Started", "False", waiting.reason, say(words or ""))
    return Startup(
        state=state,
        conditions=(started,),
        requeue=min(deadlines, default=None),
        stop=stop,
        waiting=started.message if started.reason != "Starting" else None,
    )


def _pull_failure(view: View, job: Obj, pods: list[Obj]) -> tuple[podstat.Waiting, float, str] | None:
    """A pod whose image the kubelet cannot pull (PULL_FAILURES), the seconds left of spec.imagePullDeadline —
    counted from when the pod was scheduled, where its pull began (else from the Job's creation) — and the
    words for the status, which say when the run fails."""
    failing = [(pod, w) for pod in pods if (w := podstat.waiting(pod)) and w.reason in PULL_FAILURES]
    if not failing:
        return None
    pod, waiting = failing[0]
    scheduled = podstat.condition(pod, "PodScheduled") or {}
    since = parse_time(scheduled.get("lastTransitionTime")) or parse_time(job["metadata"].get("creationTimestamp"))
    now, deadline = parse_time(view.now), view.image_pull_deadline
    if since is None or now is None:
        return waiting, float(deadline), f"{waiting}; imagePullDeadline {deadline}s"
    left = deadline - (now - since).total_seconds()
    if left <= 0:
        return waiting, left, f"{waiting}; not pulled within imagePullDeadline ({deadline}s)"
    at = (since + timedelta(seconds=deadline)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return waiting, left, f"{waiting}; the run fails at {at} unless the image can be pulled (imagePullDeadline)"


def _stopped(view: View, state: State, stop: podstat.Stop, pods: list[Obj]) -> Ended | Finished:
    """The attempt cannot go on: it ends (the next one may resume from the checkpoint its pods' last words name),
    or the run fails when no retry can help."""
    n, limit = state.attempt, view.backoff_limit
    checkpoint = podstat.last_checkpoint(pods)
    offered = offer(view, state, checkpoint) if checkpoint else Decision(state=state)
    state = offered.state
    if stop.fatal:  # its pods never started: nothing to keep
        failed = _finish(view, state, "Failed", f"attempt {n} cannot start: {stop.message}; no retry fixes this")
        return chain(offered, replace(failed, actions=(*failed.actions, *view.deletes(n))))
    if not stop.preempted and _bad_input(pods):  # the next attempt would get the same input
        why = f"attempt {n} failed: {stop.message}; the trainer says its input is wrong (exit code 2): no retry "
        why += "fixes this"
        return chain(offered, _finish(view, state, "Failed", why))
    if not stop.preempted and state.restarts >= limit:
        failed = _finish(view, state, "Failed", f"attempt {n} failed: {stop.message}; backoffLimit {limit} reached")
        return chain(offered, failed)
    cause = "preemption" if stop.preempted else "failure"
    ending = Ending(attempt=n, cause=cause, reason=stop.reason[:64], message=say(stop.message))
    return chain(offered, _end(view, state, ending))


def _bad_input(pods: list[Obj]) -> bool:
    """A trainer exited with ExitCode.BAD_INPUT: its config, recipe, data, model or --resume is wrong, or a fresh
    start would overwrite committed checkpoints; the kubelet's record of its exit, not anything the pod wrote."""
    ended = ((podstat.container(pod, podstat.TRAINER).get("state") or {}).get("terminated") or {} for pod in pods)
    return any(state.get("exitCode") == contract.ExitCode.BAD_INPUT for state in ended)


def _end(view: View, state: State, ending: Ending) -> Ended:
    """The ending recorded first (it carries the count), then the attempt's Job deleted."""
    update: dict[str, Any] = {"ending": ending}
    if ending.cause == "failure":
        update["restarts"] = state.restarts + 1
    elif ending.cause == "preemption":
        update["preemptions"] = state.preemptions + 1
    ended = state.model_copy(update=update)
    return Ended(state=ended, actions=(write(ended), *view.deletes(ending.attempt)))


def _finish(view: View, state: State, phase: str, message: str, events: tuple[Event, ...] = ()) -> Finished:
    final = state.model_copy(update={"final": phase, "message": say(message), "completion_time": view.now})
    return Finished(state=final, actions=(write(final),), events=events)


def _spec_applied(view: View, state: State) -> tuple[Condition, ...]:
    """Whether the attempt runs the spec as it is now: operational edits apply from the next attempt."""
    if view.run is None:
        return ()
    edited = changed(state.applied, operational_of(view.run.spec))
    if edited:
        fields = ", ".join(f"spec.{name}" for name in edited)
        return (
            view.condition("SpecApplied", "False", "NextAttempt", f"{fields} changed: applies from the next attempt"),
        )
    return (view.condition("SpecApplied", "True", "Current", f"attempt {state.attempt} uses the current spec"),)
