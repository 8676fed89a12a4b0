"""The run's state machine, pure: (WMTPRun body, observed children, now) → actions, status, events.

An attempt is one Indexed Job. Pending → Pulling → Running → Succeeded. When the attempt stops (a pod failed, was
evicted or deleted, the Job failed or vanished, the pods never started), its ending is recorded in the run's
state annotation (restarts + 1, or preemptions + 1 for an eviction, a disruption or a SIGTERM save), its Job is
deleted, and once all its pods are gone (their SIGTERM saves included: the fence) the next attempt starts from
the latest accepted checkpoint. Past backoffLimit, or for a reason no retry can fix, the run fails.
After a success, `evaluation` decides the evaluation spec.eval asks for (phase Evaluating until it ends).

Everything is derived from the state annotation and what is observed now, so running it twice, or after an
operator restart, changes nothing more. Callers apply the actions in order and patch the status last.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Literal

from pydantic import ValidationError

from wmtp import contract
from wmtp.config import ConfigError
from wmtp_operator import pods as podstat
from wmtp_operator import render
from wmtp_operator.plan import (
    FOREIGN_RETRY_SECONDS,
    Action,
    Create,
    Delete,
    Event,
    Observed,
    Outcome,
    PatchRun,
    Plan,
    Refused,
    backoff_seconds,
    conditions_of,
    events_of,
    say,
    status_of,
)
from wmtp_operator.reconcile import evaluation
from wmtp_operator.spec import Defaults, Run
from wmtp_operator.state import Ending, Refusal, State, changed, definition_of, operational_of, seconds_since
from wmtp_operator.status import Condition, get_condition, in_checkpoint_root, read_report, set_condition

Obj = Mapping[str, Any]


def reconcile(body: Obj, observed: Observed, now: str, defaults: Defaults = Defaults()) -> Plan:
    machine = _Pass(body, observed, now, defaults)
    machine.step()
    return machine.plan()


def refused(body: Obj, refusal: Refused, written: State | None, now: str) -> Plan:
    """The plan after the API server refused an action part-way through a pass's plan (`written`: the last state
    record that plan wrote, if any, else the run's): the refusal recorded (the retry waits longer each time until
    the spec changes), the API server's words in the status and a Warning Event."""
    generation = body["metadata"].get("generation", 0)
    state = written or State.load(body["metadata"])[0]
    previous = state.refused
    count = previous.count + 1 if previous and previous.generation == generation else 1
    conflict = refusal.code == 409
    text = say(
        f"the API server refused {refusal.kind} {refusal.name} ({refusal.code} {refusal.reason}): {refusal.message}"
    )
    record = Refusal(generation=generation, count=count, at=now, reason=refusal.reason[:64], message=text)
    state = state.model_copy(update={"refused": None if conflict else record})
    old = dict(body.get("status") or {})
    reason = "Conflict" if conflict else "Refused"
    applied = Condition(
        type="Applied",
        status="False",
        reason=reason,
        message=text,
        last_transition_time=now,
        observed_generation=generation,
    )
    conditions = set_condition(conditions_of(old), applied)
    status = {"phase": old.get("phase") or "Pending", "message": text, "conditions": conditions}
    before = get_condition(old.get("conditions"), "Applied")
    events = [Event("Warning", reason, text)] if (before.get("reason"), before.get("message")) != (reason, text) else []
    actions: list[Action] = [] if conflict else [PatchRun(state.patch(), state)]
    wait = FOREIGN_RETRY_SECONDS if conflict else backoff_seconds(count)
    return Plan(actions, {k: v for k, v in status.items() if old.get(k) != v}, events, wait)


