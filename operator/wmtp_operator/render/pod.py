"""One attempt: an Indexed Job whose pods run `wmtp pull` (init) and `wmtp launch` → torchrun → `wmtp train`.

The pods meet Pod Security "restricted" (non-root, no privilege escalation, no capabilities, RuntimeDefault
seccomp, read-only root; fsGroup makes the model volume writable), and the API token is mounted into the trainer
container alone, the one that reports progress. Every value taken from the spec into argv or env is escaped, so
Kubernetes never expands a `$(VAR)` a user wrote into it.
"""

from __future__ import annotations

from typing import Any

from wmtp import contract
from wmtp.contract import CONFIG_DIR, CONFIG_FILE, MODEL_DIR, PULL_FILE, RECIPE_FILE, WORK_DIR
from wmtp_operator.render.files import weights_on_rank0_only
from wmtp_operator.render.objects import MASTER_PORT, claim_name, config_map_name, job_name, labels, metadata
from wmtp_operator.render.objects import service_account as pod_service_account
from wmtp_operator.sections import Resources
from wmtp_operator.spec import Run, Spec

# The Job controller writes each pod's completion index here; it is the torchrun node rank.
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
TORCH_RENDEZVOUS_TIMEOUT = 600  # seconds torchrun's static rendezvous waits for node 0 by default
# The trainer image's user (Dockerfile.trainer); fsGroup gives it the model volume.
TRAINER_UID = 1000
MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
AWS_CREDENTIALS = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True))
TOKEN_VOLUME = "kube-api-access"
# Deliberate exceptions to the scanner's rules (checkov reads them from the Job), each with its reason.
SCANNER_EXCEPTIONS = {
    "CKV_K8S_15": "the trainer image is pinned by the spec; re-pulling gigabytes on every attempt helps nothing",
    "CKV_K8S_35": "the AWS SDK and MLflow read their credentials from these standard environment variables",
    "CKV_K8S_40": "the trainer image runs as uid 1000 (Dockerfile.trainer), which owns its home directory",
    "CKV_K8S_43": "spec.image is the user's choice; a digest is allowed there but not required",
}


def scanner_annotations() -> dict[str, str]:
    return {
        f"checkov.io/skip{i}": f"{check}={reason}" for i, (check, reason) in enumerate(SCANNER_EXCEPTIONS.items(), 1)
    }


def escape(value: str) -> str:
    """`value` as Kubernetes must pass it on: `$$` is its escape for `$`, so `$(VAR)` stays text."""
    return value.replace("$", "$$")


def resume_of(spec: Spec) -> tuple[str, bool]:
    """Where the next attempt resumes, and whether the operator chose it (then a damaged or pruned checkpoint
    falls back to the newest intact one) rather than the user (then it fails loudly)."""
    return (spec.resume_from, True) if spec.resume_from else (spec.resume, False)


