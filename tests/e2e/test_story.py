"""The whole WMTPRun story in real containers: preempted, killed, resumed, succeeded.

`make e2e-local` plays it without a cluster (support.clusters.LocalCluster): the operator from its image against
the emulator, `support.node` running each attempt's pods with `podman kube play`, S3 (moto) and an MLflow
server on the host. `make e2e-kind` plays the same story on a kind cluster (KindCluster; tests/e2e/kind.sh sets it
up). `configs/wmtprun.yaml` is applied as written but for where its image, S3 and MLflow are. Its trainer pods
pull, train under torchrun, get stopped (SIGTERM: a preemption) and later killed (SIGKILL: a failure), and each
next attempt resumes from the latest committed checkpoint until training succeeds; then its evaluation pod scores
the final model (spec.eval). MLflow is the chart's, login required: the run's namespace has its user and the
Secret the operator hands its pods by reference, as docs/operator.md has an admin set up.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml

from support.clusters import KindCluster, LocalCluster, StoryCluster
from support.runs import HUMANEVAL
from support.tracking import chart_mlflow_server
from wmtp.checkpoint import CheckpointStore
from wmtp.config import S3Settings
from wmtp.contract import CHECKPOINT_PREFIX
from wmtp.storage import Storage, parse_uri
from wmtp_operator.render import INDEX_ANNOTATION, job_name

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600  # for each stage; the whole story takes a few minutes here
KIND = os.environ.get("WMTP_E2E_CLUSTER") == "kind"
NAMESPACE = "wmtp-e2e"
MLFLOW_SECRET = "wmtp-mlflow"  # the chart's defaults.mlflowCredentialsSecret
MLFLOW_LOGIN = {"MLFLOW_TRACKING_USERNAME": NAMESPACE, "MLFLOW_TRACKING_PASSWORD": "e2e-namespace-password"}
# Without a cluster, Kueue as the emulator plays it holds each attempt's Job suspended this long, then admits it.
QUEUE, ADMIT_AFTER_S = "wmtp-e2e-queue", 3.0


@dataclass
class Stage:
    """The cluster and the services the run uses, with their addresses as pods and as this test reach them."""

    cluster: StoryCluster
    trainer_image: str
    s3_for_pods: str
    storage: Storage  # this test's view of the same S3
    mlflow_for_pods: str
    mlflow: str  # this test's view of the same MLflow server


@pytest.fixture
def stage(images: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stage]:
    if KIND:
        env = os.environ
        cluster: StoryCluster = KindCluster(env["WMTP_E2E_NAMESPACE"], env.get("KUBECTL", "kubectl"))
        storage = Storage(s3=S3Settings(endpoint_url=env["WMTP_E2E_S3_LOCAL"]))
        with contextlib.closing(cluster):
            yield Stage(cluster, images.trainer, env["WMTP_E2E_S3_URL"], storage, env["WMTP_E2E_MLFLOW_URL"],
                        env["WMTP_E2E_MLFLOW_LOCAL"])  # fmt: skip
        return
    s3_endpoint, storage = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_storage")
    workdir = tmp_path / "cluster"
    workdir.mkdir()
    users = {NAMESPACE: MLFLOW_LOGIN["MLFLOW_TRACKING_PASSWORD"]}
    with chart_mlflow_server(tmp_path, users) as (tracking_uri, admin):
        local = LocalCluster(workdir, images.operator, NAMESPACE, mlflow=tracking_uri, mlflow_secret=MLFLOW_SECRET)
        local.emulator.queue(NAMESPACE, admit_after=ADMIT_AFTER_S, flavor={})  # podman's node has no labels
        login = {key: base64.b64encode(value.encode()).decode() for key, value in MLFLOW_LOGIN.items()}
        meta = {"name": MLFLOW_SECRET, "namespace": NAMESPACE}
        local.create({"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": login})
        monkeypatch = request.getfixturevalue("monkeypatch")  # this test reads every run: the admin's login
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
        try:
            yield Stage(local, images.trainer, s3_endpoint, storage, tracking_uri, tracking_uri)
        finally:
            print(local.diagnosis())
            local.close()


def upload_inputs(storage: Storage, models: dict[str, Path]) -> None:
    """What the run's spec names: the tiny models and HumanEval, in the bucket `configs/wmtprun.yaml` uses."""
    s3 = storage.backends["s3"].client
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket="wmtp")
    for role in ("base", "ref"):
        storage.upload(models[role], parse_uri(f"s3://wmtp/models/tiny/{role}"))
    storage.upload(HUMANEVAL, parse_uri("s3://wmtp/datasets/HumanEval.jsonl.gz"))