def _terminated(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _raw_int(body: Obj, key: str, default: int) -> int:
    value = (body.get("spec") or {}).get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


class _Pass:
    """One reconcile pass: decides, and accumulates actions, events and the state and status to write."""

    def __init__(self, body: Obj, observed: Observed, now: str, defaults: Defaults) -> None:
        meta = body["metadata"]
        self.body, self.observed, self.now = body, observed, now
        self.name, self.uid, self.generation = meta["name"], meta.get("uid", ""), meta.get("generation", 0)
        self.old: dict[str, Any] = dict(body.get("status") or {})
        self.state, problem = State.load(meta)
        self.problems = [problem] if problem else []
        self.run: Run | None = None
        self.files: render.TrainerFiles | None = None
        try:
            self.run = Run.from_body(body, defaults)
            self.files = render.trainer_files(self.run, observed.recipe_text)
        except ValidationError as err:
            self.problems.append(
                "; ".join(
                    f"spec.{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                    for e in err.errors(include_input=False)
                )
            )
        except ConfigError as err:
            self.problems.append(str(err))
        self.jobs = [j for j in observed.jobs if render.controller_uid(j) == self.uid]
        self.foreign = [j for j in observed.jobs if render.controller_uid(j) != self.uid]
        self.foreign += [
            p for p in observed.pods if (p["metadata"].get("labels") or {}).get(render.RUN_UID_LABEL) != self.uid
        ]
        self.pods = [p for p in observed.pods if p not in self.foreign]
        # The evaluation's Job and pod are no attempt's: attempts never see them.
        self.eval_jobs = [j for j in self.jobs if render.is_evaluation(j)]
        self.eval_pods = [p for p in self.pods if render.is_evaluation(p)]
        self.jobs = [j for j in self.jobs if j not in self.eval_jobs]
        self.pods = [p for p in self.pods if p not in self.eval_pods]
        self.evaluating = False
        self.actions: list[Action] = []
        self.events: list[Event] = []
        self.phase = "Pending"  # every path below decides it
        self.message: str = ""
        self.requeue: float | None = None
        self.conditions: dict[str, Condition] = {}  # by type, as set this pass
        self.step_reported: dict[str, Any] = {}
        self.deleting: set[str] = {j["metadata"]["name"] for j in self.jobs if j["metadata"].get("deletionTimestamp")}
        self.recorded = self.state

    # ------------------------------------------------------------------ decisions

    def step(self) -> None:
        self._recover_attempt()
        self._check_definition()
        self._accept_report()
        if self.state.final is None and self.state.attempt and self.state.ending is None:
            self._watch_attempt()
        if self.state.final is not None:
            self.phase, self.message = self.state.final, self.state.message or ""
            if self.state.final == "Succeeded" and self.run is not None:
                self._evaluate(self.run)
        elif self.state.ending is not None or self.state.attempt == 0:
            self._next_attempt()

    def _evaluate(self, run: Run) -> None:
        decision = evaluation.decide(run, self.state, self.eval_jobs, self.eval_pods, self.now, self.generation)
        if decision is None:
            return
        self.state, self.evaluating, self.requeue = decision.state, decision.pending, decision.requeue
        self.actions += decision.actions
        self.events += decision.events
        self.conditions.update(decision.conditions)
        self.phase, self.message = decision.phase, f"{self.message}; {decision.message}"

    def _recover_attempt(self) -> None:
        """An operator killed after creating an attempt's Job but before recording it: the Job says."""
        highest = max(map(render.attempt_of, self.jobs), default=0)
        if highest > self.state.attempt:
            spec = self.run.spec if self.run else None
            self.state = self.state.model_copy(
                update={
                    "attempt": highest,
                    "ending": None,
                    "previous": self.state.ending,
                    "refused": None,
                    "resume_from": render.resume_of(spec)[0] if spec else self.state.resume_from,
                    "applied": operational_of(spec) if spec else self.state.applied,
                    "start_time": self.state.start_time or self.now,
                }
            )

    def _check_definition(self) -> None:
        if self.run is None or self.files is None:
            return
        definition = definition_of(self.run.spec, self.files.recipe)
        edited = changed(self.state.definition, definition)
        if edited:
            self.problems.append(
                f"{', '.join(f'spec.{key}' for key in edited)} changed after the run started, but what defines the "
                "training is immutable: restore it (attempts keep the recipe they started with) or create a new WMTPRun"
            )
            self.files = None  # the next attempt keeps the ConfigMap rendered before the change

    def _accept_report(self) -> None:
        """Copy what rank 0 of the current attempt reported; a report of another attempt changes nothing, and a
        checkpoint outside this run's root is refused with a warning (once)."""
        report = read_report(self.old)
        if report is None or report.attempt != self.state.attempt or self.state.attempt == 0:
            return
        self.step_reported = {"step": report.step, "loss": report.loss}
        if report.checkpoint:
            self._offer_checkpoint(report.checkpoint)

    def _offer_checkpoint(self, checkpoint: str) -> None:
        if checkpoint == self.state.checkpoint or checkpoint == self.state.rejected:
            return
        base = self.run.spec.checkpoints.base_path if self.run else None
        if base and in_checkpoint_root(checkpoint, base, self.name):
            self.state = self.state.model_copy(update={"checkpoint": checkpoint})
            return
        self.state = self.state.model_copy(update={"rejected": checkpoint})
        self.events.append(
            Event(
                "Warning",
                "CheckpointRejected",
                say(
                    f"reported checkpoint {checkpoint} is not one of this run's (under {base}/{self.name}/"
                    f"{contract.CHECKPOINT_PREFIX}N); it will not be resumed from"
                ),
            )
        )

    def _watch_attempt(self) -> None:
        n = self.state.attempt
        name = render.job_name(self.name, n)
        job = next((j for j in self.jobs if j["metadata"]["name"] == name), None)
        pods = [p for p in self.pods if render.attempt_of(p) == n]
        nodes = int((job or {}).get("spec", {}).get("completions") or (self.run.spec.nodes if self.run else 1))
        if self.run is not None and self.run.spec.suspend:
            self._end(Ending(attempt=n, cause="suspend", reason="Suspended", message="suspended"))
            return
        self._delete_jobs(n - 1)  # a leftover of an earlier attempt (its deletion failed part-way)
        stop = podstat.attempt_stop(job, pods, name)
        if stop is None and job is not None and not podstat.attempt_succeeded(job, pods, nodes):
            stop = self._startup(job, pods, nodes)
        if stop is not None:
            self._stopped(n, stop, pods)
        elif podstat.attempt_succeeded(job, pods, nodes):
            warnings = podstat.warnings(pods)
            for warning in warnings:
                self.events.append(Event("Warning", "TrainerWarning", say(warning)))
            note = f" with warnings: {'; '.join(warnings)}" if warnings else ""
            self._finish("Succeeded", f"attempt {n} succeeded{note}")
        else:
            self.phase, self.message = podstat.progress(pods, nodes, n)
            previous = self.state.previous
            if not pods and previous is not None and previous.cause != "suspend":
                self.phase = "Restarting"
                self.message = f"attempt {n} created after attempt {previous.attempt} {self._ended(previous)}"
            started = self.conditions.get("Started")
            if started is not None and started.status == "False" and started.reason != "Starting":
                self.message = f"{self.message}; {started.message}"  # the kubelet's or the scheduler's words
            self._spec_applied()

    def _startup(self, job: Obj, pods: list[Obj], nodes: int) -> podstat.Stop | None:
        if len(pods) >= nodes and all(map(podstat.started, pods)):
            self._condition("Started", "True", "Started", f"all {nodes} pods started")
            return None
        timeout = self.run.spec.startup_timeout_seconds if self.run else 1800
        stop, waiting = podstat.startup_stop(job, pods, nodes, self.now, timeout, self.observed.account_missing)
        if waiting is not None:
            self._condition("Started", "False", waiting.reason, say(str(waiting)))
        else:
            self._condition("Started", "False", "Starting", f"{sum(map(podstat.started, pods))}/{nodes} pods started")
        age = seconds_since(job["metadata"].get("creationTimestamp"), self.now)
        deadlines = [t - age for t in (min(podstat.MISSING_GRACE_SECONDS, timeout), timeout) if t > age]
        self.requeue = min(deadlines, default=None)
        return stop

    def _stopped(self, n: int, stop: podstat.Stop, pods: list[Obj]) -> None:
        checkpoint = podstat.last_checkpoint(pods)
        if checkpoint:
            self._offer_checkpoint(checkpoint)
        limit = self.run.spec.backoff_limit if self.run else _raw_int(self.body, "backoffLimit", 3)
        if stop.fatal:
            self._finish("Failed", f"attempt {n} cannot start: {stop.message}; no retry fixes this")
            self._delete_jobs(n)  # its pods never started: nothing to keep
        elif not stop.preempted and self.state.restarts >= limit:
            self._finish("Failed", f"attempt {n} failed: {stop.message}; backoffLimit {limit} reached")
        else:
            cause = "preemption" if stop.preempted else "failure"
            self._end(Ending(attempt=n, cause=cause, reason=stop.reason[:64], message=say(stop.message)))

    def _end(self, ending: Ending) -> None:
        """Record the ending first (it carries the count), then delete the attempt's Job."""
        counts = {"failure": ("restarts", 1), "preemption": ("preemptions", 1)}.get(ending.cause)
        update: dict[str, Any] = {"ending": ending}
        if counts:
            update[counts[0]] = getattr(self.state, counts[0]) + counts[1]
        self.state = self.state.model_copy(update=update)
        self._write_state()
        self._delete_jobs(ending.attempt)

    def _finish(self, phase: str, message: str) -> None:
        self.state = self.state.model_copy(
            update={"final": phase, "message": say(message), "completion_time": self.now}
        )
        self._write_state()
        self.phase, self.message = phase, self.state.message or ""

    def _next_attempt(self) -> None:
        ending = self.state.ending
        if ending is not None:
            self._reclassify(ending)
            ending = self.state.ending
            self._delete_jobs(ending.attempt)
            # The fence: attempt N+1 starts once no pod of attempt N runs any more (their SIGTERM saves done).
            alive = [p for p in self.pods if render.attempt_of(p) <= ending.attempt and not _terminated(p)]
            if alive:
                self._hold(ending, f"waiting for {len(alive)} pod(s) of attempt {ending.attempt} to stop")
                return
        if self.run is not None and self.run.spec.suspend:
            self.phase, self.message = "Suspended", "suspended; set spec.suspend to false to resume"
            return
        if self.run is None or (self.state.attempt == 0 and self.files is None):
            self._hold(ending, f"waiting for a valid spec: {'; '.join(self.problems)}")
            return
        if self.foreign:
            names = ", ".join(sorted({o["metadata"]["name"] for o in self.foreign})[:5])
            self.requeue = FOREIGN_RETRY_SECONDS
            why = say(f"objects of an earlier WMTPRun named {self.name} are still being deleted: {names}")
            self._condition("Applied", "False", "Conflict", why)
            self._hold(ending, why)
            return
        refused = self.state.refused
        if refused is not None and refused.generation == self.generation:
            wait = backoff_seconds(refused.count) - seconds_since(refused.at, self.now)
            if wait > 0:
                self.requeue = wait
                self._hold(ending, f"{refused.message}; retrying in {wait:.0f}s, or at once when the spec changes")
                return
        self._create_attempt(ending)

    def _reclassify(self, ending: Ending) -> None:
        """A failure whose attempt turns out to have been disrupted (a pod evicted a moment after another crashed)
        is a preemption: the counts move. The operator's own teardown never disrupts (it deletes), so its
        SIGTERM saves change nothing here."""
        if ending.cause != "failure" or self.state.restarts == 0:
            return
        if any(podstat.disrupted(p) for p in self.pods if render.attempt_of(p) == ending.attempt):
            update = {
                "ending": ending.model_copy(update={"cause": "preemption"}),
                "restarts": self.state.restarts - 1,
                "preemptions": self.state.preemptions + 1,
            }
            self.state = self.state.model_copy(update=update)
            self._write_state()

    def _hold(self, ending: Ending | None, why: str) -> None:
        if ending is not None and ending.cause == "suspend":
            self.phase, self.message = "Suspended", f"suspended; {why}"
        elif ending is not None:
            self.phase = "Restarting"
            self.message = f"attempt {ending.attempt} {self._ended(ending)}; {why}"
        else:
            self.phase, self.message = "Pending", why

    def _create_attempt(self, ending: Ending | None) -> None:
        assert self.run is not None
        spec = self.run.spec
        checkpoint = self.state.checkpoint
        if checkpoint and checkpoint != spec.resume_from:
            self.actions.append(PatchRun({"spec": {"resumeFrom": checkpoint}}))
            spec = spec.model_copy(update={"resume_from": checkpoint})
            self.run = replace(self.run, spec=spec)
        n = self.state.attempt + 1
        objects = render.attempt_objects(self.run, self.files, n)
        if n > 1:  # what the run owns across attempts was created, and checked to be its own, with attempt 1
            objects = [obj for obj in objects if obj["kind"] in ("ConfigMap", "Job")]
        self.actions += [Create(obj, update=obj["kind"] == "ConfigMap") for obj in objects]
        resume = render.resume_of(spec)[0]
        definition = self.state.definition
        if not definition and self.files is not None:
            definition = definition_of(spec, self.files.recipe)
        self.state = self.state.model_copy(
            update={
                "attempt": n,
                "ending": None,
                "previous": ending,
                "resume_from": resume,
                "start_time": self.state.start_time or self.now,
                "applied": operational_of(spec),
                "definition": definition,
                "refused": None,
            }
        )
        self._write_state()
        self._condition("Applied", "True", "Created", f"attempt {n}'s objects exist")
        self._condition("SpecApplied", "True", "Current", f"attempt {n} uses generation {self.generation}")
        if ending is None or ending.cause == "suspend":
            self.phase, self.message = "Pending", f"attempt {n} created; resume: {say(resume)}"
        else:
            self.phase = "Restarting"
            self.message = f"attempt {ending.attempt} {self._ended(ending)}; attempt {n} resumes from {say(resume)}"

    def _spec_applied(self) -> None:
        if self.run is None:
            return
        edited = changed(self.state.applied, operational_of(self.run.spec))
        if edited:
            fields = ", ".join(f"spec.{name}" for name in edited)
            self._condition("SpecApplied", "False", "NextAttempt", f"{fields} changed: applies from the next attempt")
        else:
            self._condition("SpecApplied", "True", "Current", f"attempt {self.state.attempt} uses the current spec")

    def _ended(self, ending: Ending) -> str:
        if ending.cause == "failure":
            return f"failed: {ending.message}; restart {self.state.restarts}/{self._limit()}"
        if ending.cause == "preemption":
            return f"was preempted: {ending.message}; preemption {self.state.preemptions} (not counted as a restart)"
        return "was suspended"

    def _limit(self) -> int:
        return self.run.spec.backoff_limit if self.run else _raw_int(self.body, "backoffLimit", 3)

    # ------------------------------------------------------------------ output

    def _condition(self, type_: str, status: Literal["True", "False"], reason: str, message: str) -> None:
        self.conditions[type_] = Condition(
            type=type_,
            status=status,
            reason=reason,
            message=message,
            last_transition_time=self.now,
            observed_generation=self.generation,
        )

    def _write_state(self) -> None:
        self.actions.append(PatchRun(self.state.patch(), self.state))

    def _delete_jobs(self, up_to: int) -> None:
        for job in self.jobs:
            name = job["metadata"]["name"]
            if render.attempt_of(job) <= up_to and name not in self.deleting:
                self.actions.append(Delete("Job", name, job["metadata"].get("uid", "")))
                self.deleting.add(name)

    def plan(self) -> Plan:
        if self.state != self.recorded and not any(
            isinstance(a, PatchRun) and a.state == self.state for a in self.actions
        ):
            self._write_state()
        max_steps = self.files.recipe.train.max_steps if self.files else self.old.get("maxSteps")
        outcome = Outcome(self.phase, self.message, self.problems, self.conditions, max_steps, self.step_reported)
        new = status_of(self.old, outcome, self.state, self.now, self.generation)
        changes = {key: value for key, value in new.items() if self.old.get(key) != value}
        events = events_of(self.old, new, outcome, self.events)
        return Plan(
            self.actions, changes, events, self.requeue, final=self.state.final is not None and not self.evaluating
        )
