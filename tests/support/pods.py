"""What a kubelet does with a pod, as pure functions over API objects: test support for `support.node`.

- `runnable_pod`: the kubelet's preparation of a pod: env resolved to values (fieldRef, secretKeyRef,
  configMapKeyRef), `$(VAR)` expanded in command and args (`support.kubelet.expand`), ConfigMap, Secret,
  projected and downward-API volumes as files, emptyDirs as the pod's own folders, and the files a kubelet
  provides (/etc/hosts with the pods' names, the termination log);
- `pod_status`: the pod status a kubelet reports for its containers' states;
- `termination_message`: what it keeps of a container's last words.
"""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.kubelet import expand
from wmtp.contract import SERVICE_ACCOUNT_DIR, TERMINATION_LOG, TERMINATION_MESSAGE_MAX

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
    `api`: {"host", "port", "token", "ca"} of the API server: KUBERNETES_SERVICE_HOST/PORT, the token of the
    pod's ServiceAccount (for projected token volumes and the automount); None leaves them out.
    Raises ConfigurationError for a missing Secret, ConfigMap or key (the kubelet's CreateContainerConfigError).
    """
    meta, spec = pod["metadata"], copy.deepcopy(pod["spec"])
    directory.mkdir(parents=True, exist_ok=True)
    token = api["token"] if api is not None else None
    volumes = [
        _materialise(volume, pod, lookup, directory / "volumes" / volume["name"], claims, token)
        for volume in spec.get("volumes", [])
    ]
    volumes.append(_host_path("kubelet-hosts", _hosts_file(pod, directory, hosts), "File"))
    service_env: list[dict[str, Any]] = []
    automount = api is not None and spec.get("automountServiceAccountToken", True)
    if api is not None:
        service_env = [
            {"name": "KUBERNETES_SERVICE_HOST", "value": api["host"]},
            {"name": "KUBERNETES_SERVICE_PORT", "value": str(api["port"])},
        ]
    if automount:
        account = _write_files(directory / "serviceaccount", {"token": api["token"], "ca.crt": api["ca"],
                                                             "namespace": meta["namespace"]})  # fmt: skip
        volumes.append(_host_path("kubelet-serviceaccount", account, "Directory"))
    logs: dict[str, Path] = {}
    for group in ("initContainers", "containers"):
        for container in spec.get(group, []):
            values = _env_values([*service_env, *container.get("env", [])], container.get("envFrom", []), pod, lookup)
            container["env"] = [{"name": name, "value": value} for name, value in values.items()]
            container.pop("envFrom", None)
            for key in ("command", "args"):
                if key in container:
                    container[key] = [expand(arg, values) for arg in container[key]]
            mounts = container.setdefault("volumeMounts", [])
            mounts.append({"name": "kubelet-hosts", "mountPath": "/etc/hosts", "readOnly": True})
            if automount:
                mounts.append({"name": "kubelet-serviceaccount", "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True})
            log = directory / f"termination-{container['name']}"
            log.write_text("")
            log.chmod(0o666)  # the container's user writes it, whoever that is
            logs[container["name"]] = log
            volumes.append(_host_path(f"kubelet-termination-{container['name']}", log, "File"))
            path = container.get("terminationMessagePath", TERMINATION_LOG)
            mounts.append({"name": f"kubelet-termination-{container['name']}", "mountPath": path})
    spec["volumes"] = volumes
    for key in ("serviceAccountName", "subdomain", "automountServiceAccountToken", "enableServiceLinks"):
        spec.pop(key, None)
    kept = {k: v for k, v in meta.items() if k in ("name", "namespace", "labels", "annotations")}
    return Runnable({"apiVersion": "v1", "kind": "Pod", "metadata": kept, "spec": spec}, logs)


def _hosts_file(pod: Obj, directory: Path, hosts: Mapping[str, str]) -> Path:
    """/etc/hosts as a kubelet writes it (the pod's own names), plus the names cluster DNS would resolve."""
    meta, spec = pod["metadata"], pod["spec"]
    hostname = spec.get("hostname") or meta["name"]
    subdomain = spec.get("subdomain")
    fqdn = f"{hostname}.{subdomain}.{meta['namespace']}.svc.cluster.local" if subdomain else hostname
    lines = ["127.0.0.1\tlocalhost", f"{POD_IP}\t{fqdn} {hostname}"]
    lines += [f"{address}\t{name}" for name, address in hosts.items()]
    lines += [f"{a['ip']}\t{' '.join(a['hostnames'])}" for a in spec.get("hostAliases", [])]
    path = directory / "hosts"
    path.write_text("\n".join(lines) + "\n")
    return path


def _host_path(name: str, path: Path, type_: str) -> dict[str, Any]:
    return {"name": name, "hostPath": {"path": str(path), "type": type_}}


def _write_files(directory: Path, files: Mapping[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for relative, text in files.items():
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(0o644)
    return directory


def _materialise(
    volume: Obj, pod: Obj, lookup: Lookup, directory: Path, claims: Path, token: str | None
) -> dict[str, Any]:
    """ConfigMap, Secret, downward-API and projected volumes become folders of files, emptyDirs a folder of the
    pod's, PVCs a folder per claim; the rest stays as it is."""
    if "projected" in volume:
        sources = volume["projected"]["sources"]
    else:
        sources = [{key: volume[key]} for key in ("configMap", "secret", "downwardAPI") if key in volume]
    if sources:
        files: dict[str, str] = {}
        for source in sources:
            files.update(_source_files(source, pod, lookup, token))
        return _host_path(volume["name"], _write_files(directory, files), "Directory")
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


def _source_files(source: Obj, pod: Obj, lookup: Lookup, token: str | None) -> dict[str, str]:
    """The files one volume source gives: a token, downward-API fields, or a ConfigMap's or Secret's keys."""
    if "serviceAccountToken" in source:
        if token is None:
            raise ConfigurationError("no API server here to issue a service account token")
        return {source["serviceAccountToken"]["path"]: token}
    if "downwardAPI" in source:
        return {item["path"]: _field(pod, item["fieldRef"]["fieldPath"]) for item in source["downwardAPI"]["items"]}
    kind, ref = ("Secret", source["secret"]) if "secret" in source else ("ConfigMap", source["configMap"])
    name = ref.get("secretName") or ref.get("name", "")
    obj = lookup(kind, pod["metadata"]["namespace"], name)
    if obj is None:
        if ref.get("optional"):
            return {}
        raise ConfigurationError(f'{kind.lower()} "{name}" not found')
    data = dict(obj.get("data") or {})
    if kind == "Secret":
        data = {k: _decode(v) for k, v in data.items()}
    files = {}
    for item in ref.get("items") or [{"key": k, "path": k} for k in data]:
        if item["key"] not in data:
            raise ConfigurationError(f"{kind.lower()} {name} has no key {item['key']}")
        files[item["path"]] = data[item["key"]]
    return files


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


def _condition(type_: str) -> dict[str, str]:
    return {"type": type_, "status": "True"}


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