def manifests(stage: Stage) -> list[dict[str, Any]]:
    """configs/wmtprun.yaml as a user applies it, pointed at this stage's image and S3 endpoint. It names no MLflow
    server: the operator points the run at its default, the chart's own server (the stage's)."""
    docs = [d for d in yaml.safe_load_all((ROOT / "configs" / "wmtprun.yaml").read_text()) if d]
    for doc in docs:
        doc["metadata"]["namespace"] = stage.cluster.namespace
        if doc["kind"] == "WMTPRun":
            doc["spec"].update(image=stage.trainer_image, imagePullPolicy="Never")
            doc["spec"]["s3"]["endpointUrl"] = stage.s3_for_pods
            if not KIND:  # the emulator plays Kueue; kind has none installed
                doc["spec"]["queueName"] = QUEUE
    return docs


def step_of(uri: str | None) -> int | None:
    match = re.search(rf"{CHECKPOINT_PREFIX}(\d+)", uri or "")
    return int(match.group(1)) if match else None


class History:
    """Every distinct status of the run, polled in the background (the Events record each transition too)."""

    FIELDS = ("phase", "attempt", "restarts", "preemptions", "step", "latestCheckpoint", "lastRestart")

    def __init__(self, cluster: StoryCluster, name: str) -> None:
        self.cluster, self.name = cluster, name
        self.seen: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self._record()
            except OSError:
                return  # the cluster is gone: the test ended before it stopped the history

    def _record(self) -> None:
        status = (self.cluster.get("WMTPRun", self.name) or {}).get("status") or {}
        current = {key: status.get(key) for key in self.FIELDS}
        if not self.seen or self.seen[-1] != current:
            self.seen.append(current)

    def stop(self) -> None:
        """Stop polling, with the status as it is now as the last entry (the one the test waited for)."""
        self._stop.set()
        self._thread.join()
        self._record()


def trainer_pods(cluster: StoryCluster, run: str, attempt: int) -> list[dict[str, Any]]:
    pods = cluster.pods(**{"batch.kubernetes.io/job-name": job_name(run, attempt)})
    return sorted(pods, key=lambda p: int(p["metadata"]["annotations"][INDEX_ANNOTATION]))


def resume_arg(pod: dict[str, Any]) -> str:
    trainer = next(c for c in pod["spec"]["containers"] if c["name"] == "trainer")
    args = [*trainer.get("command", []), *trainer.get("args", [])]
    return args[args.index("--resume") + 1]


def terminated(status: dict[str, Any]) -> dict[str, Any]:
    """The trainer container's terminated state in a pod status ({} while it runs)."""
    statuses = status.get("containerStatuses") or []
    return next((s["state"].get("terminated") or {} for s in statuses if s["name"] == "trainer"), {})


