"""Pure rendering: a WMTPRun → the trainer's files and the Kubernetes objects of one attempt.

Nothing here talks to the cluster. `files` builds the trainer's config and recipe with the trainer's own models;
`objects` what a run owns across attempts; `pod` the attempt's Job; `evaluation` the Job that evaluates the final
model.
"""

from __future__ import annotations

from typing import Any

from wmtp_operator.render.evaluation import (
    EVALUATION,
    PULLED_MODEL,
    eval_job,
    eval_job_name,
    final_model,
    is_evaluation,
)
from wmtp_operator.render.files import TrainerFiles, has_gpus, pulls, recipe_source, trainer_files
from wmtp_operator.render.objects import (
    ATTEMPT_LABEL,
    MANAGED_BY,
    MASTER_PORT,
    OPERATOR,
    RUN_LABEL,
    RUN_UID_LABEL,
    attempt_of,
    claim_name,
    config_map,
    config_map_name,
    controller_uid,
    identity,
    identity_name,
    job_name,
    labels,
    model_claim,
    network_policy,
    owner_reference,
    service,
    service_account,
)
from wmtp_operator.render.pod import INDEX_ANNOTATION, escape, job, launcher_grace, resume_of, trainer_args
from wmtp_operator.spec import Run

__all__ = [
    "ATTEMPT_LABEL",
    "EVALUATION",
    "INDEX_ANNOTATION",
    "MANAGED_BY",
    "MASTER_PORT",
    "OPERATOR",
    "PULLED_MODEL",
    "RUN_LABEL",
    "RUN_UID_LABEL",
    "TrainerFiles",
    "attempt_objects",
    "attempt_of",
    "claim_name",
    "config_map",
    "config_map_name",
    "controller_uid",
    "escape",
    "eval_job",
    "eval_job_name",
    "final_model",
    "has_gpus",
    "identity",
    "identity_name",
    "is_evaluation",
    "job",
    "job_name",
    "labels",
    "launcher_grace",
    "model_claim",
    "network_policy",
    "owner_reference",
    "pulls",
    "recipe_source",
    "resume_of",
    "service",
    "service_account",
    "trainer_args",
    "trainer_files",
]


def attempt_objects(run: Run, files: TrainerFiles | None, attempt: int) -> list[dict[str, Any]]:
    """Everything attempt `attempt` needs, in creation order (the Job last: its pods need the rest). Without
    files (the recipe became unreadable mid-run) the attempt keeps the ConfigMap the last valid one rendered."""
    claim = model_claim(run)
    return [
        *([config_map(run, files)] if files else []),
        service(run),
        network_policy(run),
        *identity(run),
        *([claim] if claim else []),
        job(run, attempt, pull=bool(pulls(run.spec))),
    ]
