"""The evaluation after training (spec.eval): one Job <run>-eval running `wmtp eval` on the run's final model.

Its pod is a trainer pod without the training: the same image, security context, ServiceAccount (a cloud
identity for S3 works the same), S3 and MLflow settings with credentials by reference, node placement and model
volume; no API token (it reports through its termination message alone) and no rendezvous. backoffLimit 0: a
failed evaluation is reported, not repeated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wmtp import contract
from wmtp.config import EvalSettings, run_root
from wmtp.contract import GROUP, WORK_DIR
from wmtp_operator.render.files import mlflow_names
from wmtp_operator.render.objects import labels, metadata
from wmtp_operator.render.pod import batch_job, container, escape, pod_spec, resources_of, services_env, volumes
from wmtp_operator.sections import Eval
from wmtp_operator.spec import Run

COMPONENT_LABEL = f"{GROUP}/component"
EVALUATION = "eval"  # the component label's value, the Job's suffix and the container's name


def eval_job_name(run_name: str) -> str:
    return f"{run_name}-{EVALUATION}"


def is_evaluation(obj: Mapping[str, Any]) -> bool:
    """An evaluation Job or pod (a training attempt's have no component label)."""
    return (obj.get("metadata", {}).get("labels") or {}).get(COMPONENT_LABEL) == EVALUATION


def final_model(run: Run) -> str:
    """Where the trainer saves the final model: <basePath>/<run>/final (a WMTPRun's recipe cannot move it)."""
    return f"{run_root(run.spec.checkpoints.base_path, run.name)}/{contract.FINAL_DIR}"


def eval_args(run: Run, options: Eval) -> list[str]:
    """`wmtp eval` arguments: every `EvalSettings` field as its flag (lists comma-joined, one --dataset per task);
    values from the spec are escaped."""
    args = [contract.EVAL_MODEL_FLAG, escape(final_model(run))]
    args += [contract.EVAL_EXPERIMENT_FLAG, escape(mlflow_names(run)["experiment"])]
    for name in EvalSettings.model_fields:
        value = getattr(options, name)
        if name == "datasets":
            for task, uri in value.items():
                args += [contract.EVAL_DATASET_FLAG, escape(f"{task}={uri}")]
        elif value is not None:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            args += [f"--{name.replace('_', '-')}", escape(text)]
    return args


def eval_job(run: Run) -> dict[str, Any]:
    spec, options = run.spec, run.spec.eval
    assert options is not None
    own = {**labels(run), COMPONENT_LABEL: EVALUATION}
    evaluator = container(spec, EVALUATION, services_env(spec), [{"name": "workspace", "mountPath": WORK_DIR}])
    evaluator.update(command=list(contract.EVAL_COMMAND), args=eval_args(run, options), workingDir=WORK_DIR)
    if resources := resources_of(options.resources or spec.resources, init=False):
        evaluator["resources"] = resources
    pod = pod_spec(run, [evaluator], [v for v in volumes(run) if v["name"] in ("config", "models", "workspace", "tmp")])
    meta = metadata(run, eval_job_name(run.name))
    meta["labels"] = own
    return batch_job(run, meta, own, pod, completions=1, parallelism=1, activeDeadlineSeconds=options.timeout_seconds)
