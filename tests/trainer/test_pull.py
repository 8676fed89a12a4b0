"""`wmtp pull` against the moto S3 server: layout, ranges, idempotence, crash, concurrency, verification, errors."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.retries.standard
import pytest
from botocore.config import Config as BotoConfig
from botocore.exceptions import ResponseStreamingError
from botocore.response import StreamingBody
from botocore.stub import Stubber
from typer.testing import CliRunner

from wmtp import contract
from wmtp.cli import app
from wmtp.pull import Job, load_spec, main, pull
from wmtp.pull import state as pull_state
from wmtp.pull.fetch import MiB, expected_digest
from wmtp.pull.state import STATE_DIR, DestLock
from wmtp.storage import LocalTree, Storage, StorageError, parse_uri
from wmtp.storage.s3 import S3Backend

SECRET = "s3cr3t-never-printed"


def through(client: Any) -> Storage:
    """A Storage whose S3 backend talks through `client` (a spy, or a client with stubbed answers)."""
    storage = Storage()
    storage.backends["s3"] = S3Backend(client=client)
    return storage


def client_of(storage: Storage) -> Any:
    return storage.backends["s3"].client  # type: ignore[attr-defined]


class Spy:
    """The real client, recording get_object calls; `mangle(n, args, data)` may replace the n-th body."""

    def __init__(self, client: Any, mangle: Callable[[int, dict, bytes], Any] | None = None) -> None:
        self._client, self._mangle = client, mangle
        self.gets: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_object(self, **args: Any) -> dict[str, Any]:
        response = self._client.get_object(**args)
        with self._lock:
            self.gets.append(args)
            n = len(self.gets)
        if self._mangle is not None:
            data = response["Body"].read()
            body = self._mangle(n, args, data)
            response["Body"] = body if not isinstance(body, bytes) else StreamingBody(io.BytesIO(body), len(body))
        return response


class BrokenBody:
    """A response stream that is cut after half its bytes, as a reset connection would."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def iter_chunks(self, size: int) -> Iterator[bytes]:
        yield self.data[: len(self.data) // 2]
        raise ResponseStreamingError(error="connection reset by peer")


def blob(size: int, seed: int) -> bytes:
    return (seed.to_bytes(4, "big") * (size // 4 + 1))[:size] if size < 4096 else os.urandom(size)


def put(storage: Storage, bucket: str, objects: dict[str, bytes]) -> None:
    for key, data in objects.items():
        client_of(storage).put_object(Bucket=bucket, Key=key, Body=data)


def files_under(dest: Path) -> dict[str, bytes]:
    return {
        p.relative_to(dest).as_posix(): p.read_bytes()
        for p in sorted(dest.rglob("*"))
        if p.is_file() and STATE_DIR not in p.relative_to(dest).parts
    }


def run_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "wmtp", "pull", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def summary_of(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def model(s3_storage: Storage, s3_bucket: str) -> dict[str, bytes]:
    """A model prefix with nested keys and an object of 3.5 parts, plus neighbours that must not be pulled."""
    objects = {
        "models/base/config.json": b'{"n_heads": 4}',
        "models/base/empty/__init__.py": b"",
        "models/base/tokenizer/vocab.json": blob(3000, 1),
        "models/base/shards/deep/model.bin": os.urandom(3 * MiB + MiB // 2),
        "models/base-v2/config.json": b"{}",
        "models/basement.txt": b"not me",
    }
    put(s3_storage, s3_bucket, objects)
    return {k.removeprefix("models/base/"): v for k, v in objects.items() if k.startswith("models/base/")}


def test_prefix_is_mirrored_with_nested_layout_and_large_objects_in_ranges(
    s3_storage: Storage, s3_bucket: str, model: dict[str, bytes], tmp_path: Path
) -> None:
    line = b'{"text": "x"}\n'
    put(s3_storage, s3_bucket, {"data/train.jsonl": line})
    spy = Spy(client_of(s3_storage))
    jobs = [
        Job(f"s3://{s3_bucket}/models/base", str(tmp_path)),
        Job(f"s3://{s3_bucket}/data/train.jsonl", str(tmp_path)),
    ]

    summary = pull(jobs, through(spy), workers=4, part_size=MiB)

    assert files_under(tmp_path) == {**model, "train.jsonl": line}
    assert summary["files"] == 5 and summary["skipped"] == 0
    assert summary["bytes"] == sum(map(len, model.values())) + len(line)
    big = sorted(g["Range"] for g in spy.gets if g["Key"].endswith("model.bin"))
    assert big == [f"bytes={s}-{min(s + MiB, len(model['shards/deep/model.bin'])) - 1}" for s in range(0, 4 * MiB, MiB)]
    assert all("Range" not in g for g in spy.gets if not g["Key"].endswith("model.bin"))


def test_rerun_on_a_complete_destination_fetches_nothing_in_under_a_second(
    s3_storage: Storage, s3_bucket: str, model: dict[str, bytes], tmp_path: Path
) -> None:
    jobs = [Job(f"s3://{s3_bucket}/models/base", str(tmp_path))]
    pull(jobs, s3_storage, part_size=MiB)
    spy = Spy(client_of(s3_storage))

    summary = pull(jobs, through(spy), part_size=MiB)

    assert spy.gets == []
    assert summary["files"] == 0 and summary["skipped"] == len(model)
    assert summary["seconds"] < 1.0


def test_an_object_changed_in_s3_is_the_only_one_fetched_again(
    s3_storage: Storage, s3_bucket: str, model: dict[str, bytes], tmp_path: Path
) -> None:
    jobs = [Job(f"s3://{s3_bucket}/models/base", str(tmp_path))]
    pull(jobs, s3_storage, part_size=MiB)
    put(s3_storage, s3_bucket, {"models/base/config.json": b'{"n_heads": 8}'})

    summary = pull(jobs, s3_storage, part_size=MiB)

    assert (summary["files"], summary["skipped"]) == (1, len(model) - 1)
    assert (tmp_path / "config.json").read_bytes() == b'{"n_heads": 8}'


def test_sigkill_mid_transfer_then_rerun_fetches_only_the_rest(
    s3_storage: Storage, s3_bucket: str, s3_endpoint: str, tmp_path: Path
) -> None:
    small = {f"m/a{i}.json": blob(2000, i) for i in range(5)}
    big = os.urandom(24 * MiB)
    put(s3_storage, s3_bucket, {**small, "m/z-big.bin": big})
    args = (f"s3://{s3_bucket}/m", "--dest", str(tmp_path), "--endpoint-url", s3_endpoint)
    # One worker and 1 MiB ranges: the small files land first, then the big one takes 24 requests.
    proc = run_cli(*args, "--workers", "1", "--part-size", "1")
    journal = tmp_path / STATE_DIR / "journal.jsonl"
    deadline = time.monotonic() + 30
    while not (journal.exists() and journal.read_text().count("\n") == 5):  # the small files are recorded
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert not (tmp_path / "z-big.bin").exists(), "killed too late: the big file was already complete"
    assert json.loads((tmp_path / STATE_DIR / "marker.json").read_text())["complete"] is False
    rerun = run_cli(*args, "--part-size", "1")
    out, err = rerun.communicate(timeout=60)

    assert rerun.returncode == 0, err
    summary = summary_of(out)
    assert (summary["files"], summary["bytes"], summary["skipped"]) == (1, len(big), 5)
    assert files_under(tmp_path) == {"z-big.bin": big, **{k.removeprefix("m/"): v for k, v in small.items()}}
    assert list((tmp_path / STATE_DIR).glob("tmp/*")) == []


def test_concurrent_pullers_on_one_destination_download_once_and_the_other_waits(
    s3_storage: Storage, s3_bucket: str, s3_endpoint: str, tmp_path: Path
) -> None:
    objects = {f"m/f{i}.txt": blob(1000, i) for i in range(4)} | {"m/big.bin": os.urandom(32 * MiB)}
    put(s3_storage, s3_bucket, objects)
    args = (f"s3://{s3_bucket}/m", "--dest", str(tmp_path), "--endpoint-url", s3_endpoint)
    procs = [run_cli(*args, "--workers", "1", "--part-size", "1") for _ in range(2)]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    results = [(proc.returncode, *output) for proc, output in zip(procs, outputs, strict=True)]

    assert [rc for rc, _, _ in results] == [0, 0], results
    summaries = [summary_of(out) for _, out, _ in results]
    downloader = next(n for n, s in enumerate(summaries) if s["files"] > 0)
    waiter = 1 - downloader
    assert summaries[downloader]["files"] == len(objects)
    # The waiter found every file complete and recorded when it planned: it never saw one half-written.
    assert (summaries[waiter]["files"], summaries[waiter]["skipped"]) == (0, len(objects))
    assert "waiting" in results[waiter][2]
    assert files_under(tmp_path) == {k.removeprefix("m/"): v for k, v in objects.items()}


def test_a_locally_modified_file_is_replaced_on_rerun(
    s3_storage: Storage, s3_bucket: str, model: dict[str, bytes], tmp_path: Path
) -> None:
    jobs = [Job(f"s3://{s3_bucket}/models/base", str(tmp_path))]
    pull(jobs, s3_storage, part_size=MiB)
    target = tmp_path / "tokenizer" / "vocab.json"
    target.write_bytes(bytes(len(model["tokenizer/vocab.json"])))  # same size, other bytes, new mtime

    summary = pull(jobs, s3_storage, part_size=MiB)

    assert summary["files"] == 1
    assert target.read_bytes() == model["tokenizer/vocab.json"]


@pytest.mark.parametrize("victim", ["tokenizer/vocab.json", "shards/deep/model.bin"])
def test_verify_rehashes_and_replaces_silent_corruption(
    s3_storage: Storage, s3_bucket: str, model: dict[str, bytes], tmp_path: Path, victim: str
) -> None:
    jobs = [Job(f"s3://{s3_bucket}/models/base", str(tmp_path))]
    pull(jobs, s3_storage, part_size=MiB)
    target = tmp_path / victim
    stat = target.stat()
    with open(target, "r+b") as f:  # bit rot: same size and mtime, so only re-hashing can notice
        f.seek(100)
        f.write(b"\xff\x00\xff")
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    assert pull(jobs, s3_storage, part_size=MiB)["files"] == 0
    summary = pull(jobs, s3_storage, part_size=MiB, verify=True)

    assert (summary["files"], summary["skipped"]) == (1, len(model) - 1)
    assert target.read_bytes() == model[victim]


@pytest.mark.parametrize("size", [3000, 3 * MiB], ids=["single-get", "ranged"])
@pytest.mark.parametrize("checksum", ["crc32", "md5"])
def test_a_corrupted_download_is_fetched_again_then_fails_naming_the_file(
    s3_endpoint: str, s3_storage: Storage, s3_bucket: str, tmp_path: Path, size: int, checksum: str
) -> None:
    # Without an additional checksum, S3 (and moto) have only the ETag, the MD5 of a single-part upload.
    calculation = "when_supported" if checksum == "crc32" else "when_required"
    uploader = boto3.client("s3", endpoint_url=s3_endpoint, config=BotoConfig(request_checksum_calculation=calculation))
    data = os.urandom(size)
    uploader.put_object(Bucket=s3_bucket, Key="m/w.bin", Body=data)
    head = client_of(s3_storage).head_object(Bucket=s3_bucket, Key="m/w.bin", ChecksumMode="ENABLED")
    expected = expected_digest(head)
    assert expected is not None and expected[0] == checksum
    jobs = [Job(f"s3://{s3_bucket}/m", str(tmp_path))]

    def flip(data: bytes) -> bytes:
        return bytes([data[0] ^ 1]) + data[1:]

    once = Spy(client_of(s3_storage), lambda n, args, body: flip(body) if n == 1 else body)
    assert pull(jobs, through(once), part_size=MiB)["files"] == 1
    assert (tmp_path / "w.bin").read_bytes() == data
    assert len(once.gets) == 2 * -(-size // MiB)

    always = Spy(
        client_of(s3_storage),
        lambda n, args, body: flip(body) if args.get("Range", "bytes=0-").startswith("bytes=0-") else body,
    )
    dest = tmp_path / "again"
    with pytest.raises(StorageError) as err:
        pull([Job(f"s3://{s3_bucket}/m", str(dest))], through(always), part_size=MiB)
    assert err.value.code == 1
    assert all(part in str(err.value) for part in (f"s3://{s3_bucket}/m/w.bin", checksum)), err.value
    assert files_under(dest) == {}


def test_a_stream_cut_mid_range_is_retried(s3_storage: Storage, s3_bucket: str, tmp_path: Path) -> None:
    data = os.urandom(2 * MiB + 7)
    put(s3_storage, s3_bucket, {"m/w.bin": data})
    spy = Spy(client_of(s3_storage), lambda n, args, body: BrokenBody(body) if n == 1 else body)

    summary = pull([Job(f"s3://{s3_bucket}/m", str(tmp_path))], through(spy), part_size=MiB)

    assert summary["files"] == 1 and len(spy.gets) == 4
    assert (tmp_path / "w.bin").read_bytes() == data


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_spec_file_pulls_each_uri_into_its_destination(
    s3_storage: Storage, s3_bucket: str, s3_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture, fmt: str
) -> None:
    put(s3_storage, s3_bucket, {"models/base/config.json": b"{}", "models/rm/config.json": b"[]", "d/x.jsonl": b"1\n"})
    items = [
        {"uri": f"s3://{s3_bucket}/models/base", "dest": str(tmp_path / "base")},
        {"uri": f"s3://{s3_bucket}/models/rm", "dest": str(tmp_path / "rm")},
        {"uri": f"s3://{s3_bucket}/d/x.jsonl", "dest": str(tmp_path / "data")},
    ]
    spec = tmp_path / f"spec.{fmt}"
    spec.write_text(
        json.dumps(items) if fmt == "json" else "".join(f"- {{uri: {i['uri']}, dest: {i['dest']}}}\n" for i in items)
    )

    code = main([], None, spec, workers=4, part_size_mb=1, verify=False, endpoint_url=s3_endpoint, region=None)

    assert code == 0
    assert summary_of(capsys.readouterr().out)["files"] == 3
    assert files_under(tmp_path / "base") == {"config.json": b"{}"}
    assert files_under(tmp_path / "rm") == {"config.json": b"[]"}
    assert files_under(tmp_path / "data") == {"x.jsonl": b"1\n"}


# ----------------------------------------------------------------------------- what each node rank pulls

# A model folder as the loaders see it: the files every rank reads (config, tokenizers, Meta's params.json, mtp.json,
# the safetensors index) and the weights that rank 0 alone reads.
READ_BY_EVERY_RANK = {
    "config.json": b'{"model_type": "llama"}',
    "generation_config.json": b"{}",
    "tokenizer.json": blob(3000, 2),
    "tokenizer_config.json": b"{}",
    "tokenizer.model": blob(2000, 3),
    "params.json": b'{"dim": 64}',
    "mtp.json": b'{"n_heads": 4}',
    "model.safetensors.index.json": b'{"weight_map": {}}',
}
READ_BY_RANK_0 = {
    "model-00001-of-00002.safetensors": os.urandom(2 * MiB + 5),
    "model-00002-of-00002.safetensors": blob(3000, 4),
    "mtp_heads.safetensors": blob(1000, 5),
    "consolidated.00.pth": blob(1500, 6),
    "pytorch_model.bin": blob(800, 7),
}


@pytest.fixture
def model_folder(s3_storage: Storage, s3_bucket: str) -> str:
    put(s3_storage, s3_bucket, {f"models/7b/{k}": v for k, v in {**READ_BY_EVERY_RANK, **READ_BY_RANK_0}.items()})
    return f"s3://{s3_bucket}/models/7b"


@pytest.mark.parametrize(
    ("node_rank", "weights"),
    [({"NODE_RANK": "0"}, True), ({"NODE_RANK": "1"}, False), (["--node-rank", "3"], False), ({}, True)],
    ids=["env-rank-0", "env-rank-1", "flag-rank-3", "no-rank"],
)
def test_node_ranks_other_than_0_pull_the_weights_of_no_model(
    s3_storage: Storage, s3_bucket: str, s3_endpoint: str, model_folder: str, tmp_path: Path,
    node_rank: dict[str, str] | list[str], weights: bool,
) -> None:  # fmt: skip
    put(s3_storage, s3_bucket, {"data/train.bin": b"tokens"})  # a dataset is pulled whole on every rank
    spec = tmp_path / "pull.yaml"
    spec.write_text(
        f"- {{uri: {model_folder}, dest: {tmp_path / 'base'}, weights: {contract.PULL_WEIGHTS_RANK0}}}\n"
        f"- {{uri: s3://{s3_bucket}/data/train.bin, dest: {tmp_path / 'data'}}}\n"
    )
    env = {contract.ENV_NODE_RANK: None, **(node_rank if isinstance(node_rank, dict) else {})}
    flags = node_rank if isinstance(node_rank, list) else []
    args = ["pull", "--spec", str(spec), "--endpoint-url", s3_endpoint, *flags]

    result = CliRunner().invoke(app, args, env=env)

    assert result.exit_code == 0, result.output
    summary = summary_of(result.stdout)
    pulled, left = ({**READ_BY_EVERY_RANK, **READ_BY_RANK_0}, {}) if weights else (READ_BY_EVERY_RANK, READ_BY_RANK_0)
    assert files_under(tmp_path / "base") == pulled
    assert files_under(tmp_path / "data") == {"train.bin": b"tokens"}
    assert summary["bytes"] == sum(map(len, pulled.values())) + len(b"tokens")
    assert (summary["rank0_only"], summary["rank0_only_bytes"]) == (len(left), sum(map(len, left.values())))


@pytest.mark.parametrize("entry", ["{uri: s3://b/m, dest: /x, weights: rank1}", "{uri: s3://b/m, dest: /x, w: 1}"])
def test_a_spec_entry_with_an_unknown_weights_value_or_key_is_refused(tmp_path: Path, entry: str) -> None:
    spec = tmp_path / "pull.yaml"
    spec.write_text(f"- {entry}\n")
    with pytest.raises(StorageError, match=r"list of \{uri, dest\} mappings \(each may add weights: all \| rank0\)"):
        load_spec(spec)


def test_on_a_shared_volume_a_pull_that_leaves_the_weights_out_keeps_their_records(
    s3_storage: Storage, s3_bucket: str, model_folder: str, tmp_path: Path
) -> None:
    job = Job(model_folder, str(tmp_path), weights=contract.PULL_WEIGHTS_RANK0)
    everything = {**READ_BY_EVERY_RANK, **READ_BY_RANK_0}

    first = pull([job], s3_storage, part_size=MiB, node_rank=1)
    full = pull([job], s3_storage, part_size=MiB, node_rank=0)
    # A change in S3 sends node 1 under the lock again: it rewrites the marker, keeping what rank 0 recorded.
    put(s3_storage, s3_bucket, {"models/7b/config.json": b'{"model_type": "llama", "v": 2}'})
    again = pull([job], s3_storage, part_size=MiB, node_rank=1)
    marker = json.loads((tmp_path / STATE_DIR / "marker.json").read_text())
    spy = Spy(client_of(s3_storage))
    last = pull([job], through(spy), part_size=MiB, node_rank=0)

    assert (first["files"], first["rank0_only"]) == (len(READ_BY_EVERY_RANK), len(READ_BY_RANK_0))
    assert (full["files"], full["skipped"]) == (len(READ_BY_RANK_0), len(READ_BY_EVERY_RANK))
    assert (again["files"], again["skipped"]) == (1, len(READ_BY_EVERY_RANK) - 1)
    assert marker["complete"] and set(marker["files"]) == set(everything)
    assert spy.gets == [] and (last["files"], last["skipped"]) == (0, len(everything))


def test_a_folder_pulled_for_a_node_rank_other_than_0_builds_the_same_empty_models(
    s3_storage: Storage, s3_bucket: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """What the trainer reads on a rank other than 0 (`Trainer.build_models` with `empty`): the vocabulary check,
    then each model built on the meta device; nothing of it may need a weight file."""
    import torch

    from wmtp.config import ModelPaths
    from wmtp.models import FROZEN_LOADERS, check_vocabularies, load_mtp_model

    for role, path in tiny_models.items():
        s3_storage.upload(path, parse_uri(f"s3://{s3_bucket}/tiny/{role}"))
    jobs = [
        Job(f"s3://{s3_bucket}/tiny/{role}", str(tmp_path / role), contract.PULL_WEIGHTS_RANK0) for role in tiny_models
    ]
    summary = pull(jobs, s3_storage, node_rank=1)
    assert summary["rank0_only"] == len(tiny_models)
    assert not [p for p in tmp_path.rglob("*") if contract.is_weight_file(p.name)]

    def built(paths: dict[str, str]) -> dict[str, object]:
        check_vocabularies(ModelPaths(**paths), ("ref", "rm"), Storage())
        model, tokenizer = load_mtp_model(paths["base"], Storage(), 4, "block", empty=True)
        frozen = {role: FROZEN_LOADERS[role](paths[role], Storage(), empty=True) for role in ("ref", "rm")}
        shapes = {
            role: [(name, p.shape, p.dtype, p.is_meta) for name, p in module.named_parameters()]
            for role, module in {"base": model, **frozen}.items()
        }
        buffers = {role: dict(module.named_buffers()) for role, module in {"base": model, **frozen}.items()}
        return {"shapes": shapes, "buffers": buffers, "vocab": tokenizer.get_vocab()}

    pulled = built({role: str(tmp_path / role) for role in tiny_models})
    whole = built({role: str(path) for role, path in tiny_models.items()})
    assert pulled["shapes"] == whole["shapes"] and pulled["vocab"] == whole["vocab"]
    assert all(meta for shapes in pulled["shapes"].values() for *_, meta in shapes)
    for role, buffers in whole["buffers"].items():
        assert buffers.keys() == pulled["buffers"][role].keys()
        assert all(torch.equal(buffer, pulled["buffers"][role][name]) for name, buffer in buffers.items())


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def denied(monkeypatch: pytest.MonkeyPatch) -> None:
    """Moto does not enforce bucket policies by default, so S3's answer is stubbed on a real client."""
    client = boto3.client("s3", endpoint_url="http://127.0.0.1:1")
    stubber = Stubber(client)
    stubber.add_client_error("list_objects_v2", "AccessDenied", "Access Denied", http_status_code=403)
    stubber.add_client_error("head_object", "403", "Forbidden", http_status_code=403)  # the single-object try
    stubber.activate()
    monkeypatch.setattr("wmtp.pull.Storage", lambda **settings: through(client))


@pytest.mark.parametrize(
    ("case", "code", "says"),
    [
        ("missing bucket", 3, "bucket does not exist"),
        ("missing key", 3, "no such object or prefix"),
        ("access denied", 4, "access denied"),
        ("unreachable endpoint", 5, "cannot reach the S3 endpoint"),
        ("bad spec", 2, "list of {uri, dest}"),
    ],
)
def test_errors_are_one_line_with_an_exit_code_and_leave_no_file(
    s3_storage: Storage, s3_bucket: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture, case: str, code: int, says: str,
) -> None:  # fmt: skip
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    put(s3_storage, s3_bucket, {"m/a.txt": b"a"})
    uri, endpoint, spec = f"s3://{s3_bucket}/m", s3_endpoint, None
    if case == "missing bucket":
        uri = "s3://no-such-bucket-here/m"
    elif case == "missing key":
        uri = f"s3://{s3_bucket}/no/such/key"
    elif case == "access denied":
        denied(monkeypatch)
    elif case == "unreachable endpoint":
        endpoint = f"http://127.0.0.1:{closed_port()}"
        # botocore's standard retries (8 attempts, backoff up to 20 s) still run; only their sleeps are cut.
        monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount", lambda self, ctx: 0)
    elif case == "bad spec":
        spec = tmp_path / "spec.yaml"
        spec.write_text("uri: s3://b/k\ndest: /x\n")
    dest = tmp_path / "dest"
    sources, dest_arg = ([], None) if spec else ([uri], dest)

    rc = main(sources, dest_arg, spec, workers=2, part_size_mb=1, verify=False, endpoint_url=endpoint, region=None)

    out, err = capsys.readouterr()
    assert rc == code
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and says in err, err
    assert SECRET not in out + err
    assert not dest.exists() or files_under(dest) == {}


def test_expected_digest_uses_only_checksums_that_cover_the_whole_object() -> None:
    md5 = '"5d41402abc4b2a76b9719d911017c592"'
    cases = [
        ({"ETag": md5}, ("md5", md5.strip('"'))),
        ({"ETag": md5, "ChecksumCRC32": "NhCmhg=="}, ("crc32", "NhCmhg==")),
        ({"ETag": md5, "ChecksumCRC32": "NhCmhg==", "ChecksumSHA256": "LPJ="}, ("sha256", "LPJ=")),
        ({"ETag": '"abc-3"'}, None),  # multipart ETag: an MD5 of part MD5s
        ({"ETag": '"abc-3"', "ChecksumCRC32": "eeQtcA=="}, None),  # composite, as moto reports it
        ({"ETag": '"abc-3"', "ChecksumCRC32": "eeQtcA==-3", "ChecksumType": "COMPOSITE"}, None),
        ({"ETag": '"abc-3"', "ChecksumCRC32": "imzpJQ==", "ChecksumType": "FULL_OBJECT"}, ("crc32", "imzpJQ==")),
        ({"ETag": md5, "ServerSideEncryption": "aws:kms"}, None),  # an SSE-KMS ETag is no MD5 of the data
        ({"ETag": md5, "ChecksumCRC64NVME": "AAAAAAAAAAA="}, ("md5", md5.strip('"'))),
    ]
    for head, expected in cases:
        assert expected_digest(head) == expected, head


def owner_record(host: str) -> str:
    return json.dumps({"host": host, "pid": 1, "token": "dead", "beat": 7})


def test_lock_left_by_a_killed_puller_on_this_host_is_taken_at_once(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    path.write_text(owner_record(socket.gethostname()))  # its flock died with it
    started = time.monotonic()
    with DestLock(LocalTree(tmp_path), "lock", stale_after=30):
        assert time.monotonic() - started < 5
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert path.read_text() == ""


@pytest.fixture
def no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shared filesystem where flock succeeds without excluding anyone."""
    monkeypatch.setattr(pull_state.fcntl, "flock", lambda fd, op: None)


def acquire_in_background(lock: DestLock) -> threading.Event:
    """Set once `lock` is acquired (then released at once); a daemon thread, so a lock bug fails, never hangs."""
    acquired = threading.Event()

    def contend() -> None:
        with lock:
            acquired.set()

    threading.Thread(target=contend, daemon=True).start()
    return acquired


@pytest.mark.usefixtures("no_flock")
def test_stale_lock_file_from_another_host_is_taken_over_after_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    path.write_text(owner_record("pod-killed-elsewhere"))
    started = time.monotonic()
    acquired = acquire_in_background(DestLock(LocalTree(tmp_path), "lock", stale_after=0.5, poll=0.05))
    assert acquired.wait(5)
    assert time.monotonic() - started >= 0.5


@pytest.mark.usefixtures("no_flock")
def test_a_live_holder_is_never_taken_over_while_its_heartbeat_runs(tmp_path: Path) -> None:
    holder = DestLock(LocalTree(tmp_path), "lock", heartbeat=0.05, poll=0.05)
    holder.acquire()
    acquired = acquire_in_background(DestLock(LocalTree(tmp_path), "lock", stale_after=0.3, poll=0.05))
    assert not acquired.wait(1.5)
    holder.release()
    assert acquired.wait(5)
