"""Peak memory and step time of n=4 multi-token training against n=1 on the same trunk, in one run.

Each variant runs in fresh processes, so one variant's allocations never count towards another's peak.
CPU peak = the process's high-water RSS during the measured steps (reset through /proc/self/clear_refs) minus
its RSS before the model was built, in a process where glibc returns freed blocks at once so that RSS tracks
live memory; that slows allocation, so step time is measured in a second process with the default allocator.
CUDA peak = torch.cuda.max_memory_allocated over the measured steps.

The trunk's shape is scaled down from Meta's 7B_1T_4 keeping what sets the ratios: 32 layers, and an unembedding
that costs about 0.65 of one decoder layer per token (4096·32000 against a SwiGLU block of width 4096/11008).
The `naive` variant computes the same n=4 loss with every head's logits alive at once, for comparison.

    python benchmarks/mtp_loss.py [--device cuda] [--layers 32 --hidden 128 --vocab 1024 --seq 256 --batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from trunk import add_trunk_arguments, build_trunk

TARGETS = {"memory": 1.15, "time": 1.35}


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_variant(args: argparse.Namespace) -> dict[str, float]:
    import torch

    import wmtp.models  # noqa: F401  (imported before the baseline RSS, so that import memory is not counted)
    from wmtp.algorithms.loss import head_cross_entropy, weighted_mtp_loss
    from wmtp.data import head_labels

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    base_rss = rss_kib("VmRSS")
    base_cuda = torch.cuda.memory_allocated() if cuda else 0
    n_heads = 1 if args.variant == "n1" else 4
    model = build_trunk(args, n_heads).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    labels = head_labels(ids, torch.full((args.batch,), args.seq, device=device), n_heads)

    def step() -> None:
        heads = model(ids)
        if args.variant == "naive":
            logits = torch.stack([model.unembed(h) for h in heads], dim=2).float()  # [B, T, n, V] at once
            mask = labels != -100
            ce = torch.nn.functional.cross_entropy(
                logits.flatten(0, 2), labels.flatten().clamp(min=0), reduction="none"
            ).view_as(labels)
            loss = (ce * mask).sum() / mask.sum()
        else:
            ce, mask = head_cross_entropy(model, heads, labels)
            loss = weighted_mtp_loss(ce, mask, torch.ones_like(ce))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base_cuda) if cuda else (rss_kib("VmHWM") - base_rss) * 1024
    return {"peak_mib": peak / 2**20, "step_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    add_trunk_arguments(parser)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="Timing rounds over all variants; best kept.")
    parser.add_argument("--variant", choices=["n1", "n4", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    tight = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}

    def measure(variant: str, env: dict[str, str]) -> dict[str, float]:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    variants = ("n1", "n4", "naive")
    # Rounds alternate the variants so that drift in a shared machine's speed hits each of them alike;
    # each variant keeps its best median.
    step_s = {v: measure(v, dict(os.environ))["step_s"] for v in variants}
    for _ in range(args.rounds - 1):
        for v in variants:
            step_s[v] = min(step_s[v], measure(v, dict(os.environ))["step_s"])
    peaks = {v: measure(v, tight if args.device == "cpu" else dict(os.environ))["peak_mib"] for v in variants}
    results = {v: {"peak_mib": peaks[v], "step_s": step_s[v]} for v in variants}
    shape = f"{args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, batch {args.batch}×{args.seq}"
    print(f"MTP loss benchmark on {args.device} ({shape})")
    print(f"{'variant':<28}{'peak MiB':>10}{'step ms':>10}{'memory ×':>10}{'time ×':>9}")
    base = results["n1"]
    names = {"n1": "n=1", "n4": "n=4 (per-head checkpoint)", "naive": "n=4 naive (all logits)"}
    for variant, r in results.items():
        mem, tim = r["peak_mib"] / base["peak_mib"], r["step_s"] / base["step_s"]
        print(f"{names[variant]:<28}{r['peak_mib']:>10.1f}{r['step_s'] * 1e3:>10.1f}{mem:>10.3f}{tim:>9.3f}")
    n4 = results["n4"]
    for key, target in TARGETS.items():
        ratio = n4["peak_mib"] / base["peak_mib"] if key == "memory" else n4["step_s"] / base["step_s"]
        verdict = "meets" if ratio <= target else "MISSES"
        print(f"n=4 {key} ratio {ratio:.3f} {verdict} the target ≤ {target}")


if __name__ == "__main__":
    main()
