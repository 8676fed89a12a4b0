"""Loading a model for distributed training: peak host memory per rank as a fraction of the model's fp32 size,
on 1, 2 and 4 CPU ranks. Target: every rank but 0 ≤ 1/N + 0.1.

"sharded" is the trainer's way: every rank builds the model empty on the meta device, FSDP2 shards it, rank 0
reads the weights and `load_weights` scatters them, so each other rank only ever holds its shard and one tensor
in transit. "whole" is the way before: every rank loads the whole model, then shards it. The model (a Llama with
4 multi-token heads, a few hundred MB) is written once to a temporary directory with `save_pretrained`.
Peak = the high-water RSS during the load (reset through /proc/self/clear_refs once imports and the process
group are set up) minus the RSS at that moment, with glibc returning freed memory at once (MALLOC_* below), so
that RSS tracks live memory.

    python benchmarks/loading.py [--ranks 1 2 4] [--hidden 768 --layers 8 --vocab 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HEADS = 4
TIGHT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_model(args: argparse.Namespace, directory: Path) -> int:
    """A random Llama with its tokenizer in `directory`; returns the fp32 bytes of the multi-token model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from wmtp.models import MTPModel, build_tiny_tokenizer

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = MTPModel(LlamaForCausalLM(config), HEADS, "block")
    model.save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    return sum(p.numel() * 4 for p in model.parameters())


def worker(args: argparse.Namespace) -> None:
    import torch

    from wmtp.config import Devices, DistributedSettings, FSDPSettings
    from wmtp.distributed import close_process_group, init_distributed, load_weights, parallelize
    from wmtp.models import load_mtp_model
    from wmtp.storage import Storage

    dist = init_distributed(DistributedSettings(enabled=True), torch.device("cpu"))
    devices, storage = Devices(fsdp=FSDPSettings(enabled=True)), Storage()
    dist.barrier()
    base = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    if args.mode == "sharded":
        model, _ = load_mtp_model(args.model, storage, HEADS, "block", empty=True)
        parallelize(model, [], [], devices, dist)
        load_weights(model, lambda: load_mtp_model(args.model, storage, HEADS, "block")[0].state_dict(), dist)
    else:
        model, _ = load_mtp_model(args.model, storage, HEADS, "block")
        parallelize(model, [], [], devices, dist)
    dist.barrier()
    peak = (rss_kib("VmHWM") - base) * 1024
    print("RESULT " + json.dumps({"rank": dist.rank, "peak": peak}), flush=True)
    close_process_group()


def run(args: argparse.Namespace, ranks: int, mode: str, model: Path) -> list[int]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", __file__,
           f"--mode={mode}", f"--model={model}"]  # fmt: skip
    env = {**os.environ, **TIGHT_MALLOC, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    # The ranks share one stdout: their lines may run into each other.
    results = [json.loads(found) for found in re.findall(r"RESULT (\{[^}]*\})", proc.stdout)]
    if proc.returncode != 0 or len(results) != ranks:
        sys.exit(f"{mode} on {ranks} ranks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [r["peak"] for r in sorted(results, key=lambda r: r["rank"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--mode", choices=["sharded", "whole"], help=argparse.SUPPRESS)  # set for the workers
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="wmtp-bench-") as tmp:
        size = write_model(args, Path(tmp))
        results = {(n, mode): run(args, n, mode, Path(tmp)) for n in args.ranks for mode in ("sharded", "whole")}
    print(f"loading benchmark: {size / 2**20:.0f} MiB of fp32 weights (hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}, {HEADS} heads); peak RSS growth per rank / model size")  # fmt: skip
    print(f"{'ranks':>5}  {'sharded (rank 0, 1, ...)':<34}{'whole (rank 0, 1, ...)'}")
    for n in args.ranks:
        cells = [" ".join(f"{peak / size:.2f}" for peak in results[n, mode]) for mode in ("sharded", "whole")]
        print(f"{n:>5}  {cells[0]:<34}{cells[1]}")
    for n in args.ranks[1:] if args.ranks[0] == 1 else args.ranks:
        worst = max(results[n, "sharded"][1:]) / size
        target = 1 / n + 0.1
        print(f"{n} ranks, sharded: the largest peak of a rank but 0 is {worst:.3f} of the model "
              f"({'meets' if worst <= target else 'MISSES'} the target ≤ 1/{n} + 0.1 = {target:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
