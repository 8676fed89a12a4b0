"""Container runtimes for the test node (`support.node`): what runs a prepared pod and reports its containers.

Test support. The interface is small so that another runtime can plug in: `PodmanRuntime` plays the pod with
`podman kube play` on the host's network; a runtime running the same commands as host processes would implement
the same five methods.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import yaml

from support.pods import ContainerState

IMAGES_DIR = Path(__file__).resolve().parents[2] / "images"
# podman's container states as a kubelet reports them; "created" and anything unknown are waiting.
_STATUSES = {"running": "running", "stopping": "running", "paused": "running", "exited": "terminated",
             "stopped": "terminated"}  # fmt: skip


class Runtime(Protocol):
    def start(self, manifest: dict[str, Any], directory: Path) -> None:
        """Run the pod: init containers in order, then its containers; returns without waiting."""

    def states(self, manifest: dict[str, Any]) -> dict[str, ContainerState]:
        """Every container of the pod that has been created, by container name."""

    def signal(self, manifest: dict[str, Any], container: str, signum: int, grace: float | None = None) -> None:
        """Send `signum` to the container's PID 1; with `grace`, SIGKILL follows if it is still up after that long."""

    def logs(self, manifest: dict[str, Any], container: str) -> str: ...

    def remove(self, manifest: dict[str, Any]) -> None:
        """Stop what still runs at once and forget the pod."""


def podman_env() -> dict[str, str]:
    """The environment for podman calls: the project's containers.conf unless one is given."""
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(IMAGES_DIR / "containers.conf"))}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, env=podman_env(), timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: exit {result.returncode}: {result.stderr.strip()[-2000:]}")
    return result


def _rfc3339(stamp: str | None) -> str | None:
    """podman's nanosecond timestamps as the API's seconds; None for the zero time of a container not run."""
    if not stamp or stamp.startswith("0001-"):
        return None
    return datetime.fromisoformat(stamp[:19]).replace(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


INIT_CONTAINER_TYPE = "io.podman.annotations.init.container.type"


class PodmanRuntime:
    """`podman kube play --network host`: the pods share the host's network, as with `hostNetwork: true`."""

    def __init__(self) -> None:
        self._plays: dict[str, subprocess.Popen] = {}

    @staticmethod
    def _name(manifest: dict[str, Any], container: str) -> str:
        return f"{manifest['metadata']['name']}-{container}"  # how `kube play` names a pod's containers

    def start(self, manifest: dict[str, Any], directory: Path) -> None:
        path = directory / "pod.yaml"
        # `kube play` removes an init container once it has succeeded ("once"); "always" keeps it, so its exit code
        # comes from the engine, as a kubelet reports it, instead of being inferred.
        annotations = {**manifest["metadata"].get("annotations", {}), INIT_CONTAINER_TYPE: "always"}
        played = {**manifest, "metadata": {**manifest["metadata"], "annotations": annotations}}
        path.write_text(yaml.safe_dump(played, sort_keys=False))
        with open(directory / "play.log", "wb") as out:
            self._plays[manifest["metadata"]["name"]] = subprocess.Popen(
                ["podman", "kube", "play", "--network", "host", str(path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=podman_env(),
            )

    def states(self, manifest: dict[str, Any]) -> dict[str, ContainerState]:
        pod = manifest["metadata"]["name"]
        listed = podman("ps", "-a", "--filter", f"pod={pod}", "--format", "{{.Names}}", check=False)
        names = {line for line in listed.stdout.split() if line}
        wanted = {self._name(manifest, c["name"]): c["name"] for c in self._containers(manifest)}
        present = sorted(set(wanted) & names)
        states: dict[str, ContainerState] = {}
        if present:
            inspected = podman("container", "inspect", *present, check=False)
            for info in json.loads(inspected.stdout or "[]"):
                state = info["State"]
                status = _STATUSES.get(state["Status"], "waiting")
                states[wanted[info["Name"]]] = ContainerState(
                    name=wanted[info["Name"]],
                    status=status,
                    exit_code=state["ExitCode"] if status == "terminated" else None,
                    oom_killed=bool(state.get("OOMKilled")),
                    started_at=_rfc3339(state.get("StartedAt")),
                    finished_at=_rfc3339(state.get("FinishedAt")) if status == "terminated" else None,
                )
        play = self._plays.get(pod)
        if play is not None and play.poll() not in (None, 0) and not states:
            # Nothing was created: the kubelet's CreateContainerError, with the runtime's words.
            message = (Path(play.args[-1]).parent / "play.log").read_text(errors="replace").strip()[-1000:]
            for container in self._containers(manifest):
                states[container["name"]] = ContainerState(
                    container["name"], "waiting", reason="CreateContainerError", message=message
                )
            return states
        return states

    def signal(self, manifest: dict[str, Any], container: str, signum: int, grace: float | None = None) -> None:
        name = self._name(manifest, container)
        if signum == signal.SIGTERM and grace is not None:
            podman("stop", "--time", str(int(grace)), name, check=False, timeout=grace + 60)
        else:
            podman("kill", "--signal", str(signum), name, check=False)

    def logs(self, manifest: dict[str, Any], container: str) -> str:
        result = podman("logs", self._name(manifest, container), check=False)
        return result.stdout + result.stderr

    def remove(self, manifest: dict[str, Any]) -> None:
        name = manifest["metadata"]["name"]
        podman("pod", "rm", "--force", name, check=False)
        play = self._plays.pop(name, None)
        if play is not None:
            play.wait(timeout=60)

    @staticmethod
    def _containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
        return [*manifest["spec"].get("initContainers", []), *manifest["spec"]["containers"]]

