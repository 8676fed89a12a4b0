"""`torchrun` with 2 ranks (gloo on CPU, FSDP2) trains like one process, and checkpoints move between world sizes.

Tolerances: two ranks are not bit-exact with one process, and cannot be. The global batch and the sample order
are the same, but float32 sums run in another order (each rank sums its half of the batch, FSDP's
reduce-scatter adds the halves' gradients, the logged loss is the mean of the ranks' means), and per-batch
statistics become per-rank: critic-wmtp normalises its weights to mean 1 over each rank's targets, and
rho1-wmtp's top-k keeps the best 60% of each rank's targets instead of the batch's. Largest loss differences
seen over 12 steps (losses ~6, rho1 ~3.8): baseline 1.2e-6, critic 2.3e-4, rho1 5.2e-3. The bounds below sit
well above those and below what a wrong sample stream does: with both ranks reading the same half of each
batch the loss is off by 1e-2 at the first step and by 0.14 at worst."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch

from support.runs import checkpoint_tensors, train_cli, wait_for_file, write_run_files
from support.s3 import CountingS3Server
from wmtp.checkpoint import COMMITTED, CheckpointStore, step_dir_name
from wmtp.config import S3Settings, load
from wmtp.contract import PULL_WEIGHTS_RANK0, is_weight_file
from wmtp.models import MTPModel
from wmtp.pull import Job, pull
from wmtp.storage import Storage, parse_uri
from wmtp.train import Trainer

pytestmark = pytest.mark.slow
STEPS, SAVE_INTERVAL, RESUME_AT = 12, 4, 4
LOSS_TOLERANCE = {"baseline-mtp": 1e-4, "critic-wmtp": 3e-3, "rho1-wmtp": 2e-2}
# After a resume the steps since the checkpoint are compared: the same batches, so the same loss bounds hold.
# The weights end ~3e-4 of their movement apart (`drift`); restarting the sample stream at the first batch
# instead of the checkpoint's position puts them ~0.3 apart.
WEIGHT_TOLERANCE = 1e-2
TIMEOUT_S = 20


@dataclass
class Finished:
    root: Path  # the run's checkpoint store
    losses: list[float]
    output: str = ""


def scenario_files(
    work: Path, models: dict[str, Path], algo: str, name: str, world: int, **overrides: object
) -> tuple[Path, Path, Path]:
    """Config, recipe and checkpoint store of one scenario. Each has its own store, set in the recipe's
    checkpointing section, which the config hash leaves out (so does it `devices`): a checkpoint of one scenario
    resumes in another. All share one MLflow store: a resumed run continues the MLflow run its checkpoint names."""
    directory = work / name
    directory.mkdir(parents=True, exist_ok=True)
    settings = {
        "paths.output_dir": str(work / "runs"),
        "paths.checkpoints.base_path": str(work / "checkpoints"),  # overridden by the recipe, and hashed
        "paths.checkpoints.save_interval": SAVE_INTERVAL,
        "paths.checkpoints.keep_last": 10,
        "devices.distributed": {"enabled": world > 1, "timeout_s": TIMEOUT_S},
        "devices.fsdp.enabled": world > 1,
        "log_interval": 1,
        "train.eval_interval": 100,
        "critic.pretrain_steps": 3,
        "checkpointing.checkpoint_path": str(directory / "checkpoints"),
    }
    config, recipe = write_run_files(directory, models, algo, STEPS, **(settings | overrides))
    return config, recipe, directory / "checkpoints" / f"test-{algo}"


def logged(tracking_uri: str, run_id: str, key: str = "loss") -> dict[int, list[float]]:
    """Every value an MLflow run holds for `key`, by step, oldest first (a resumed run logs steps again)."""
    history = mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, key)
    by_step: dict[int, list[float]] = {}
    for metric in sorted(history, key=lambda m: (m.step, m.timestamp)):
        by_step.setdefault(metric.step, []).append(metric.value)
    return by_step


def mlflow_run(work: Path, root: Path, algo: str) -> tuple[str, str]:
    state = json.loads((root / step_dir_name(STEPS) / "trainer_state.json").read_text())
    return f"sqlite:///{work / 'runs' / f'test-{algo}' / 'mlflow.db'}", state["train_state"]["mlflow_run_id"]


def run_to_end(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    return output


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The in-process runs use one thread, as torchrun gives each worker (OMP_NUM_THREADS=1): on a busy
    two-core machine that is several times faster, and the comparisons are like for like."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def trained(work: Path, tiny_models: dict[str, Path]) -> Callable[[str, int], Finished]:
    """(algo, world) → that run to STEPS, trained once per module: in this process, or under torchrun."""
    done: dict[tuple[str, int], Finished] = {}

    def get(algo: str, world: int) -> Finished:
        if (algo, world) not in done:
            config, recipe, root = scenario_files(work, tiny_models, algo, f"{algo}-{world}", world)
            if world == 1:
                trainer = Trainer(*load(config, recipe))
                trainer.train()
                done[algo, world] = Finished(root, trainer.state.history["loss"])
            else:
                output = run_to_end(train_cli(config, recipe, nproc=world))
                by_step = logged(*mlflow_run(work, root, algo))
                losses = [values[-1] for _, values in sorted(by_step.items())]
                done[algo, world] = Finished(root, losses, output)
        return done[algo, world]

    return get


def model_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in checkpoint_tensors(checkpoint).items() if k.startswith("/model/")}


def drift(got: Path, want: Path, start: Path) -> float:
    """‖got − want‖ / ‖want − start‖ over the model weights: how far two runs from the checkpoint `start` ended
    apart, relative to how far training moved the weights. Per-element bounds would not do: Adam moves a weight
    whose gradient is ~0 by up to the learning rate, so float noise there shows up at full step size."""
    a, b, s = model_tensors(got), model_tensors(want), model_tensors(start)
    assert a.keys() == b.keys() == s.keys()
    apart = torch.cat([(a[k] - b[k]).flatten() for k in a])
    moved = torch.cat([(b[k] - s[k]).flatten() for k in a])
    return float(apart.norm() / moved.norm())


@pytest.mark.parametrize("algo", ["baseline-mtp", "critic-wmtp", "rho1-wmtp"])
def test_two_ranks_follow_the_single_process_loss_trajectory(algo: str, trained) -> None:
    single, two = trained(algo, 1), trained(algo, 2)
    assert len(two.losses) == len(single.losses) == STEPS
    assert two.losses == pytest.approx(single.losses, abs=LOSS_TOLERANCE[algo])
    assert two.output.count(f"step=1/{STEPS} ") == 1  # rank 0 alone logs


def test_two_ranks_write_their_shards_and_rank_0_gathers_the_final_model(work: Path, trained) -> None:
    two = trained("baseline-mtp", 2)
    last = two.root / step_dir_name(STEPS)
    assert {"__0_0.distcp", "__1_0.distcp", "rng_rank0.json", "rng_rank1.json"} <= set(os.listdir(last))

    final = MTPModel.from_pretrained(two.root / "final")
    saved = model_tensors(last)
    gathered = {f"/model/model.{k}": v for k, v in final.state_dict().items()}
    assert gathered.keys() == saved.keys()
    assert all(torch.equal(gathered[k], saved[k]) for k in saved)

    tracking_uri, run_id = mlflow_run(work, two.root, "baseline-mtp")
    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    versions = client.search_model_versions(f"run_id='{run_id}'")
    assert len(versions) == 1


def test_two_ranks_train_only_the_extra_heads_and_leave_the_base_bit_identical(
    work: Path, tiny_models: dict[str, Path]
) -> None:
    # The base requires no gradient in such a run: FSDP reduces only the heads' and never touches the rest.
    heads_only = {"train.train_only_extra_heads": True, "train.max_steps": SAVE_INTERVAL}
    config, recipe, root = scenario_files(work, tiny_models, "baseline-mtp", "heads-only-2", 2, **heads_only)
    run_to_end(train_cli(config, recipe, nproc=2))

    start, final = MTPModel.from_pretrained(tiny_models["base"], 4, "block"), MTPModel.from_pretrained(root / "final")
    before, after = start.state_dict(), final.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) == k.startswith("base.") for k in before)


def test_checkpoint_of_two_ranks_resumes_on_one_with_the_same_samples(
    work: Path, tiny_models: dict[str, Path], trained
) -> None:
    single, two = trained("baseline-mtp", 1), trained("baseline-mtp", 2)
    config, recipe, root = scenario_files(work, tiny_models, "baseline-mtp", "two-to-one", world=1)
    trainer = Trainer(*load(config, recipe), resume=str(two.root / step_dir_name(RESUME_AT)))
    trainer.train()

    assert trainer.state.history["loss"] == pytest.approx(single.losses[RESUME_AT:], abs=LOSS_TOLERANCE["baseline-mtp"])
    last, start = step_dir_name(STEPS), single.root / step_dir_name(RESUME_AT)
    assert drift(root / last, single.root / last, start) < WEIGHT_TOLERANCE


def test_checkpoint_of_one_rank_resumes_on_two_with_the_same_samples(
    work: Path, tiny_models: dict[str, Path], trained
) -> None:
    single = trained("baseline-mtp", 1)
    config, recipe, root = scenario_files(work, tiny_models, "baseline-mtp", "one-to-two", world=2)
    output = run_to_end(train_cli(config, recipe, "--resume", str(single.root / step_dir_name(RESUME_AT)), nproc=2))
    assert f"resumed step={RESUME_AT}" in output

    # The resumed run continues the single run's MLflow run, so steps after the checkpoint hold two values.
    by_step = logged(*mlflow_run(work, single.root, "baseline-mtp"))
    resumed = [by_step[step][-1] for step in range(RESUME_AT + 1, STEPS + 1)]
    assert all(len(by_step[step]) == 2 for step in range(RESUME_AT + 1, STEPS + 1))
    assert resumed == pytest.approx(single.losses[RESUME_AT:], abs=LOSS_TOLERANCE["baseline-mtp"])
    last, start = step_dir_name(STEPS), single.root / step_dir_name(RESUME_AT)
    assert drift(root / last, single.root / last, start) < WEIGHT_TOLERANCE


def worker_pid(agent: int, rank: int) -> int:
    """The pid of torchrun's worker process for `rank`, found by its parent and its RANK variable."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if parent == agent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {agent}")


