"""The evaluation after training (spec.eval): one Job <run>-eval running `wmtp eval` on the run's final model.

Its pod is a trainer pod without the training: the same image, security context, ServiceAccount (a cloud
identity for S3 works the same), S3 and MLflow settings with credentials by reference and node placement; no API
token (it reports through its termination message alone), no rendezvous, no rendered files. backoffLimit 0: a
failed evaluation is reported, not repeated.

Where the model comes from: a final model in an object store is pulled first (`wmtp pull`, an init container:
parallel, verified) into the model volume, the run's PVC or an emptyDir limited to spec.modelVolume.size as the
trainers' is, never into the container's /tmp; `wmtp eval` then reads that folder. A final model on a path is read
where it is. What it runs on: spec.eval.resources, else the trainers' resources with one GPU where they ask for
GPUs (`wmtp eval` decodes on one device).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wmtp import contract
from wmtp.config import EvalSettings, run_root
from wmtp.contract import GROUP, MODEL_DIR, WORK_DIR
from wmtp_operator import kueue
from wmtp_operator.formats import quantity_value
from wmtp_operator.render.files import mlflow_names
from wmtp_operator.render.objects import labels, metadata
from wmtp_operator.render.pod import (
    SCRATCH_VOLUMES,
    batch_job,
    container,
    escape,
    host_only,
    model_volume,
    mount,
    pod_spec,
    resources_of,
    services_env,
)
from wmtp_operator.sections import Eval
from wmtp_operator.spec import Run

COMPONENT_LABEL = f"{GROUP}/component"
EVALUATION = "eval"  # the component label's value, the Job's suffix and the container's name
PULLED_MODEL = f"{MODEL_DIR}/{contract.FINAL_DIR}"  # where the evaluation pod pulls a final model from a store
SCRATCH_MOUNTS = (mount("tmp", "/tmp"), mount("workspace", WORK_DIR))


def eval_job_name(run_name: str) -> str:
    return f"{run_name}-{EVALUATION}"


def is_evaluation(obj: Mapping[str, Any]) -> bool:
    """An evaluation Job or pod (a training attempt's have no component label)."""
    return (obj.get("metadata", {}).get("labels") or {}).get(COMPONENT_LABEL) == EVALUATION


def final_model(run: Run) -> str:
    """Where the trainer saves the final model: <basePath>/<run>/final (a WMTPRun's recipe cannot move it)."""
    return f"{run_root(run.spec.checkpoints.base_path, run.name)}/{contract.FINAL_DIR}"


def pulls_final_model(run: Run) -> bool:
    """Whether the final model lies in an object store, to be pulled before `wmtp eval` reads it."""
    return final_model(run).startswith("s3://")


def eval_args(run: Run, options: Eval) -> list[str]:
    """`wmtp eval` arguments (`contract.eval_args`), every value from the spec escaped."""
    model = PULLED_MODEL if pulls_final_model(run) else final_model(run)
    settings = {name: getattr(options, name) for name in EvalSettings.model_fields}
    return [escape(arg) for arg in contract.eval_args(model, mlflow_names(run)["experiment"], settings)]


def eval_resources(run: Run) -> dict[str, Any] | None:
    """spec.eval.resources, else spec.resources with at most one of each GPU resource (`*/gpu`): `wmtp eval` decodes
    on one device, and the CPU and memory that load the model stay the trainers'."""
    options, spec = run.spec.eval, run.spec
    assert options is not None
    if options.resources is not None:
        return resources_of(options.resources, init=False)
    resources = resources_of(spec.resources, init=False)
    return resources and {
        kind: {
            key: 1 if key.endswith("/gpu") and quantity_value(value) >= 1 else value for key, value in amounts.items()
        }
        for kind, amounts in resources.items()
    }


def eval_job(run: Run) -> dict[str, Any]:
    spec, options = run.spec, run.spec.eval
    assert options is not None
    own = {**labels(run), COMPONENT_LABEL: EVALUATION}
    pulled = pulls_final_model(run)
    models = [mount("models", MODEL_DIR, read_only=True)] if pulled else []
    evaluator = container(spec, EVALUATION, services_env(spec), [*models, *SCRATCH_MOUNTS])
    evaluator.update(command=list(contract.EVAL_COMMAND), args=eval_args(run, options), workingDir=WORK_DIR)
    resources = eval_resources(run)
    if resources:
        evaluator["resources"] = resources
    scratch = [dict(volume) for volume in SCRATCH_VOLUMES]
    pod = pod_spec(run, [evaluator], [model_volume(run), *scratch] if pulled else scratch)
    if pulled:
        pod["initContainers"] = [_puller(run, resources)]
    meta = metadata(run, eval_job_name(run.name))
    meta["labels"] = {**own, **kueue.labels(spec.queue_name, spec.priority_class_name)}
    return batch_job(run, meta, own, pod, completions=1, parallelism=1, activeDeadlineSeconds=options.timeout_seconds)


def _puller(run: Run, resources: dict[str, Any] | None) -> dict[str, Any]:
    """The init container that pulls the final model into the model volume: no GPU, the evaluator's CPU and memory
    (which cost nothing more: a pod asks for the larger of the two)."""
    puller = container(run.spec, "pull", services_env(run.spec), [mount("models", MODEL_DIR), *SCRATCH_MOUNTS])
    puller["command"] = contract.pull_into_command(escape(final_model(run)), PULLED_MODEL)
    if host := host_only(resources or {}):
        puller["resources"] = host
    return puller
