"""Where the end-to-end story (tests/e2e/test_story.py) plays: one interface, two clusters.

Test support. `LocalCluster` (`make e2e-local`): the emulator as API server, Job controller and garbage
collector, `support.node` running the pods with podman, the operator from its image (`OperatorContainer`), S3
and MLflow on the host. `KindCluster` (`make e2e-kind`): a real cluster that tests/e2e/kind.sh has set up
(images loaded, chart installed, S3 and MLflow inside it), reached with kubectl; containers are stopped and
killed through the node's container runtime (crictl), as a kubelet would. The story asks both the same things
and asserts the same.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from support.emulator import Emulator
from support.node import Node, wait_until
from support.runtime import PodmanRuntime, podman
from support.secure_api import SecureApi
from support.waiting import answers, free_port, wait_for


class StoryCluster(Protocol):
    namespace: str

    def create(self, obj: dict[str, Any]) -> None: ...

    def get(self, kind: str, name: str) -> dict[str, Any] | None: ...

    def pods(self, **labels: str) -> list[dict[str, Any]]: ...

    def events(self, name: str) -> list[str]:
        """The reasons of the Events about the object `name`, oldest first."""

    def logs(self, pod: str) -> str:
        """The trainer container's output so far ("" before it starts)."""

    def last_status(self, pod: str) -> dict[str, Any]:
        """The pod's last status seen, even once the pod is gone."""

    def stop_container(self, pod: str) -> None:
        """SIGTERM to the trainer container, SIGKILL after the pod's grace period."""

    def kill_container(self, pod: str) -> None:
        """SIGKILL to the trainer container."""

    def denied(self) -> list[str] | None:
        """API requests from pods that RBAC refused, where the cluster can say (None where it cannot)."""

    def operator_user(self) -> str: ...

    def wait(self, check: Any, what: str, timeout: float) -> Any: ...

    def diagnosis(self) -> str: ...

    def close(self) -> None: ...


def reasons(events: list[dict[str, Any]], name: str) -> list[str]:
    """The reasons of the Events about `name`, oldest first: timestamps have whole seconds, so the order within one
    second is the API server's write order (resourceVersion: etcd's revision on a real cluster)."""
    about = [e for e in events if e["involvedObject"]["name"] == name]
    about.sort(key=lambda e: (e.get("firstTimestamp") or e["metadata"]["creationTimestamp"],
                              int(e["metadata"]["resourceVersion"])))  # fmt: skip
    return [e["reason"] for e in about]


class OperatorContainer:
    """The operator image run with podman against the emulator, as its Deployment runs it: non-root, read-only
    root filesystem, no capabilities; on the host's network, with a kubeconfig naming the emulator."""

    def __init__(self, emulator: Emulator, image: str, directory: Path, mlflow: str | None = None) -> None:
        """`mlflow`: the tracking server for runs that name none, as the chart's own server is."""
        directory.mkdir(parents=True, exist_ok=True)
        kubeconfig = emulator.kubeconfig(directory)
        kubeconfig.chmod(0o644)
        self.name = f"wmtp-e2e-operator-{uuid.uuid4().hex[:8]}"
        self.liveness = f"http://127.0.0.1:{free_port()}/healthz"
        podman(
            "run", "--detach", "--pull=never", "--name", self.name, "--network", "host",
            "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--volume", f"{kubeconfig}:/etc/wmtp-e2e/kubeconfig:ro", "--env", "KUBECONFIG=/etc/wmtp-e2e/kubeconfig",
            *(["--env", f"WMTP_DEFAULT_MLFLOW_URI={mlflow}"] if mlflow else []),
            image, "--standalone", f"--liveness={self.liveness}", f"--metrics-port={free_port()}",
        )  # fmt: skip
        wait_for(self.alive, timeout=60, interval=0.2, what=f"the operator's liveness endpoint ({self.name})")

    def alive(self) -> bool:
        state = podman("inspect", "--format", "{{.State.Status}}", self.name, check=False).stdout.strip()
        if state not in ("running", "created", "configured"):
            raise RuntimeError(f"the operator container is {state or 'gone'}:\n{self.output()}")
        return answers(self.liveness)

    def output(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def user(self) -> str:
        return podman("exec", self.name, "id", "-u", check=False).stdout.strip()

    def stop(self) -> None:
        podman("stop", "--time", "10", self.name, check=False)
        podman("rm", "--force", self.name, check=False)


class LocalCluster:
    """The emulator (API server, Job controller, GC) with its front door for pods, a node running them with podman,
    and the operator container."""

    def __init__(self, workdir: Path, operator_image: str, namespace: str, mlflow: str | None = None) -> None:
        self.namespace = namespace
        self.emulator = Emulator()
        self.api = SecureApi(self.emulator, workdir)
        # What the root CA publisher puts in every namespace: the CA that pods verify the API server with.
        meta = {"name": "kube-root-ca.crt", "namespace": namespace}
        root_ca = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"ca.crt": self.api.ca}}
        self.emulator.create(root_ca)
        self.node = Node(self.emulator, PodmanRuntime(), workdir / "pods", namespace, self.api)
        self.operator = OperatorContainer(self.emulator, operator_image, workdir / "operator", mlflow)

    def create(self, obj: dict[str, Any]) -> None:
        self.emulator.create({**obj, "metadata": {**obj["metadata"], "namespace": self.namespace}})

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.emulator.get(kind, self.namespace, name)

    def pods(self, **labels: str) -> list[dict[str, Any]]:
        return self.emulator.list("Pod", self.namespace, **labels)

    def events(self, name: str) -> list[str]:
        return reasons(self.emulator.list("Event", self.namespace), name)

    def logs(self, pod: str) -> str:
        return self.node.logs(pod)

    def last_status(self, pod: str) -> dict[str, Any]:
        return self.node.last_status(pod)

    def stop_container(self, pod: str) -> None:
        self.node.stop_container(pod)

    def kill_container(self, pod: str) -> None:
        self.node.kill_container(pod)

    def denied(self) -> list[str] | None:
        return self.api.denied

    def operator_user(self) -> str:
        return self.operator.user()

    def wait(self, check: Any, what: str, timeout: float) -> Any:
        try:
            return wait_until(check, timeout, what, self.node, interval=0.1)
        except TimeoutError as err:
            raise AssertionError(f"{err}\n{self.diagnosis()}") from err

    def diagnosis(self) -> str:
        lines = ["operator log (tail):", self.operator.output()[-4000:]]
        for container, log in self.node.every_log().items():
            lines += [f"{container} log (tail):", log[-3000:]]
        return "\n".join(lines)

    def close(self) -> None:
        self.operator.stop()
        self.node.close()
        self.api.close()
        self.emulator.close()


