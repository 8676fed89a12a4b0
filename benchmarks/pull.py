"""`wmtp pull` against a single-stream boto3 `download_file` loop, same objects, same local endpoint, one run;
with `--pods N`, the bytes one attempt of an N-pod run pulls instead (see `pods_main`).

Starts its own moto S3 server (`moto_server` from this interpreter's bin), uploads a mixed set — a few large
objects and many small ones, >= 1 GB in all — then downloads it with:
  - single stream: boto3 `download_file` for each object in turn, `TransferConfig(use_threads=False)`;
  - boto3 threaded: the same loop with boto3's default 10 threads per object (for reference);
  - `wmtp pull`: the real CLI in a subprocess (its start-up included), then rerun on the complete destination;
  - `wmtp pull --part-size 8`: the same ranges as boto3 makes, to separate parallelism from larger ranges.
Each download goes to an empty folder; each timing is the best of `--rounds`. CPU seconds of the S3 server and
of the client are reported too: on a small machine they, not the network, set the ceiling.

    python benchmarks/pull.py [--large 3 --large-mib 320 --small 256 --small-kib 400 --rounds 2]
    python benchmarks/pull.py --pods 4 [--base-mib 256 --rm-mib 96]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.waiting import free_port
from wmtp import contract

TARGET = 2.0
BUCKET = "bench"
PREFIX = "set"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def start_server(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)


def upload(client: object, args: argparse.Namespace, scratch: Path) -> int:
    total = 0
    blob = scratch / "blob"
    for i in range(args.large):
        blob.write_bytes(os.urandom(args.large_mib << 20))
        client.upload_file(str(blob), BUCKET, f"{PREFIX}/shards/model-{i:05d}.safetensors")
        total += args.large_mib << 20
    blob.unlink()
    for i in range(args.small):
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/small/{i % 16:02d}/part-{i:05d}.json",
                          Body=os.urandom(args.small_kib << 10))  # fmt: skip
        total += args.small_kib << 10
    return total


def timed(server_pid: int, run: Callable[..., Any], *args: Any) -> tuple[dict[str, float], Any]:
    """Wall seconds, and CPU seconds of the S3 server and of this process with its children."""
    server_cpu, client_cpu, children = cpu_seconds(server_pid), time.process_time(), children_cpu()
    started = time.perf_counter()
    result = run(*args)
    return {
        "seconds": time.perf_counter() - started,
        "server_cpu": cpu_seconds(server_pid) - server_cpu,
        "client_cpu": time.process_time() - client_cpu + children_cpu() - children,
    }, result


def boto3_loop(client: object, keys: list[str], dest: Path, threads: bool) -> None:
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(use_threads=threads)
    for key in keys:
        target = dest / key
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(target), Config=config)


def wmtp_pull(endpoint: str, dest: Path, extra: list[str]) -> dict[str, float]:
    cmd = [sys.executable, "-m", "wmtp", "pull", f"s3://{BUCKET}/{PREFIX}", "--dest", str(dest),
           "--endpoint-url", endpoint, "--log-level", "warning", *extra]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wmtp pull failed ({done.returncode}): {done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- bytes per attempt of an N-pod run


def run_layout(base_mib: int, rm_mib: int) -> dict[str, int]:
    """Key → size: 7B_1T_4 + a 7B reward model + a dataset, the weights scaled down (×~1/100), the small files at
    their real sizes (Llama 2's tokenizer.model, an HF tokenizer.json and index, MBPP's train split)."""
    return {
        "models/7B_1T_4/params.json": 200,
        "models/7B_1T_4/tokenizer.model": 499_723,
        "models/7B_1T_4/consolidated.pth": base_mib << 20,
        "models/rm/config.json": 700,
        "models/rm/tokenizer.json": 1_842_767,
        "models/rm/tokenizer_config.json": 1_500,
        "models/rm/special_tokens_map.json": 400,
        "models/rm/model.safetensors.index.json": 23_950,
        **{f"models/rm/model-0000{i}-of-00003.safetensors": rm_mib << 20 for i in (1, 2, 3)},
        "data/mbpp/train.jsonl": 563_743,
    }


def pull_spec(path: Path, dests: Path, rank0_weights: bool) -> Path:
    """The spec the operator renders (`render.files.pulls`): models, marked for rank 0's weights or not, and data."""
    mark = f", {contract.PULL_WEIGHTS}: {contract.PULL_WEIGHTS_RANK0}" if rank0_weights else ""
    path.write_text(
        f"- {{uri: s3://{BUCKET}/models/7B_1T_4, dest: {dests}/base{mark}}}\n"
        f"- {{uri: s3://{BUCKET}/models/rm, dest: {dests}/rm{mark}}}\n"
        f"- {{uri: s3://{BUCKET}/data/mbpp/train.jsonl, dest: {dests}/data/mbpp}}\n"
    )
    return path


