"""A pass's view of a run, read once: its spec parsed (or why it cannot be used), the state record, and its
children sorted by whose they are. Every step reads this and nothing else.

Children are this run's only when it controls them (Jobs) or they carry its uid (pods): a namesake's, left by
an earlier WMTPRun of the same name, are only ever waited for. The evaluation's Job and pod are no attempt's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from wmtp.config import ConfigError
from wmtp_operator import render
from wmtp_operator.formats import duration_seconds
from wmtp_operator.plan import Delete, Observed
from wmtp_operator.spec import Defaults, Run, Spec
from wmtp_operator.state import State, changed, definition_of, trusted_resume_from
from wmtp_operator.status import Condition, checkpoint_step

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class View:
    """What one pass knows of the run; the steps' only input besides the record they are handed."""

    name: str
    generation: int
    now: str
    old: Obj  # the status as found: the operator's last write, or whatever a trainer wrote over it
    recorded: State  # the state annotation as found
    run: Run | None  # None: the spec cannot be parsed (`problems` says why)
    files: render.TrainerFiles | None  # None also once what defines the training changed: keep what was rendered
    problems: tuple[str, ...]  # why the spec, the recipe or the record cannot be used (Valid=False)
    jobs: tuple[Obj, ...]  # this run's attempts'
    pods: tuple[Obj, ...]
    eval_jobs: tuple[Obj, ...]  # this run's evaluation's
    eval_pods: tuple[Obj, ...]
    foreign: tuple[Obj, ...]  # a namesake's Jobs and pods
    account_missing: str | None  # the ServiceAccount the spec names, when it does not exist
    account: Obj | None  # the ServiceAccount the spec names, as read
    operator_account: str | None  # namespace/name of the operator's own ServiceAccount
    backoff_limit: int  # the spec's, or its raw value when the spec cannot be parsed
    startup_timeout: int  # seconds
    image_pull_deadline: int  # seconds

    def condition(self, type_: str, status: Literal["True", "False"], reason: str, message: str) -> Condition:
        """A condition as this pass sets it (an unchanged status keeps its older transition time)."""
        return Condition(
            type=type_,
            status=status,
            reason=reason,
            message=message,
            last_transition_time=self.now,
            observed_generation=self.generation,
        )

    def checkpoint_step(self, uri: str | None) -> int | None:
        """The step of `uri` when it is one of this run's checkpoints (<basePath>/<run>/checkpoint_step_N)."""
        base = self.run.spec.checkpoints.base_path if self.run else None
        return checkpoint_step(uri, base, self.name) if uri and base else None

    def deletes(self, up_to: int) -> tuple[Delete, ...]:
        """Deleting this run's attempt Jobs up to attempt `up_to`, but for those already being deleted."""
        deleting = {job["metadata"]["name"] for job in self.jobs if job["metadata"].get("deletionTimestamp")}
        return tuple(
            Delete("Job", job["metadata"]["name"], job["metadata"].get("uid", ""))
            for job in self.jobs
            if render.attempt_of(job) <= up_to and job["metadata"]["name"] not in deleting
        )


def view_of(body: Obj, observed: Observed, now: str, defaults: Defaults = Defaults()) -> View:
    meta = body["metadata"]
    uid = meta.get("uid", "")
    recorded, unreadable = State.load(meta)
    run, files, problem = _spec(body, observed, defaults, recorded)
    run, ignored = trusted_resume_from(run, recorded)
    jobs = [j for j in observed.jobs if render.controller_uid(j) == uid]
    pods = [p for p in observed.pods if (p["metadata"].get("labels") or {}).get(render.RUN_UID_LABEL) == uid]
    foreign = [j for j in observed.jobs if render.controller_uid(j) != uid]
    foreign += [p for p in observed.pods if (p["metadata"].get("labels") or {}).get(render.RUN_UID_LABEL) != uid]
    return View(
        name=meta["name"],
        generation=meta.get("generation", 0),
        now=now,
        old=dict(body.get("status") or {}),
        recorded=recorded,
        run=run,
        files=files,
        problems=tuple(p for p in (unreadable, problem, ignored) if p),
        jobs=tuple(j for j in jobs if not render.is_evaluation(j)),
        pods=tuple(p for p in pods if not render.is_evaluation(p)),
        eval_jobs=tuple(filter(render.is_evaluation, jobs)),
        eval_pods=tuple(filter(render.is_evaluation, pods)),
        foreign=tuple(foreign),
        account_missing=observed.account_missing,
        account=observed.account,
        operator_account=defaults.operator_account,
        backoff_limit=run.spec.backoff_limit if run else _raw_int(body, "backoffLimit", _default("backoff_limit")),
        startup_timeout=run.spec.startup_timeout_seconds if run else duration_seconds(_default("startup_timeout")),
        image_pull_deadline=(
            run.spec.image_pull_deadline_seconds if run else duration_seconds(_default("image_pull_deadline"))
        ),
    )


def _spec(
    body: Obj, observed: Observed, defaults: Defaults, recorded: State
) -> tuple[Run | None, render.TrainerFiles | None, str | None]:
    """The run and its rendered files, and why they cannot be used: an invalid spec (no run), an invalid recipe
    or an edit of what defines the training (the run, but no files: attempts keep the ConfigMap they have)."""
    run = None
    try:
        run = Run.from_body(body, defaults)
        files = render.trainer_files(run, observed.recipe_text)
    except ValidationError as err:
        return run, None, _invalid(err)
    except ConfigError as err:
        return run, None, str(err)
    edited = changed(recorded.definition, definition_of(run.spec, files.recipe))
    if not edited:
        return run, files, None
    fields = ", ".join(f"spec.{key}" for key in edited)
    why = f"{fields} changed after the run started, but what defines the training is immutable: restore it "
    return run, None, why + "(attempts keep the recipe they started with) or create a new WMTPRun"


def _invalid(err: ValidationError) -> str:
    return "; ".join(
        f"spec.{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
        for e in err.errors(include_input=False)
    )


def _default(field: str) -> Any:
    """The spec's default for `field`, for a run whose spec cannot be parsed."""
    return Spec.model_fields[field].default


def _raw_int(body: Obj, key: str, default: int) -> int:
    """A spec field as the body holds it, for a run whose spec cannot be parsed."""
    value = (body.get("spec") or {}).get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default