_RESOURCES = {"WMTPRun": "wmtpruns.wmtp.io", "Pod": "pods", "Job": "jobs", "Secret": "secrets"}


class KindCluster:
    """A kind cluster through kubectl (and `docker exec` into its nodes for what only a kubelet can do)."""

    def __init__(self, namespace: str, kubectl: str = "kubectl") -> None:
        self.namespace, self.kubectl = namespace, kubectl
        self._seen: dict[str, dict[str, Any]] = {}
        self._closing = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _run(self, *args: str, input: str | None = None, check: bool = True) -> str:
        result = subprocess.run(
            [self.kubectl, "-n", self.namespace, *args], input=input, capture_output=True, text=True, timeout=120
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()[-2000:]}")
        return result.stdout

    def _watch(self) -> None:
        """Keeps the last status of every pod seen: pods go with their Job, their exit codes must not."""
        while not self._closing.wait(0.5):
            listing = self._run("get", "pods", "-o", "json", check=False)
            for pod in json.loads(listing or '{"items": []}')["items"]:
                self._seen[pod["metadata"]["name"]] = pod

    def create(self, obj: dict[str, Any]) -> None:
        self._run("apply", "-f", "-", input=json.dumps(obj))

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        out = self._run("get", _RESOURCES[kind], name, "-o", "json", "--ignore-not-found", check=False)
        return json.loads(out) if out.strip() else None

    def pods(self, **labels: str) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        return json.loads(self._run("get", "pods", "-l", selector, "-o", "json"))["items"]

    def events(self, name: str) -> list[str]:
        about = f"involvedObject.name={name}"
        return reasons(json.loads(self._run("get", "events", "--field-selector", about, "-o", "json"))["items"], name)

    def logs(self, pod: str) -> str:
        return self._run("logs", pod, "-c", "trainer", check=False)

    def last_status(self, pod: str) -> dict[str, Any]:
        return (self._seen.get(pod) or {}).get("status") or {}

    def _container(self, pod: str) -> tuple[str, str]:
        """The trainer container's node and runtime id."""
        body = self.get("Pod", pod) or self._seen[pod]
        status = next(s for s in body["status"]["containerStatuses"] if s["name"] == "trainer")
        return body["spec"]["nodeName"], status["containerID"].split("://", 1)[-1]

    def stop_container(self, pod: str) -> None:
        node, container = self._container(pod)
        grace = str((self.get("Pod", pod) or {}).get("spec", {}).get("terminationGracePeriodSeconds", 30))
        subprocess.Popen(["docker", "exec", node, "crictl", "stop", "--timeout", grace, container])

    def kill_container(self, pod: str) -> None:
        node, container = self._container(pod)
        template = ["--output", "go-template", "--template", "{{.info.pid}}"]
        pid = subprocess.run(
            ["docker", "exec", node, "crictl", "inspect", *template, container], capture_output=True, text=True
        ).stdout.strip()
        subprocess.run(["docker", "exec", node, "kill", "-KILL", pid], check=True)

    def denied(self) -> list[str] | None:
        return None  # the API server's audit log would say; kind does not keep one by default

    def operator_user(self) -> str:
        selector = "app.kubernetes.io/component=operator"
        where = "jsonpath={.items[0].metadata.namespace}/{.items[0].metadata.name}"
        pod = self._run("get", "pods", "-A", "-l", selector, "-o", where)
        namespace, name = pod.split("/", 1)
        return subprocess.run(
            [self.kubectl, "-n", namespace, "exec", name, "--", "id", "-u"], capture_output=True, text=True
        ).stdout.strip()

    def wait(self, check: Any, what: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := check()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.diagnosis()}")
            time.sleep(0.5)
        return value

    def diagnosis(self) -> str:
        return self._run("get", "wmtpruns,jobs,pods", "-o", "wide", check=False)

    def close(self) -> None:
        self._closing.set()
        self._watcher.join(timeout=10)
