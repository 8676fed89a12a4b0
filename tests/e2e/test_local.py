"""The whole WMTPRun story without a cluster: real images, a real container engine, the emulator as API server.

The operator runs from its image (podman) against the emulator; `support.kubelet` plays the Job controller and
the kubelet, running each attempt's pods with `podman kube play`; S3 (moto) and an MLflow server run on the host.
`configs/wmtprun.yaml` is applied as written but for where its image, S3 and MLflow are. Its trainer pods pull,
train under torchrun, get stopped (SIGTERM: a preemption) and later killed (SIGKILL: a failure), and each next
attempt resumes from the latest committed checkpoint until the run succeeds.
"""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml

from support.emulator import Emulator
from support.kubelet import Kubelet, wait_until
from support.runs import HUMANEVAL
from support.runtime import PodmanRuntime
from support.secure_api import SecureApi
from support.services import OperatorContainer, mlflow_server
from wmtp.checkpoint import CheckpointStore
from wmtp.contract import CHECKPOINT_PREFIX
from wmtp.storage import Storage, parse_uri
from wmtp_operator.render import job_name
from wmtp_operator.spec import Status

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "wmtp-e2e"
TIMEOUT_S = 600  # for each stage; the whole story takes a few minutes


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        "AWS_ACCESS_KEY_ID": "e2e",
        "AWS_SECRET_ACCESS_KEY": "e2e",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)


class Cluster:
    """The emulator with its front door for pods, the test kubelet and the operator container."""

    def __init__(self, workdir: Path, operator_image: str) -> None:
        self.closed = False
        self.emulator = Emulator()
        self.api = SecureApi(self.emulator, workdir)
        self.kubelet = Kubelet(self.emulator, PodmanRuntime(), workdir / "pods", NAMESPACE, self.api)
        self.operator = OperatorContainer(self.emulator, operator_image, workdir / "operator")

    def close(self) -> None:
        self.closed = True
        self.operator.stop()
        self.kubelet.close()
        self.api.close()
        self.emulator.close()

    def run(self, name: str) -> dict[str, Any]:
        return self.emulator.get("WMTPRun", NAMESPACE, name) or {}

    def wait(self, check: Any, what: str, timeout: float = TIMEOUT_S) -> Any:
        try:
            return wait_until(check, timeout, what, self.kubelet, interval=0.1)
        except TimeoutError as err:
            raise AssertionError(f"{err}\n{self.diagnosis()}") from err

    def diagnosis(self) -> str:
        lines = ["operator log (tail):", self.operator.output()[-4000:]]
        for pod in self.kubelet.pod_names():
            lines += [f"pod {pod} trainer log (tail):", self.kubelet.logs(pod)[-3000:]]
        return "\n".join(lines)


@pytest.fixture
def cluster(images: Any, tmp_path: Path) -> Iterator[Cluster]:
    workdir = tmp_path / "cluster"
    workdir.mkdir()
    cluster = Cluster(workdir, images.operator)
    try:
        yield cluster
    finally:
        print(cluster.diagnosis())
        cluster.close()


def upload_inputs(storage: Storage, models: dict[str, Path]) -> None:
    """What the run's spec names: the tiny models and HumanEval, in the bucket `configs/wmtprun.yaml` uses."""
    storage.s3.create_bucket(Bucket="wmtp")
    for role in ("base", "ref"):
        storage.upload(models[role], parse_uri(f"s3://wmtp/models/tiny/{role}"))
    storage.upload(HUMANEVAL, parse_uri("s3://wmtp/datasets/HumanEval.jsonl.gz"))


def manifests(image: str, s3: str, tracking_uri: str) -> list[dict[str, Any]]:
    """configs/wmtprun.yaml as a user applies it, pointed at this host's image, S3 endpoint and MLflow server."""
    docs = [d for d in yaml.safe_load_all((ROOT / "configs" / "wmtprun.yaml").read_text()) if d]
    for doc in docs:
        doc["metadata"]["namespace"] = NAMESPACE
        if doc["kind"] == "WMTPRun":
            doc["spec"].update(image=image, imagePullPolicy="Never")
            doc["spec"]["s3"]["endpointUrl"] = s3
            doc["spec"]["mlflow"] = {"trackingUri": tracking_uri}
    return docs


