"""GPU readiness: the FSDP, MTP-loss and checkpoint benchmarks on CUDA, one after the other, and their ratios.

    python benchmarks/gpu.py            # every visible GPU for FSDP; one GPU for the others

Each benchmark runs as its own process with `--device cuda` (see its docstring for what it measures); their full
tables are printed as they finish, then the lines that state the ratios, together.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = {
    "fsdp": ["--device", "cuda"],
    "mtp_loss": ["--device", "cuda"],
    "checkpoint": ["--device", "cuda"],
}
RATIO_MARKERS = ("/ n=1", "ratio", "/ synchronous save")


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA device is visible: these benchmarks need one (see benchmarks/README.md)")
    here = Path(__file__).parent
    ratios: list[str] = []
    for name, flags in BENCHMARKS.items():
        print(f"== {name} {' '.join(flags)}", flush=True)
        done = subprocess.run([sys.executable, str(here / f"{name}.py"), *flags], capture_output=True, text=True)
        print(done.stdout, end="", flush=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            ratios.append(f"{name}: FAILED (exit {done.returncode})")
            continue
        ratios += [f"{name}: {line}" for line in done.stdout.splitlines() if any(m in line for m in RATIO_MARKERS)]
    print(f"== ratios on {torch.cuda.get_device_name(0)} × {torch.cuda.device_count()}")
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