def test_a_killed_rank_fails_the_job_fast_and_resume_latest_ends_close_to_an_uninterrupted_run(
    work: Path, tiny_models: dict[str, Path], trained
) -> None:
    # Data parallel without sharding (fsdp off: parameters replicated, gradients averaged) to cover that mode.
    single = trained("baseline-mtp", 1)
    config, recipe, root = scenario_files(
        work, tiny_models, "baseline-mtp", "killed", 2, **{"devices.fsdp.enabled": False}
    )
    proc = train_cli(config, recipe, nproc=2)
    wait_for_file(root / step_dir_name(SAVE_INTERVAL) / COMMITTED, proc)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(worker_pid(proc.pid, rank=1), signal.SIGKILL)
    killed_at = time.monotonic()
    output, _ = proc.communicate(timeout=TIMEOUT_S + 60)
    assert proc.returncode != 0, output
    assert time.monotonic() - killed_at < TIMEOUT_S, output
    latest = CheckpointStore(str(root), Storage()).latest().step
    assert SAVE_INTERVAL <= latest < STEPS

    output = run_to_end(train_cli(config, recipe, "--resume", "latest", nproc=2))
    assert f"resumed step={latest}" in output
    assert (root / "final" / COMMITTED).exists()
    last = step_dir_name(STEPS)
    assert drift(root / last, single.root / last, single.root / step_dir_name(latest)) < WEIGHT_TOLERANCE


