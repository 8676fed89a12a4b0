"""FSDP2 training throughput and peak memory: n=4 multi-token heads against n=1 (next-token only), same trunk.

Each head count trains in its own `torchrun --standalone` group, so each peak is its own. The step is the
trainer's: `wmtp.distributed.parallelize` (FSDP2 on every decoder layer and extra head, the MTP model as root;
bf16 compute with fp32 reduction on CUDA), `compute_loss` with baseline-mtp (per-head checkpointed
unembedding), global-norm clipping over DTensor gradients and AdamW. Tokens are random: throughput does not
depend on them. Tokens/s counts every rank's tokens; memory is the largest rank's.

    python benchmarks/fsdp.py                      # the tiny Llama of the tests, CPU, 2 ranks over gloo
    python benchmarks/fsdp.py --device cuda        # ~370M-parameter Llama from a config, every visible GPU
    python benchmarks/fsdp.py --device cuda --nproc 8 --hidden 2048 --layers 24 --seq 4096 --ac
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PRESETS = {
    # The tests' tiny model (wmtp.models.build_tiny_models).
    "cpu": {"hidden": 64, "layers": 2, "attention_heads": 4, "intermediate": 128, "vocab": 512, "seq": 128, "batch": 4},
    # ~370M parameters at n=1 (+3 × 12.6M per extra head): Llama layout at GPT-2-medium width.
    "cuda": {
        "hidden": 1024, "layers": 24, "attention_heads": 16, "intermediate": 2816, "vocab": 32000, "seq": 2048,
        "batch": 4,
    },
}  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--nproc", type=int, help="Ranks. Default: 2 on CPU, every visible GPU on CUDA.")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int, help="Decoder layers of the trunk (head 0 is the last).")
    parser.add_argument("--attention-heads", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--seq", type=int, help="Tokens per sequence.")
    parser.add_argument("--batch", type=int, help="Sequences per rank per step.")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps.")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ac", action="store_true", help="Activation checkpointing of layers and heads.")
    parser.add_argument("--cpu-offload", action="store_true", help="FSDP CPUOffloadPolicy.")
    parser.add_argument("--no-bf16", action="store_true", help="CUDA: train in fp32 instead of bf16.")
    parser.add_argument("--heads", type=int, help=argparse.SUPPRESS)  # set for the workers
    args = parser.parse_args()
    for key, value in PRESETS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.nproc is None:
        import torch

        args.nproc = torch.cuda.device_count() if args.device == "cuda" else 2
    return args


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed
    from transformers import LlamaConfig, LlamaForCausalLM

    from wmtp.algorithms import BaselineMTP, compute_loss
    from wmtp.config import Devices, DistributedSettings, FSDPSettings, OptimSection
    from wmtp.data import Batch, head_labels
    from wmtp.distributed import close_process_group, full_tensor, init_distributed, parallelize
    from wmtp.models import MTPModel
    from wmtp.optim import build_optimizer

    dist = init_distributed(DistributedSettings(enabled=True), torch.device(args.device))
    bf16 = args.device == "cuda" and not args.no_bf16
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.attention_heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)  # the same weights on every rank, as the trainer's check requires
    with torch.device(dist.device):
        model = MTPModel(LlamaForCausalLM(config), n_heads=args.heads)
    parameters = sum(p.numel() for p in model.parameters())
    fsdp = FSDPSettings(enabled=True, activation_checkpointing=args.ac, cpu_offload=args.cpu_offload)
    devices = Devices(mixed_precision="bf16" if bf16 else "no", fsdp=fsdp)
    parallelize(model, [], [], devices, dist)
    optimizer = build_optimizer(list(model.parameters()), OptimSection())
    generator = torch.Generator().manual_seed(dist.rank)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    batch = Batch(ids, head_labels(ids, torch.full((args.batch,), args.seq), args.heads)).to(dist.device)
    algorithm = BaselineMTP()

    def step() -> None:
        with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = compute_loss(model, algorithm, batch)
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        norm = full_tensor(torch.nn.utils.get_total_norm([p.grad for p in params]))
        torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    rss_before = _rss_mib()
    for _ in range(args.warmup):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - started
    if dist.device.type == "cuda":
        peak, grown = torch.cuda.max_memory_allocated() / 2**20, 0.0
    else:
        # ru_maxrss is the process's high-water mark (KiB on Linux), hence one process per configuration; the
        # growth over the RSS before the first step is what training added (activations, gradients, AdamW).
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        grown = peak - rss_before
    worst = torch.tensor([peak, grown], device=dist.device)
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    result = {
        "heads": args.heads,
        "parameters": parameters,
        "tokens_per_s": args.steps * args.batch * args.seq * dist.world_size / seconds,
        "ms_per_step": 1000 * seconds / args.steps,
        # CUDA: peak allocated by PyTorch; CPU: peak RSS, libraries included, and its growth during training.
        "peak_mib": worst[0].item(),
        "training_mib": worst[1].item(),
    }
    if dist.is_main:
        print("RESULT " + json.dumps(result), flush=True)
    close_process_group()


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(args: argparse.Namespace, heads: int) -> dict[str, float]:
    # Spelled out rather than forwarded: torchrun would take an abbreviation such as --nproc for its own.
    sizes = [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in [*PRESETS["cpu"], "steps", "warmup"]]
    flags = [f"--{key.replace('_', '-')}" for key in ("ac", "cpu_offload", "no_bf16") if getattr(args, key)]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
        __file__, f"--device={args.device}", *sizes, *flags, f"--heads={heads}",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"heads={heads} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    args = parse_args()
    if args.heads is not None:
        worker(args)
        return
    import torch

    size = {k: getattr(args, k) for k in PRESETS["cpu"]}
    print(f"device={args.device} ranks={args.nproc} {size} steps={args.steps} ac={args.ac} torch={torch.__version__}")
    results = [run(args, heads) for heads in (1, 4)]
    print(f"{'heads':>5} {'params':>12} {'tokens/s':>12} {'ms/step':>9} {'peak MiB':>9} {'training MiB':>12}")
    for r in results:
        print(f"{r['heads']:>5} {r['parameters']:>12,} {r['tokens_per_s']:>12,.0f} {r['ms_per_step']:>9.1f} "
              f"{r['peak_mib']:>9,.0f} {r['training_mib']:>12,.0f}")  # fmt: skip
    one, four = results
    ratios = f"n=4 / n=1: tokens/s x{four['tokens_per_s'] / one['tokens_per_s']:.2f}, "
    ratios += f"peak memory x{four['peak_mib'] / one['peak_mib']:.2f}"
    if one["training_mib"] > 0:
        ratios += f", training memory x{four['training_mib'] / one['training_mib']:.2f}"
    print(ratios)


if __name__ == "__main__":
    main()