def attempt(endpoint: str, specs: list[Path]) -> list[dict[str, Any]]:
    """One attempt's init containers, all at once: pod i runs `wmtp pull --spec specs[i]` with NODE_RANK=i. Each
    summary gains `wall`, the seconds until that pod's puller exited."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "wmtp", "pull", "--spec", str(spec), "--endpoint-url", endpoint,
             "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, contract.ENV_NODE_RANK: str(rank)},
        )
        for rank, spec in enumerate(specs)
    ]  # fmt: skip

    def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
        out, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"wmtp pull failed ({proc.returncode}): {err}")
        return {**json.loads(out.strip().splitlines()[-1]), "wall": time.perf_counter() - started}

    with ThreadPoolExecutor(len(procs)) as waiters:  # each pod's own end, whatever order they end in
        return list(waiters.map(finish, procs))


CASES = [  # label, models marked for rank 0's weights, one volume shared by all pods, attempts
    ("emptyDir, every pod pulls everything (before)", False, False, 1),
    ("emptyDir, weights on node rank 0 alone", True, False, 1),
    ("persistentVolumeClaim shared by all pods", False, True, 2),
]


def pods_main(args: argparse.Namespace) -> None:
    """Per attempt of an N-pod run: the bytes S3 serves (GET bodies, counted by the server itself) and the bytes
    the pullers report, for emptyDir volumes where every pod pulls everything (before), where the weights are pulled
    on node rank 0 alone (now), and for one PVC shared by every pod, over two attempts."""
    from support.s3 import CountingS3Server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    load_before = os.getloadavg()
    layout = run_layout(args.base_mib, args.rm_mib)
    models = sum(size for key, size in layout.items() if key.startswith("models/"))
    weights = sum(size for key, size in layout.items() if contract.is_weight_file(key))
    small = sum(layout.values()) - weights
    server = CountingS3Server()
    server.start()
    scratch = Path(tempfile.mkdtemp(prefix="wmtp-bench-pods-"))
    rows = []
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=server.url)
        client.create_bucket(Bucket=BUCKET)
        for key, size in layout.items():
            client.put_object(Bucket=BUCKET, Key=key, Body=os.urandom(size))
        for case, (label, rank0_weights, shared, attempts) in enumerate(CASES):
            folder = scratch / f"case{case}"
            folder.mkdir()
            dests = [folder / ("pvc" if shared else f"pod{i}") for i in range(args.pods)]
            specs = [pull_spec(folder / f"spec{i}.yaml", dest, rank0_weights) for i, dest in enumerate(dests)]
            for number in range(1, attempts + 1):
                server.served.clear()
                results = attempt(server.url, specs)
                served, pulled = sum(s.bytes for s in server.gets()), sum(r["bytes"] for r in results)
                walls = [r["wall"] for r in results]
                rows.append((f"{label}, attempt {number}", served, pulled, walls[0], max(walls[1:])))
                print(f"  {rows[-1][0]}: {served / 1e6:.1f} MB from S3", flush=True)
            shutil.rmtree(folder)
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    bound = 1.1 * models + args.pods * small
    print(
        f"\n{args.pods} pods; models {models / 1e6:.1f} MB, of which weights {weights / 1e6:.1f} MB; small files "
        f"(configs, tokenizers, data) {small / 1e6:.2f} MB; bound 1.1 × models + N × small = {bound / 1e6:.1f} MB"
    )
    print(f"{'case':58s} {'S3 MB':>9s} {'pulled MB':>10s} {'pod 0 s':>8s} {'pods 1.. s':>11s}")
    for label, served, pulled, first, others in rows:
        print(f"{label:58s} {served / 1e6:9.1f} {pulled / 1e6:10.1f} {first:8.2f} {others:11.2f}")
    now = next(served for label, served, *_ in rows if "rank 0 alone" in label)
    verdict = "met" if now <= bound else "NOT met"
    print(f"\nweights on node rank 0 alone: {now / 1e6:.1f} MB from S3, bound {bound / 1e6:.1f} MB: {verdict}")
    load_after = os.getloadavg()
    print(f"cores: {os.cpu_count()}; load average (1, 5, 15 min) before {load_before}, after {load_after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", type=int, default=3, help="Large objects.")
    parser.add_argument("--large-mib", type=int, default=320, help="Size of each large object (MiB).")
    parser.add_argument("--small", type=int, default=256, help="Small objects.")
    parser.add_argument("--small-kib", type=int, default=400, help="Size of each small object (KiB).")
    parser.add_argument("--rounds", type=int, default=2, help="Timings are the best of this many rounds.")
    parser.add_argument("--pull-args", default="", help="Extra `wmtp pull` flags, e.g. '--workers 8'.")
    parser.add_argument(
        "--pods", type=int, default=0, help="Measure the bytes an attempt of this many pods (≥ 2) pulls."
    )
    parser.add_argument("--base-mib", type=int, default=256, help="--pods: the base model's weights (MiB).")
    parser.add_argument("--rm-mib", type=int, default=96, help="--pods: each of the reward model's 3 shards (MiB).")
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    if args.pods:
        pods_main(args)
        return

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = start_server(port)
    scratch = Path(tempfile.mkdtemp(prefix="wmtp-bench-pull-"))
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        started = time.perf_counter()
        total = upload(client, args, scratch)
        keys = [
            o["Key"] for p in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET) for o in p["Contents"]
        ]
        print(
            f"uploaded {len(keys)} objects, {total / 1e9:.2f} GB in {time.perf_counter() - started:.0f} s", flush=True
        )

        flags = args.pull_args.split()
        download = {
            "single": lambda dest: boto3_loop(client, keys, dest, threads=False),
            "threaded": lambda dest: boto3_loop(client, keys, dest, threads=True),
            "pull": lambda dest: wmtp_pull(endpoint, dest, flags),
            "pull-8": lambda dest: wmtp_pull(endpoint, dest, [*flags, "--part-size", "8"]),
        }
        results: dict[str, list[dict[str, float]]] = {name: [] for name in download}
        reruns: list[dict[str, float]] = []
        for _ in range(args.rounds):
            for name, run in download.items():
                dest = scratch / name
                results[name].append(timed(server.pid, run, dest)[0])
                print(f"  {name:9s} {results[name][-1]['seconds']:6.2f} s", flush=True)
                if name == "pull":
                    rerun, summary = timed(server.pid, wmtp_pull, endpoint, dest, flags)
                    assert summary["files"] == 0, summary
                    reruns.append({**rerun, "internal": summary["seconds"]})
                shutil.rmtree(dest)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)

    best = {name: min(runs, key=lambda r: r["seconds"]) for name, runs in results.items()}
    print(f"\n{'':24s} {'seconds':>8s} {'MB/s':>7s} {'server CPU s':>13s} {'client CPU s':>13s}")
    labels = {"single": "boto3 single stream", "threaded": "boto3 10 threads/object", "pull": "wmtp pull",
              "pull-8": "wmtp pull, 8 MiB parts"}  # fmt: skip
    for name, r in best.items():
        mbs = total / 1e6 / r["seconds"]
        print(f"{labels[name]:24s} {r['seconds']:8.2f} {mbs:7.0f} {r['server_cpu']:13.1f} {r['client_cpu']:13.1f}")
    ratio = best["single"]["seconds"] / best["pull"]["seconds"]
    print(
        f"\nwmtp pull / single stream: {ratio:.2f}x (target {TARGET:.1f}x: {'met' if ratio >= TARGET else 'NOT met'})"
    )
    for name, against in (("pull", "threaded"), ("pull-8", "single")):
        print(f"{labels[name]} / {labels[against]}: {best[against]['seconds'] / best[name]['seconds']:.2f}x")
    rerun = min(reruns, key=lambda r: r["seconds"])
    print(f"rerun on a complete destination: {rerun['seconds']:.2f} s wall (process start included), "
          f"{rerun['internal']:.3f} s inside the puller")  # fmt: skip
    print(f"cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