def step_of(uri: str | None) -> int | None:
    match = re.search(rf"{CHECKPOINT_PREFIX}(\d+)", uri or "")
    return int(match.group(1)) if match else None


class History:
    """Every distinct status of the run, polled every 0.1 s in the background (the Events say the rest)."""

    FIELDS = ("phase", "attempt", "restarts", "preemptions", "step", "latestCheckpoint")

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster, self.name = cluster, name
        self.seen: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.1) and not self.cluster.closed:
            status = self.cluster.run(self.name).get("status") or {}
            current = {key: status.get(key) for key in self.FIELDS}
            if not self.seen or self.seen[-1] != current:
                self.seen.append(current)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def phases(self) -> list[str]:
        out: list[str] = []
        for entry in self.seen:
            if entry["phase"] and (not out or out[-1] != entry["phase"]):
                out.append(entry["phase"])
        return out


def trainer_pods(cluster: Cluster, run: str, attempt: int) -> list[dict[str, Any]]:
    pods = cluster.emulator.list("Pod", NAMESPACE, **{"batch.kubernetes.io/job-name": job_name(run, attempt)})
    return sorted(pods, key=lambda p: int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]))


def trainer_args(pod: dict[str, Any]) -> list[str]:
    trainer = next(c for c in pod["spec"]["containers"] if c["name"] == "trainer")
    return [*trainer.get("command", []), *trainer.get("args", [])]


def resume_arg(pod: dict[str, Any]) -> str:
    args = trainer_args(pod)
    return args[args.index("--resume") + 1]


def terminated(status: dict[str, Any]) -> dict[str, Any]:
    """The trainer container's terminated state in a pod status ({} while it runs)."""
    statuses = status.get("containerStatuses") or []
    return next((s["state"].get("terminated") or {} for s in statuses if s["name"] == "trainer"), {})


