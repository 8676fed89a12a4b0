"""Sharded resume from S3: the bytes each rank reads when N ranks resume an N-rank checkpoint from a moto S3 store,
as a fraction of the checkpoint's size, for N = 1, 2 and 4. Target: ≤ 1.1/N plus metadata.

For each N, one `torchrun --standalone` group trains the n=4 trunk one step under FSDP2 (gloo), saves it with the
trainer's CheckpointManager to the store, and loads it into fresh modules; each rank reports the bytes its reads
fetched from the store: the byte ranges of its own tensors, `.metadata`, the trainer state and its RNG file.
Before sharded reads every rank downloaded the whole checkpoint (1.0 per rank).

    python benchmarks/resume.py [--ranks 1 2 4] [--layers 32 --hidden 128 --vocab 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

from servers import moto
from trunk import add_trunk_arguments, build_trunk


def worker(args: argparse.Namespace) -> None:
    import torch

    from wmtp.checkpoint import CheckpointManager, CheckpointStore
    from wmtp.config import Devices, DistributedSettings, FSDPSettings, S3Settings
    from wmtp.distributed import close_process_group, init_distributed, parallelize
    from wmtp.storage import Storage

    dist = init_distributed(DistributedSettings(enabled=True), torch.device("cpu"))
    store = CheckpointStore(f"s3://bench/resume-{dist.world_size}", Storage(s3=S3Settings(endpoint_url=args.endpoint)))
    group = dist.new_group()

    def manager() -> CheckpointManager:
        model = build_trunk(args, n_heads=4)
        parallelize(model, [], [], Devices(fsdp=FSDPSettings(enabled=True)), dist)
        modules = torch.nn.ModuleDict({"model": model})
        optimizer = torch.optim.AdamW(modules.parameters(), lr=1e-4)
        return CheckpointManager(store, modules=modules, optimizer=optimizer, states={}, save_interval=1,
                                 keep_last=1, fingerprint="bench", rank=dist.rank, group=group)  # fmt: skip

    saver = manager()
    model = saver.modules["model"]
    sum(model.unembed(hidden).mean() for hidden in model(torch.randint(0, args.vocab, (1, 16)))).backward()
    saver.optimizer.step()  # AdamW state, as a real checkpoint has
    saver.save(1)
    location = saver.wait()
    loader = manager()
    loader.load(store.step_location(1))
    if location is not None:
        size = store.storage.size(location)
        metadata = store.storage.size(location / ".metadata")
    else:
        size = metadata = 0
    totals = torch.tensor([float(size), float(metadata)])
    torch.distributed.all_reduce(totals, op=torch.distributed.ReduceOp.MAX)
    result = {"rank": dist.rank, "bytes": loader.bytes_read, "size": totals[0].item(), "metadata": totals[1].item()}
    print("RESULT " + json.dumps(result), flush=True)
    close_process_group()


def run(args: argparse.Namespace, ranks: int, endpoint: str) -> list[dict[str, float]]:
    sizes = [f"--{key}={getattr(args, key)}" for key in ("layers", "hidden", "vocab", "seq", "batch")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", __file__,
           *sizes, f"--endpoint={endpoint}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    # The ranks share one stdout: their lines may run into each other.
    results = [json.loads(found) for found in re.findall(r"RESULT (\{[^}]*\})", proc.stdout)]
    if proc.returncode != 0 or len(results) != ranks:
        sys.exit(f"{ranks} ranks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return sorted(results, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trunk_arguments(parser)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)  # set for the workers
    args = parser.parse_args()
    if args.endpoint:
        worker(args)
        return
    with moto() as endpoint:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        results = {n: run(args, n, endpoint) for n in args.ranks}
    print(f"resume benchmark: n=4 trunk ({args.layers} layers, hidden {args.hidden}, vocab {args.vocab}), moto S3")
    print(f"{'ranks':>5}{'checkpoint MiB':>16}{'metadata KiB':>14}  bytes read per rank / checkpoint size")
    for n, ranks in results.items():
        size, metadata = ranks[0]["size"], ranks[0]["metadata"]
        fractions = " ".join(f"{r['bytes'] / size:.3f}" for r in ranks)
        print(f"{n:>5}{size / 2**20:>16.1f}{metadata / 2**10:>14.1f}  {fractions}")
    for n, ranks in results.items():
        size, metadata = ranks[0]["size"], ranks[0]["metadata"]
        worst = max(r["bytes"] for r in ranks) / size
        target = 1.1 / n + metadata / size
        verdict = "meets" if worst <= target else "MISSES"
        print(f"{n} rank(s): the most any rank read is {worst:.3f} of the checkpoint "
              f"({verdict} the target ≤ 1.1/{n} + metadata = {target:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
