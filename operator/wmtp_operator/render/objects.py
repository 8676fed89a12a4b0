"""The objects a run owns besides its attempts: names, labels and owner references, the trainer's files in a
ConfigMap, the rendezvous Service, the NetworkPolicy, the model PVC and the per-run identity."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wmtp.contract import CONFIG_FILE, GROUP, KIND, PLURAL, PULL_FILE, RECIPE_FILE, VERSION
from wmtp_operator.render.files import TrainerFiles, dump
from wmtp_operator.spec import Run

MANAGED_BY = "app.kubernetes.io/managed-by"
OPERATOR = "wmtp-operator"
RUN_LABEL = f"{GROUP}/run"
# A run deleted and created again under the same name must never mistake the old run's pods for its own.
RUN_UID_LABEL = f"{GROUP}/run-uid"
ATTEMPT_LABEL = f"{GROUP}/attempt"
MASTER_PORT = 29500


def job_name(run_name: str, attempt: int) -> str:
    return f"{run_name}-a{attempt}"


def config_map_name(run_name: str) -> str:
    return f"{run_name}-config"


def claim_name(run_name: str) -> str:
    return f"{run_name}-models"


def identity_name(run_name: str) -> str:
    """The run's ServiceAccount, Role and RoleBinding."""
    return f"{run_name}-trainer"


def service_account(run: Run) -> str:
    """The trainer pods' ServiceAccount: the one the spec names, else the run's own."""
    return run.spec.service_account_name or identity_name(run.name)


def labels(run: Run, attempt: int | None = None) -> dict[str, str]:
    out = {MANAGED_BY: OPERATOR, RUN_LABEL: run.name, RUN_UID_LABEL: run.uid}
    return out if attempt is None else {**out, ATTEMPT_LABEL: str(attempt)}


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the object's controller (its ownerReference with controller: true), if any."""
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return next((ref.get("uid") for ref in refs if ref.get("controller")), None)


def attempt_of(obj: Mapping[str, Any]) -> int:
    """The attempt a Job or pod belongs to (its label), 0 when it has none."""
    value = (obj.get("metadata", {}).get("labels") or {}).get(ATTEMPT_LABEL, "")
    return int(value) if value.isdigit() else 0


def owner_reference(run: Run) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": run.name,
        "uid": run.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(run: Run, name: str, attempt: int | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": run.namespace,
        "labels": labels(run, attempt),
        "ownerReferences": [owner_reference(run)],
    }


def config_map(run: Run, files: TrainerFiles) -> dict[str, Any]:
    data = {
        CONFIG_FILE: dump(files.config.model_dump(mode="json")),
        RECIPE_FILE: dump(files.recipe.model_dump(mode="json")),
    }
    if files.pulls:
        data[PULL_FILE] = dump(files.pulls)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(run, config_map_name(run.name)), "data": data}


def service(run: Run) -> dict[str, Any]:
    """Headless: gives each pod of an attempt a stable DNS name, rank 0's being the rendezvous address."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(run, run.name),
        "spec": {
            "clusterIP": "None",
            # Ranks must find rank 0 before any of them is Ready.
            "publishNotReadyAddresses": True,
            "selector": labels(run),
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
        },
    }


def network_policy(run: Run) -> dict[str, Any]:
    """Only the run's own pods reach its pods (rendezvous, NCCL); what they reach out to is left open (S3,
    MLflow, the API server)."""
    own = {"matchLabels": labels(run)}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(run, run.name),
        "spec": {"podSelector": own, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": own}]}]},
    }


def model_claim(run: Run) -> dict[str, Any] | None:
    volume = run.spec.model_volume
    if volume.type != "persistentVolumeClaim":
        return None
    spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": volume.size}}}
    if volume.storage_class_name:
        spec["storageClassName"] = volume.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(run, claim_name(run.name)),
        "spec": spec,
    }


def identity(run: Run) -> list[dict[str, Any]]:
    """What the trainer pods may do: patch this run's status, nothing else (rank 0 reports progress). The
    ServiceAccount is the run's own unless the spec names one (e.g. for a cloud identity); either is bound."""
    name = identity_name(run.name)
    objects: list[dict[str, Any]] = []
    if not run.spec.service_account_name:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": metadata(run, name),
                # The token is mounted where it is used: the trainer container alone (render.pod).
                "automountServiceAccountToken": False,
            }
        )
    rule = {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "resourceNames": [run.name], "verbs": ["patch"]}
    objects.append(
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": metadata(run, name), "rules": [rule]}
    )
    objects.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata(run, name),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": service_account(run), "namespace": run.namespace}],
        }
    )
    return objects
