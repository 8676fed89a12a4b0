"""Checkpoint save time, and the training stall it causes, as a fraction of step time; local disk and S3.

Saves are synchronous: training waits for the whole save, so the stall of one save is its save time, and the
average stall per step is save_time / (save_interval × step_time). The S3 store is a moto server on 127.0.0.1
that this script starts and stops.

    python benchmarks/checkpoint.py [--layers 32 --hidden 128 --vocab 1024 --save-interval 100]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from trunk import add_trunk_arguments, build_trunk


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trunk_arguments(parser)
    parser.add_argument("--save-interval", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from wmtp.algorithms.loss import head_cross_entropy, weighted_mtp_loss
    from wmtp.checkpoint import Checkpointer, CheckpointStore
    from wmtp.config import S3Settings
    from wmtp.data import head_labels
    from wmtp.storage import Storage

    modules = torch.nn.ModuleDict({"model": build_trunk(args, n_heads=4)})
    optimizer = torch.optim.AdamW(modules.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    labels = head_labels(ids, torch.full((args.batch,), args.seq), 4)

    def step() -> float:
        start = time.perf_counter()
        ce, mask = head_cross_entropy(modules["model"], modules["model"](ids), labels)
        weighted_mtp_loss(ce, mask, torch.ones_like(ce)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()
    step_s = statistics.median(step() for _ in range(args.repeats + 2))
    n_params = sum(p.numel() for p in modules.parameters())

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    moto, endpoint = start_moto()
    try:
        s3 = Storage(S3Settings(endpoint_url=endpoint))
        s3.s3.create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            stores = {"local": CheckpointStore(f"{tmp}/run", Storage()), "s3": CheckpointStore("s3://bench/run", s3)}
            results = {}
            for name, store in stores.items():
                checkpointer = Checkpointer(store, keep_last=1)
                times = []
                for i in range(args.repeats):
                    start = time.perf_counter()
                    checkpointer.save(i + 1, modules, optimizer, {"step": i + 1})
                    times.append(time.perf_counter() - start)
                size = store.storage.size(store.step_location(args.repeats))
                results[name] = (statistics.median(times), size)
    finally:
        moto.terminate()
        moto.wait()

    print(f"checkpoint benchmark: {n_params / 1e6:.1f}M parameters, step {step_s * 1e3:.0f} ms (CPU)")
    print(f"{'store':<8}{'size MiB':>10}{'save s':>9}{'save/step':>11}{'stall/step @' + str(args.save_interval):>17}")
    for name, (save_s, size) in results.items():
        ratio = save_s / step_s
        print(f"{name:<8}{size / 2**20:>10.1f}{save_s:>9.2f}{ratio:>10.2f}×{ratio / args.save_interval:>16.2%}")


if __name__ == "__main__":
    main()