def test_wmtprun_is_preempted_killed_resumed_and_succeeds_in_containers(
    stage: Stage, tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cluster, storage = stage.cluster, stage.storage
    upload_inputs(storage, tiny_models)
    docs = manifests(stage)
    run = next(d for d in docs if d["kind"] == "WMTPRun")
    name, max_steps = run["metadata"]["name"], run["spec"]["recipe"]["train"]["max_steps"]
    save_interval = run["spec"]["checkpoints"]["saveInterval"]
    store = CheckpointStore(f"{run['spec']['checkpoints']['basePath']}/{name}", storage)
    secret = {k: base64.b64encode(b"e2e").decode() for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    meta = {"name": run["spec"]["s3"]["credentialsSecret"], "namespace": cluster.namespace}
    cluster.create({"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": secret})
    for doc in docs:
        cluster.create(doc)
    history = History(cluster, name)

    def status() -> dict[str, Any]:
        return (cluster.get("WMTPRun", name) or {}).get("status") or {}

    def pods_of(attempt: int) -> list[dict[str, Any]]:
        pods = trainer_pods(cluster, name, attempt)
        return pods if len(pods) == run["spec"]["nodes"] else []

    # Attempt 1: both pods pull, train under torchrun, and rank 0 reports the first periodic checkpoint.
    def first_checkpoint_or_failure() -> bool:
        return step_of(status().get("latestCheckpoint")) == save_interval or status().get("phase") == "Failed"

    cluster.wait(first_checkpoint_or_failure, f"attempt 1 to report its checkpoint at step {save_interval}", TIMEOUT_S)
    assert status().get("phase") != "Failed", status().get("message")
    first = pods_of(1)
    assert [p["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] for p in first] == [0, 0]
    if not KIND:  # the MLflow login reaches the pods by reference only, never as a value in their spec
        env = {e["name"]: e for e in next(c for c in first[0]["spec"]["containers"] if c["name"] == "trainer")["env"]}
        assert all(env[key]["valueFrom"]["secretKeyRef"]["name"] == MLFLOW_SECRET for key in MLFLOW_LOGIN), env

    # A preemption: SIGTERM to rank 1's container. Both ranks save one more checkpoint and stop.
    cluster.stop_container(first[1]["metadata"]["name"])
    cluster.wait(lambda: status().get("attempt") == 2, "attempt 2 to start", TIMEOUT_S)
    stopped = terminated(cluster.last_status(first[1]["metadata"]["name"]))
    preempted = store.latest()
    assert preempted is not None and save_interval < preempted.step < max_steps
    print(f"preempted at step {preempted.step}; rank 1 ended with {stopped}")

    # Attempt 2 resumes from the checkpoint the preemption committed, then trains past the next one.
    second = cluster.wait(lambda: pods_of(2), "attempt 2's pods", TIMEOUT_S)
    assert [resume_arg(p) for p in second] == [preempted.location.uri] * 2
    cluster.wait(lambda: f"resumed step={preempted.step} " in cluster.logs(second[0]["metadata"]["name"]),
                 f"attempt 2 to resume at step {preempted.step}", TIMEOUT_S)  # fmt: skip
    cluster.wait(lambda: (step_of(status().get("latestCheckpoint")) or 0) > preempted.step,
                 "attempt 2 to report a newer checkpoint", TIMEOUT_S)  # fmt: skip
    reported = status()["latestCheckpoint"]

    # A failure: SIGKILL to rank 0's container. No checkpoint; the next attempt resumes from the reported one.
    cluster.kill_container(second[0]["metadata"]["name"])
    cluster.wait(lambda: status().get("attempt") == 3, "attempt 3 to start", TIMEOUT_S)
    killed = terminated(cluster.last_status(second[0]["metadata"]["name"]))
    third = cluster.wait(lambda: pods_of(3), "attempt 3's pods", TIMEOUT_S)
    assert [resume_arg(p) for p in third] == [reported] * 2
    cluster.wait(lambda: status().get("phase") in ("Succeeded", "Failed"), "the run to finish", TIMEOUT_S)
    history.stop()
    final = cluster.get("WMTPRun", name) or {}
    done = final["status"]
    logs = cluster.logs(third[0]["metadata"]["name"])

    # The story as it happened: status transitions (one Event each), counts, progress, resumes, artefacts.
    print("status history:", *history.seen, sep="\n  ")
    events = cluster.events(name)
    print("events:", events)
    assert done["phase"] == "Succeeded", done.get("message")
    assert done["attempt"] == 3
    assert done["step"] == done["maxSteps"] == max_steps
    assert final["spec"]["resumeFrom"] == reported
    assert f"resumed step={step_of(reported)} " in logs
    assert killed.get("exitCode") == 137 and killed.get("reason") == "Error", killed
    assert cluster.denied() in ([], None)  # every report the trainer sent was authorized by the run's Role
    assert cluster.operator_user() == "1000"
    assert store.is_committed(store.final_location)
    client = mlflow.MlflowClient(tracking_uri=stage.mlflow, registry_uri=stage.mlflow)
    model = f"wmtp-{stage.cluster.namespace}-{run['spec']['algorithm']}"  # the operator names it per namespace
    assert len(client.search_model_versions(f"name='{model}'")) == 1
    # Three attempts, one MLflow run: its loss curve has every logged step from the first to the last, each once but
    # those attempt 2 logged after its last reported checkpoint and attempt 3 trained again; the evaluation found
    # that run through the final model's marker and logged its scores there too.
    (training,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    steps = sorted(m.step for m in client.get_metric_history(training.info.run_id, "loss"))
    interval = steps[0]
    assert sorted(set(steps)) == list(range(interval, max_steps + 1, interval)), steps
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    assert all(steps.count(s) == 2 and s > step_of(reported) for s in repeated), (repeated, reported)
    evaluated, limit = done["eval"], run["spec"]["eval"]["limit"]
    assert evaluated["phase"] == "Succeeded" and evaluated["mlflowRunId"] == training.info.run_id, evaluated
    assert evaluated["tasks"]["humaneval"]["problems"] == limit and evaluated["speed"]["identical"] is True
    assert training.data.metrics["eval/humaneval/problems"] == limit

    assert stopped.get("exitCode") == 75 and '"Preempted"' in stopped.get("message", ""), stopped
    assert (done.get("restarts"), done.get("preemptions")) == (1, 1), done
    assert_history(history.seen)
    # Each restart timed once its next attempt's first step was reported: the preemption's, then the kill's.
    timed = list({t["attempt"]: t for s in history.seen if (t := s["lastRestart"])}.values())
    assert [(t["attempt"], t["cause"]) for t in timed] == [(2, "preemption"), (3, "failure")], timed
    assert done["lastRestart"] == timed[-1] and timed[-1]["seconds"] > 0, done.get("lastRestart")
    # Each restart says twice why: the attempt that ended (and the fence while its pods stop), then the one resuming.
    # Without a cluster each attempt's Job waits in the emulator's Kueue first: Queued, no restart counted for it
    # (the pass that creates attempt 1's Job says Pending before that).
    attempt = [*([] if KIND else ["Queued"]), "Pending", "Pulling", "Running"]
    created = [] if KIND else ["Pending"]
    assert events == [*created, *attempt, "Restarting", "Restarting", *attempt, "Restarting", "Restarting", *attempt,
                      "Evaluating", "Succeeded", "Evaluated"], events  # fmt: skip
    queued = events.count("Queued")

    # What passed, in the CI log: a green story leaves its evidence, not only a dot.
    (version,) = client.search_model_versions(f"name='{model}'")
    with capsys.disabled():
        print(
            f"\nstory: phases {' → '.join(phases_of(history.seen))}; attempts {done['attempt']}, restarts "
            f"{done['restarts']}, preemptions {done['preemptions']}; preempted at step {preempted.step}, resumed from "
            f"{step_of(reported)} after the kill; queued {queued} times; restart to training "
            f"{'; '.join(map(restart_words, timed))}; "
            f"events {', '.join(events)}; registered {version.name} version {version.version} (MLflow with a login"
            f"{'' if KIND else f': {NAMESPACE} from Secret {MLFLOW_SECRET}'}); eval {evaluated['tasks']['humaneval']}"
        )


def restart_words(timed: dict[str, Any]) -> str:
    """status.lastRestart in a few words: 41.5 s after the failure (stopping 3.0, scheduling 20.0, resuming 18.5)."""
    parts = ", ".join(f"{part} {timed[f'{part}Seconds']}" for part in ("stopping", "scheduling", "resuming")
                      if timed.get(f"{part}Seconds") is not None)  # fmt: skip
    return f"{timed['seconds']} s after the {timed['cause']} ({parts})"


def phases_of(seen: list[dict[str, Any]]) -> list[str]:
    """The phases in the order the run went through them, each stay once."""
    phases = [s["phase"] for s in seen if s["phase"]]
    return [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]


def assert_history(seen: list[dict[str, Any]]) -> None:
    """Every status the run showed, in order: never Failed; Running, then a preemption, Running again, a failure,
    Running a third time, then Succeeded; counters, attempts and the reported checkpoint never go backwards."""
    phases = phases_of(seen)
    assert "Failed" not in phases, phases
    story = iter(phases)
    wanted = ["Running", "Restarting", "Running", "Restarting", "Running", "Succeeded"]
    assert all(phase in story for phase in wanted), phases  # in this order, other phases between them
    for field in ("attempt", "restarts", "preemptions"):
        values = [s[field] or 0 for s in seen]
        assert values == sorted(values), (field, values)
    counted = [(s["preemptions"] or 0, s["restarts"] or 0) for s in seen]
    assert (1, 0) in counted, counted  # the preemption was counted as one before the kill was counted as a restart
    checkpoints = [step_of(s["latestCheckpoint"]) for s in seen if s["latestCheckpoint"]]
    assert checkpoints == sorted(checkpoints), checkpoints
