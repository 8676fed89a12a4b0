"""What the Job controller and the kubelet do with an attempt's Job, as pure functions over API objects.

Test support for `support.kubelet`, which runs the result with a container runtime:
- `job_pods`: the Job controller's pods of an Indexed Job (completion index annotation, env and hostname);
- `job_status`: the Job controller's view of them (Complete, or Failed past backoffLimit);
- `runnable_pod`: the kubelet's preparation of a pod: env resolved to values (fieldRef, secretKeyRef,
  configMapKeyRef), `$(VAR)` expanded in command and args, ConfigMap and Secret volumes as files, and the files
  a kubelet provides (/etc/hosts with the pods' names, the termination log, the service account token);
- `pod_status`: the pod status a kubelet reports for its containers' states.
"""

from __future__ import annotations

import base64
import copy
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wmtp_operator.render import INDEX_ANNOTATION

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_MESSAGE_MAX = 4096  # what a kubelet keeps of a termination message
LOG_TAIL_LINES, LOG_TAIL_BYTES = 80, 2048  # FallbackToLogsOnError: the end of the log, as a kubelet takes it
POD_IP = "127.0.0.1"  # every pod shares the host's network here

Obj = Mapping[str, Any]
Lookup = Callable[[str, str, str], Obj | None]  # (kind, namespace, name) → object or None


@dataclass(frozen=True)
class ContainerState:
    """A container as the runtime sees it."""

    name: str
    status: str  # waiting | running | terminated
    reason: str = ""  # why it is waiting (CreateContainerError, ...)
    message: str = ""
    exit_code: int | None = None
    oom_killed: bool = False
    started_at: str | None = None
    finished_at: str | None = None


@dataclass
class Runnable:
    """A pod ready for a runtime: a Pod manifest whose env are values and whose kubelet-made files are host
    paths (hostPath volumes), and the host files the kubelet reads back (termination logs by container)."""

    manifest: dict[str, Any]
    termination_logs: dict[str, Path] = field(default_factory=dict)


class ConfigurationError(ValueError):
    """What a kubelet reports as CreateContainerConfigError: a missing Secret, ConfigMap or key."""


# ----------------------------------------------------------------------------- the Job controller


def job_pods(job: Obj) -> list[dict[str, Any]]:
    """One Pending pod per completion index, as the Job controller creates them for an Indexed Job."""
    meta, spec = job["metadata"], job["spec"]
    template = copy.deepcopy(spec["template"])
    pods = []
    for index in range(spec.get("completions", 1)):
        pod_spec = copy.deepcopy(template["spec"])
        if spec.get("completionMode") == "Indexed":
            pod_spec.setdefault("hostname", f"{meta['name']}-{index}")
            for container in [*pod_spec.get("initContainers", []), *pod_spec["containers"]]:
                ref = {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}
                container["env"] = [*container.get("env", []), {"name": "JOB_COMPLETION_INDEX", "valueFrom": ref}]
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta.get("uid", "")}
        pods.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{meta['name']}-{index}-{uuid.uuid4().hex[:5]}",
                    "namespace": meta["namespace"],
                    "labels": {**template["metadata"].get("labels", {}), JOB_NAME_LABEL: meta["name"]},
                    "annotations": {**template["metadata"].get("annotations", {}), INDEX_ANNOTATION: str(index)},
                    "ownerReferences": [{**owner, "controller": True, "blockOwnerDeletion": True}],
                },
                "spec": pod_spec,
                "status": {"phase": "Pending", "conditions": [_condition("PodScheduled")]},
            }
        )
    return pods


def job_status(job: Obj, pods: Sequence[Obj]) -> dict[str, Any]:
    """The Job's status from its pods: Complete when every index succeeded, Failed once more pods failed than
    backoffLimit allows (then the controller also deletes the others: see `job_failed`)."""
    phases = [(p.get("status") or {}).get("phase") for p in pods]
    status: dict[str, Any] = {
        "active": sum(phase in ("Pending", "Running") for phase in phases),
        "succeeded": phases.count("Succeeded"),
        "failed": phases.count("Failed"),
    }
    if status["failed"] > job["spec"].get("backoffLimit", 6):
        status["conditions"] = [_condition("Failed", "BackoffLimitExceeded", "Job has reached the backoff limit")]
    elif status["succeeded"] >= job["spec"].get("completions", 1):
        status["conditions"] = [_condition("Complete")]
    return status