def running(pid: int) -> bool:
    """True until the process exits (a zombie waiting for its parent to reap it counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_hung_rank_fails_the_others_after_the_configured_timeout(work: Path, tiny_models: dict[str, Path]) -> None:
    # A stopped process keeps its sockets open, as a frozen node or a stuck GPU does: only the timeout helps.
    config, recipe, root = scenario_files(work, tiny_models, "baseline-mtp", "hung", 2, **{"train.max_steps": 400})
    proc = train_cli(config, recipe, nproc=2)
    wait_for_file(root / step_dir_name(SAVE_INTERVAL) / COMMITTED, proc)
    rank0, rank1 = worker_pid(proc.pid, rank=0), worker_pid(proc.pid, rank=1)
    os.kill(rank1, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        while running(rank0) and time.monotonic() - stopped < 3 * TIMEOUT_S:
            time.sleep(0.1)
        waited = time.monotonic() - stopped
    finally:
        os.kill(rank1, signal.SIGKILL)  # torchrun's agent would wait 30 s for a stopped worker to take SIGTERM
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0, output
    # The default timeout is 30 min: twice the configured one leaves room for a loaded machine and still proves it.
    assert TIMEOUT_S - 1 < waited < 2 * TIMEOUT_S, output


@pytest.fixture(scope="module")
def counting_s3() -> Iterator[CountingS3Server]:
    server = CountingS3Server()
    server.start()
    yield server
    server.stop()


def test_a_two_rank_resume_from_s3_reads_only_its_own_shards_and_ends_bit_identical(
    work: Path, tiny_models: dict[str, Path], counting_s3: CountingS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    storage = Storage(s3=S3Settings(endpoint_url=counting_s3.url))
    storage.backends["s3"].client.create_bucket(Bucket="resume")
    roots = {name: f"s3://resume/{name}" for name in ("straight", "resumed")}
    runs = {
        name: scenario_files(work, tiny_models, "baseline-mtp", f"s3-{name}", 2, **{
            "s3.endpoint_url": counting_s3.url, "checkpointing.checkpoint_path": root})[:2]
        for name, root in roots.items()
    }  # fmt: skip
    run_to_end(train_cli(*runs["straight"], nproc=2))
    start = f"{roots['straight']}/test-baseline-mtp/{step_dir_name(RESUME_AT)}"
    counting_s3.served.clear()
    run_to_end(train_cli(*runs["resumed"], "--resume", start, nproc=2))

    shards = {o.rel: o.size for o in storage.objects(parse_uri(start)) if o.rel.endswith(".distcp")}
    read = [s for s in counting_s3.gets(".distcp") if s.path.startswith("/resume/straight/")]
    assert len(shards) == 2 and {s.path.rsplit("/", 1)[1] for s in read} == set(shards)
    assert all(s.range for s in read)  # byte ranges of tensors, never a whole file
    # Each rank reads its own half: both ranks together read each shard once (a download per rank reads it twice).
    assert sum(s.bytes for s in read) <= 1.1 * sum(shards.values())

    finals = {}
    for name, root in roots.items():
        local = work / f"s3-{name}-final"
        storage.download(parse_uri(f"{root}/test-baseline-mtp/{step_dir_name(STEPS)}"), local)
        finals[name] = checkpoint_tensors(local)
    assert finals["straight"].keys() == finals["resumed"].keys()
    assert all(torch.equal(finals["straight"][k], finals["resumed"][k]) for k in finals["straight"])


def test_a_rank_that_pulled_no_weight_files_trains_bit_identically(
    work: Path, tiny_models: dict[str, Path], trained, s3_storage: Storage, s3_bucket: str
) -> None:
    """Each pod pulls into its own volume, and node rank 1's pull leaves every weight file to rank 0. Here the config
    names each rank's folder by $RANK, so rank 1 reads only what its pull left it (config, tokenizer) and rank 0
    its complete copy: training matches the run in which both ranks read complete folders, bit for bit."""
    algo, roles = "critic-wmtp", ("base", "rm")
    complete = trained(algo, 2)
    for role in roles:
        s3_storage.upload(tiny_models[role], parse_uri(f"s3://{s3_bucket}/models/{role}"))
    pods = work / "pods"
    for rank in (0, 1):
        jobs = [Job(f"s3://{s3_bucket}/models/{r}", str(pods / f"rank{rank}" / r), PULL_WEIGHTS_RANK0) for r in roles]
        pull(jobs, s3_storage, node_rank=rank)
    weights = {rank: [p.name for p in (pods / f"rank{rank}").rglob("*") if is_weight_file(p.name)] for rank in (0, 1)}
    assert weights[0] and not weights[1]

    models = {role: Path(f"{pods}/rank${{RANK}}/{role}") for role in roles}
    # A timeout that a loaded machine cannot reach: this test is about the files, not about a hung rank.
    distributed = {"enabled": True, "timeout_s": 300}
    config, recipe, root = scenario_files(
        work, models, algo, f"{algo}-2-pulled", 2, **{"devices.distributed": distributed}
    )
    run_to_end(train_cli(config, recipe, nproc=2))
    by_step = logged(*mlflow_run(work, root, algo))

    assert [values[-1] for _, values in sorted(by_step.items())] == complete.losses
    got, want = (model_tensors(r / step_dir_name(STEPS)) for r in (root, complete.root))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