def test_wmtprun_is_preempted_killed_resumed_and_succeeds_in_containers(
    cluster: Cluster,
    images: Any,
    launcher: bool,
    s3_endpoint: str,
    s3_storage: Storage,
    tiny_models: dict[str, Path],
    tmp_path: Path,
) -> None:
    storage = s3_storage
    upload_inputs(storage, tiny_models)
    store = CheckpointStore("s3://wmtp/checkpoints/tiny-rho1", storage)
    emulator = cluster.emulator
    with mlflow_server(tmp_path) as tracking_uri:
        docs = manifests(images.trainer, s3_endpoint, tracking_uri)
        run = next(d for d in docs if d["kind"] == "WMTPRun")
        name, max_steps = run["metadata"]["name"], run["spec"]["recipe"]["train"]["max_steps"]
        save_interval = run["spec"]["checkpoints"]["saveInterval"]
        secret = {k: base64.b64encode(b"e2e").decode() for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        emulator.create(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "wmtp-s3", "namespace": NAMESPACE},
                "data": secret,
            }
        )
        for doc in docs:
            emulator.create(doc)
        history = History(cluster, name)

        # Attempt 1: both pods pull, train under torchrun, and rank 0 reports the first periodic checkpoint.
        cluster.wait(lambda: step_of(cluster.run(name).get("status", {}).get("latestCheckpoint")) == save_interval,
                     f"attempt 1 to report its checkpoint at step {save_interval}")  # fmt: skip
        first = trainer_pods(cluster, name, 1)
        assert len(first) == 2
        assert [p["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] for p in first] == [0, 0]

        # A preemption: SIGTERM to rank 1's container. Both ranks save one more checkpoint and stop.
        cluster.kubelet.stop_container(first[1]["metadata"]["name"])
        cluster.wait(lambda: cluster.run(name).get("status", {}).get("attempt") == 2, "attempt 2 to start")
        stopped = terminated(cluster.kubelet.last_status(first[1]["metadata"]["name"]))
        preempted = store.latest()
        assert preempted is not None and save_interval < preempted.step < max_steps
        print(f"preempted at step {preempted.step}; rank 1 ended with {stopped}")

        # Attempt 2 resumes from the checkpoint the preemption committed, then trains past the next one.
        second = cluster.wait(lambda: len(trainer_pods(cluster, name, 2)) == 2 and trainer_pods(cluster, name, 2),
                              "attempt 2's pods")  # fmt: skip
        assert [resume_arg(p) for p in second] == [preempted.location.uri] * 2
        cluster.wait(lambda: f"resumed step={preempted.step} " in cluster.kubelet.logs(second[0]["metadata"]["name"]),
                     f"attempt 2 to resume at step {preempted.step}")  # fmt: skip
        cluster.wait(lambda: (step_of(cluster.run(name)["status"].get("latestCheckpoint")) or 0) > preempted.step,
                     "attempt 2 to report a newer checkpoint")  # fmt: skip
        reported = cluster.run(name)["status"]["latestCheckpoint"]

        # A failure: SIGKILL to rank 0's container. No checkpoint; the next attempt resumes from the reported one.
        cluster.kubelet.kill_container(second[0]["metadata"]["name"])
        cluster.wait(lambda: cluster.run(name).get("status", {}).get("attempt") == 3, "attempt 3 to start")
        killed = terminated(cluster.kubelet.last_status(second[0]["metadata"]["name"]))
        third = cluster.wait(lambda: len(trainer_pods(cluster, name, 3)) == 2 and trainer_pods(cluster, name, 3),
                             "attempt 3's pods")  # fmt: skip
        assert [resume_arg(p) for p in third] == [reported] * 2
        cluster.wait(lambda: cluster.run(name).get("status", {}).get("phase") in ("Succeeded", "Failed"),
                     "the run to finish")  # fmt: skip
        history.stop()
        final = cluster.run(name)
        status = final["status"]
        logs = cluster.kubelet.logs(third[0]["metadata"]["name"])

        # The story as it happened: status transitions (one Event each), counts, progress, resumes, artefacts.
        print("status history:", *history.seen, sep="\n  ")
        events = [e["reason"] for e in emulator.list("Event", NAMESPACE) if e["involvedObject"]["name"] == name]
        print("events:", events)
        assert status["phase"] == "Succeeded", status.get("message")
        assert status["attempt"] == 3
        assert status["step"] == status["maxSteps"] == max_steps
        assert final["spec"]["resumeFrom"] == reported
        assert f"resumed step={step_of(reported)} " in logs
        assert killed.get("exitCode") == 137 and killed.get("reason") == "Error", killed
        assert cluster.api.denied == []  # every report the trainer sent was authorized by the run's Role
        assert cluster.operator.user() == "1000"
        assert store.is_committed(store.final_location)
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        assert len(client.search_model_versions(f"name='wmtp-{run['spec']['algorithm']}'")) == 1

        # What needs work in flight elsewhere is checked last. Each check is strict once its piece is there (the
        # launcher in the image, status.preemptions in the operator's model); until then a miss is an expected
        # failure that names what it waits for, and every other miss fails the test.
        failures, waiting = [], []
        preempted_exit = stopped.get("exitCode") == 75 and '"Preempted"' in stopped.get("message", "")
        (failures if launcher else waiting).append(
            None if preempted_exit else f"the stopped trainer should exit 75 with a Preempted message: {stopped}"
        )
        counts = status.get("restarts"), status.get("preemptions")
        (failures if launcher and "preemptions" in Status.model_fields else waiting).append(
            None if counts == (1, 1) else f"restarts, preemptions should be 1, 1: {counts}"
        )
        expected = ["Pending", "Pulling", "Running", "Restarting", "Pulling", "Running", "Restarting", "Pulling",
                    "Running", "Succeeded"]  # fmt: skip
        if events != expected:
            # Known: the operator reports Pending while the trainers start after their init container.
            steady = [e for i, e in enumerate(events) if not (i and e == "Pending" and events[i - 1] == "Pulling")]
            (waiting if steady == expected else failures).append(f"transitions should be {expected}: {events}")
        failures, waiting = [m for m in failures if m], [m for m in waiting if m]
        assert not failures, "\n".join(failures)
        if waiting:
            pytest.xfail("waiting for the launcher, status.preemptions or steady phases:\n" + "\n".join(waiting))