def job_failed(status: Obj) -> bool:
    return any(c["type"] == "Failed" for c in status.get("conditions", []))


def _condition(type_: str, reason: str = "", message: str = "") -> dict[str, str]:
    condition = {"type": type_, "status": "True"}
    return {**condition, "reason": reason, "message": message} if reason else condition


# ----------------------------------------------------------------------------- the kubelet


def runnable_pod(
    pod: Obj,
    lookup: Lookup,
    directory: Path,
    hosts: Mapping[str, str],
    claims: Path,
    api: Mapping[str, str] | None = None,
) -> Runnable:
    """The pod as a kubelet would start it, its files written under `directory`.

    `hosts`: name → address for /etc/hosts (the Service's pod names, as cluster DNS resolves them).
    `claims`: the folder holding one folder per PersistentVolumeClaim, shared by the pods that mount it.
    `api`: {"host", "port", "token", "ca"} of the API server, for the service-account mount and
    KUBERNETES_SERVICE_HOST/PORT; None leaves them out. Raises ConfigurationError for a missing reference.
    """
    meta, spec = pod["metadata"], copy.deepcopy(pod["spec"])
    namespace = meta["namespace"]
    directory.mkdir(parents=True, exist_ok=True)
    volumes: list[dict[str, Any]] = []
    for volume in spec.get("volumes", []):
        volumes.append(_materialise(volume, namespace, lookup, directory / "volumes" / volume["name"], claims))
    hosts_file = directory / "hosts"
    hostname = spec.get("hostname") or meta["name"]
    fqdn = f"{hostname}.{spec['subdomain']}.{namespace}.svc.cluster.local" if spec.get("subdomain") else hostname
    lines = ["127.0.0.1\tlocalhost", f"{POD_IP}\t{fqdn} {hostname}"]
    lines += [f"{address}\t{name}" for name, address in hosts.items()]
    lines += [f"{a['ip']}\t{' '.join(a['hostnames'])}" for a in spec.get("hostAliases", [])]
    hosts_file.write_text("\n".join(lines) + "\n")
    volumes.append(_host_path("kubelet-hosts", hosts_file, "File"))
    extra_env: list[dict[str, Any]] = []
    if api is not None and spec.get("automountServiceAccountToken", True):
        account = directory / "serviceaccount"
        account.mkdir(exist_ok=True)
        (account / "token").write_text(api["token"])
        (account / "ca.crt").write_text(api["ca"])
        (account / "namespace").write_text(namespace)
        volumes.append(_host_path("kubelet-serviceaccount", account, "Directory"))
        extra_env = [
            {"name": "KUBERNETES_SERVICE_HOST", "value": api["host"]},
            {"name": "KUBERNETES_SERVICE_PORT", "value": str(api["port"])},
        ]
    logs: dict[str, Path] = {}
    for group in ("initContainers", "containers"):
        for container in spec.get(group, []):
            env = [*extra_env, *container.get("env", [])]
            values = _env_values(env, container.get("envFrom", []), pod, lookup)
            container["env"] = [{"name": name, "value": value} for name, value in values.items()]
            container.pop("envFrom", None)
            for key in ("command", "args"):
                if key in container:
                    container[key] = [expand(arg, values) for arg in container[key]]
            mounts = container.setdefault("volumeMounts", [])
            mounts.append({"name": "kubelet-hosts", "mountPath": "/etc/hosts", "readOnly": True})
            if extra_env:
                mounts.append({"name": "kubelet-serviceaccount", "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True})
            log = directory / f"termination-{container['name']}"
            log.write_text("")
            log.chmod(0o666)  # the container's user writes it, whoever that is
            logs[container["name"]] = log
            volumes.append(_host_path(f"kubelet-termination-{container['name']}", log, "File"))
            path = container.get("terminationMessagePath", TERMINATION_LOG)
            mounts.append({"name": f"kubelet-termination-{container['name']}", "mountPath": path})
    spec["volumes"] = volumes
    spec.pop("serviceAccountName", None)
    spec.pop("subdomain", None)
    kept = {k: v for k, v in meta.items() if k in ("name", "namespace", "labels", "annotations")}
    return Runnable({"apiVersion": "v1", "kind": "Pod", "metadata": kept, "spec": spec}, logs)


def _host_path(name: str, path: Path, type_: str) -> dict[str, Any]:
    return {"name": name, "hostPath": {"path": str(path), "type": type_}}


def _materialise(volume: Obj, namespace: str, lookup: Lookup, directory: Path, claims: Path) -> dict[str, Any]:
    """ConfigMap and Secret volumes become folders of files, emptyDirs a folder of the pod's, PVCs a folder per
    claim; the rest stays as it is."""
    for kind, key, field_name in (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName")):
        if key in volume:
            source = volume[key]
            obj = lookup(kind, namespace, source[field_name])
            if obj is None:
                if source.get("optional"):
                    return {"name": volume["name"], "emptyDir": {}}
                raise ConfigurationError(f'{kind.lower()} "{source[field_name]}" not found')
            data = dict(obj.get("data") or {})
            if kind == "Secret":
                data = {k: _decode(v) for k, v in data.items()}
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            directory.mkdir(parents=True, exist_ok=True)
            for item in items:
                if item["key"] not in data:
                    raise ConfigurationError(f"{kind.lower()} {source[field_name]} has no key {item['key']}")
                target = directory / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(data[item["key"]])
                target.chmod(0o644)
            return _host_path(volume["name"], directory, "Directory")
    if "persistentVolumeClaim" in volume:
        # One folder per claim, shared by every pod that mounts it: a ReadWriteMany volume.
        folder = claims / volume["persistentVolumeClaim"]["claimName"]
    elif "emptyDir" in volume:
        # The pod's own folder, as a kubelet makes it (a runtime's named volumes would be shared across pods).
        folder = directory
    else:
        return dict(volume)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o777)  # emptyDirs are world-writable: the container's user, whoever it is, writes there
    return _host_path(volume["name"], folder, "Directory")


def _decode(value: str) -> str:
    return base64.b64decode(value).decode()


def _env_values(env: Sequence[Obj], env_from: Sequence[Obj], pod: Obj, lookup: Lookup) -> dict[str, str]:
    namespace = pod["metadata"]["namespace"]
    values: dict[str, str] = {}
    for source in env_from:
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in source:
                obj = lookup(kind, namespace, source[key]["name"]) or {}
                data = obj.get("data") or {}
                values.update({k: _decode(v) if kind == "Secret" else v for k, v in data.items()})
    for var in env:
        if "value" in var:
            values[var["name"]] = expand(str(var["value"]), values)
            continue
        ref = var.get("valueFrom", {})
        value = _field(pod, ref["fieldRef"]["fieldPath"]) if "fieldRef" in ref else _key_ref(ref, namespace, lookup)
        if value is not None:
            values[var["name"]] = value
    return values


def _key_ref(ref: Obj, namespace: str, lookup: Lookup) -> str | None:
    kind, key = ("Secret", "secretKeyRef") if "secretKeyRef" in ref else ("ConfigMap", "configMapKeyRef")
    selector = ref[key]
    obj = lookup(kind, namespace, selector["name"])
    data = (obj or {}).get("data") or {}
    if selector["key"] not in data:
        if selector.get("optional"):
            return None
        what = f'{kind.lower()} "{selector["name"]}"'
        missing = f"{what} not found" if obj is None else f"couldn't find key {selector['key']} in {what}"
        raise ConfigurationError(missing)
    value = data[selector["key"]]
    return _decode(value) if kind == "Secret" else value


_FIELD = re.compile(r"metadata\.(labels|annotations)\['([^']+)'\]")


def _field(pod: Obj, path: str) -> str:
    meta = pod["metadata"]
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": "localhost",
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.podIP": POD_IP,
        "status.hostIP": POD_IP,
    }
    if path in simple:
        return simple[path]
    match = _FIELD.fullmatch(path)
    if match is None:
        raise ConfigurationError(f"unsupported fieldRef {path}")
    return (meta.get(match.group(1)) or {}).get(match.group(2), "")


_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, values: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined variables are replaced, `$$` escapes, the rest stays as written."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return values.get(match.group(1), match.group(0))

    return _REFERENCE.sub(one, text)


def pod_status(pod: Obj, states: Mapping[str, ContainerState], messages: Mapping[str, str]) -> dict[str, Any]:
    """The status a kubelet reports for a `restartPolicy: Never` pod whose containers are in `states`."""
    spec = pod["spec"]
    inits = [c["name"] for c in spec.get("initContainers", [])]
    mains = [c["name"] for c in spec["containers"]]
    init_done = all(_ended(states.get(n)) == 0 for n in inits)
    init_failed = any(_ended(states.get(n)) not in (None, 0) for n in inits)
    waiting = "PodInitializing" if inits and not init_done else "ContainerCreating"
    status: dict[str, Any] = {
        "phase": "Pending",
        "podIP": POD_IP,
        "hostIP": POD_IP,
        "containerStatuses": [_container_status(n, states.get(n), messages.get(n, ""), waiting) for n in mains],
    }
    if inits:
        status["initContainerStatuses"] = [
            _container_status(n, states.get(n), messages.get(n, ""), "PodInitializing") for n in inits
        ]
    ended = [_ended(states.get(n)) for n in mains]
    if init_failed or (None not in ended and any(code != 0 for code in ended)):
        status["phase"] = "Failed"
    elif None not in ended:
        status["phase"] = "Succeeded"
    elif init_done and any(states.get(n) and states[n].status != "waiting" for n in mains):
        status["phase"] = "Running"
    ready = status["phase"] == "Running" and all(states.get(n) and states[n].status == "running" for n in mains)
    status["conditions"] = [
        _condition("PodScheduled"),
        {"type": "Initialized", "status": str(init_done)},
        {"type": "ContainersReady", "status": str(ready)},
        {"type": "Ready", "status": str(ready)},
    ]
    return status


def _ended(state: ContainerState | None) -> int | None:
    return state.exit_code if state is not None and state.status == "terminated" else None


def _container_status(name: str, state: ContainerState | None, message: str, waiting: str) -> dict[str, Any]:
    status: dict[str, Any] = {"name": name, "restartCount": 0, "ready": bool(state and state.status == "running")}
    if state is None or state.status == "waiting":
        reason = state.reason if state is not None and state.reason else waiting
        detail = {"message": state.message} if state is not None and state.message else {}
        status["state"] = {"waiting": {"reason": reason, **detail}}
    elif state.status == "running":
        status["state"] = {"running": {"startedAt": state.started_at}}
    else:
        reason = "OOMKilled" if state.oom_killed else "Completed" if state.exit_code == 0 else "Error"
        ended: dict[str, Any] = {"exitCode": state.exit_code, "reason": reason}
        ended.update({"startedAt": state.started_at, "finishedAt": state.finished_at})
        if message:
            ended["message"] = message
        status["state"] = {"terminated": ended}
    return status


def termination_message(pod: Obj, container: str, log_file: Path, logs: Callable[[], str], failed: bool) -> str:
    """What a kubelet puts in `state.terminated.message`: the termination log file, else with
    `terminationMessagePolicy: FallbackToLogsOnError` the end of a failed container's log."""
    text = log_file.read_bytes()[:TERMINATION_MESSAGE_MAX].decode(errors="replace") if log_file.exists() else ""
    containers = [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]
    spec = next(c for c in containers if c["name"] == container)
    if not text and failed and spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        text = "\n".join(logs().splitlines()[-LOG_TAIL_LINES:])[-LOG_TAIL_BYTES:]
    return text