def launcher_grace(termination_grace: int) -> int:
    """The launcher's wait for the workers' SIGTERM save: a little below the pod's, to write its last words."""
    return termination_grace - min(30, max(5, termination_grace // 10))


def trainer_args(run: Run, attempt: int) -> list[str]:
    """`wmtp launch` arguments: its grace, then torchrun's, then `wmtp train`'s."""
    spec = run.spec
    resume, chosen = resume_of(spec)
    torchrun = [
        f"--nnodes={spec.nodes}",
        f"--nproc-per-node={spec.nproc_per_node}",
        f"--node-rank=$({contract.ENV_NODE_RANK})",  # the one expansion the operator wants
        # Indexed Job pods are named <job>-<index> under the headless Service's subdomain.
        f"--master-addr={job_name(run.name, attempt)}-0.{run.name}",
        f"--master-port={MASTER_PORT}",
    ]
    if weights_on_rank0_only(spec):
        # The other nodes pull only small files and wait at the rendezvous while node 0 pulls the weights: as long
        # as a pod may take to start, rather than torch's 600 s, which a slow pull of a 7B model would exceed.
        torchrun.append(f"--rdzv-conf=timeout={max(TORCH_RENDEZVOUS_TIMEOUT, spec.startup_timeout_seconds)}")
    files = f"{CONFIG_DIR}/{CONFIG_FILE}", f"{CONFIG_DIR}/{RECIPE_FILE}"
    torchrun += contract.train_module_args(*files, escape(resume), chosen)
    return contract.launch_args(launcher_grace(spec.termination_grace_period_seconds), torchrun)


def _value(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": escape(value)}


def _secret(name: str, secret: str, optional: bool) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": name, "optional": optional}}}


def _env(run: Run, attempt: int) -> list[dict[str, Any]]:
    return [
        _value(contract.ENV_RUN_NAME, run.name),
        _value(contract.ENV_RUN_NAMESPACE, run.namespace),
        _value(contract.ENV_ATTEMPT, str(attempt)),
        *services_env(run.spec),
    ]


def services_env(spec: Spec) -> list[dict[str, Any]]:
    """What any `wmtp` container of the run needs: S3 and MLflow, credentials by reference only."""
    env = [
        _value("PYTHONUNBUFFERED", "1"),
        # The root filesystem is read-only: caches (HF, torch) go to the scratch volume.
        _value("HOME", WORK_DIR),
    ]
    if spec.s3.endpoint_url:
        env += [
            _value("AWS_ENDPOINT_URL", spec.s3.endpoint_url),
            _value("MLFLOW_S3_ENDPOINT_URL", spec.s3.endpoint_url),
        ]
    if spec.s3.region:
        env += [_value("AWS_REGION", spec.s3.region), _value("AWS_DEFAULT_REGION", spec.s3.region)]
    if spec.s3.credentials_secret:
        env += [_secret(key, spec.s3.credentials_secret, optional) for key, optional in AWS_CREDENTIALS]
    if spec.mlflow.tracking_uri:
        env.append(_value("MLFLOW_TRACKING_URI", spec.mlflow.tracking_uri))
    if spec.mlflow.credentials_secret:
        env += [_secret(key, spec.mlflow.credentials_secret, True) for key in MLFLOW_CREDENTIALS]
    return env


def _token_volume() -> dict[str, Any]:
    """What the kubelet would automount, as a volume the trainer container alone mounts."""
    return {
        "name": TOKEN_VOLUME,
        "projected": {
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
            ]
        },
    }


def volumes(run: Run) -> list[dict[str, Any]]:
    volume = run.spec.model_volume
    if volume.type == "persistentVolumeClaim":
        models: dict[str, Any] = {"persistentVolumeClaim": {"claimName": claim_name(run.name)}}
    else:
        models = {"emptyDir": {"sizeLimit": volume.size} if volume.size is not None else {}}
    return [
        {"name": "config", "configMap": {"name": config_map_name(run.name)}},
        {"name": "models", **models},
        # NCCL and the DataLoader workers exchange tensors through /dev/shm; the container default is 64 MiB.
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
        {"name": "workspace", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        _token_volume(),
    ]


CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": TRAINER_UID,
    "runAsGroup": TRAINER_UID,
    "fsGroup": TRAINER_UID,
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}


def container(spec: Spec, name: str, env: list[dict[str, Any]], mounts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "env": env,
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "models", "mountPath": MODEL_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
            *mounts,
        ],
        "securityContext": dict(CONTAINER_SECURITY),
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "File",
    }


def resources_of(resources: Resources | None, init: bool) -> dict[str, Any] | None:
    """A container's resources; the puller gets the trainer's CPU and memory (a pod's request is the larger of the
    two, so this costs nothing) but no accelerators."""
    if resources is None:
        return None
    dumped = resources.model_dump(exclude_defaults=True)
    if init:
        dumped = {
            kind: {key: value for key, value in amounts.items() if key in ("cpu", "memory", "ephemeral-storage")}
            for kind, amounts in dumped.items()
        }
    return {kind: amounts for kind, amounts in dumped.items() if amounts} or None


def job(run: Run, attempt: int, pull: bool) -> dict[str, Any]:
    """The attempt: all `nodes` pods start together and none is retried alone (backoffLimit 0)."""
    spec = run.spec
    node_rank = {
        "name": contract.ENV_NODE_RANK,
        "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}},
    }
    trainer = container(
        spec,
        "trainer",
        [*_env(run, attempt), node_rank],
        [
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "workspace", "mountPath": WORK_DIR},
            {"name": TOKEN_VOLUME, "mountPath": contract.SERVICE_ACCOUNT_DIR, "readOnly": True},
        ],
    )
    trainer.update(
        command=list(contract.LAUNCH_COMMAND),
        args=trainer_args(run, attempt),
        workingDir=WORK_DIR,
        ports=[{"name": "rendezvous", "containerPort": MASTER_PORT}],
    )
    pod = pod_spec(run, [trainer], volumes(run), subdomain=run.name)
    pod["terminationGracePeriodSeconds"] = spec.termination_grace_period_seconds
    if pull:
        # The node rank decides whether this pod pulls the weights (`weights_on_rank0_only`).
        env = [*_env(run, attempt), dict(node_rank)]
        puller = container(spec, "pull", env, [{"name": "workspace", "mountPath": WORK_DIR}])
        puller["command"] = contract.pull_command(f"{CONFIG_DIR}/{PULL_FILE}")
        pod["initContainers"] = [puller]
        if resources := resources_of(spec.resources, init=True):
            puller["resources"] = resources
    if resources := resources_of(spec.resources, init=False):
        trainer["resources"] = resources
    meta = metadata(run, job_name(run.name, attempt), attempt)
    indexed = {"completionMode": "Indexed", "completions": spec.nodes, "parallelism": spec.nodes}
    return batch_job(run, meta, labels(run, attempt), pod, **indexed)


def pod_spec(run: Run, containers: list[dict[str, Any]], volumes: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """What every pod of a run shares, an attempt's or the evaluation's: never restarted by the kubelet (the
    operator owns retries), the run's identity without an automounted token, the restricted security context and
    the spec's node placement."""
    spec = run.spec
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        **extra,
        "serviceAccountName": pod_service_account(run),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": dict(POD_SECURITY),
        "containers": containers,
        "volumes": volumes,
    }
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations]
    return pod


def batch_job(
    run: Run, meta: dict[str, Any], pod_labels: dict[str, str], pod: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    """The Job around `pod`: never retried by the Job controller (backoffLimit 0: a failed attempt is the
    operator's to count), kept for the spec's TTL, and carrying the scanner's exceptions."""
    template = {"metadata": {"labels": pod_labels}, "spec": pod}
    job_spec: dict[str, Any] = {**fields, "backoffLimit": 0, "template": template}
    if run.spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = run.spec.ttl_seconds_after_finished
    meta["annotations"] = scanner_annotations()
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
