"""Self-speculative decoding against greedy decoding of the same model: tokens/s ratio and mean accepted length.

A tiny 4-head model is first trained here with baseline-mtp (so its extra heads have learnt something), then
the same HumanEval prompts are decoded greedily and self-speculatively, each to --max-new-tokens, and again
with the task's stop strings; the outputs must be identical. Neither path keeps a KV cache, so the ratio
measures the forward passes saved, net of the extra heads' cost (three blocks on top of the trunk). With
`--model DIR` it measures a trained final model instead (on a GPU machine: a larger one).

    python benchmarks/speculative.py [--steps 400 --prompts 20 --max-new-tokens 64 | --model DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml


def train_tiny(work: Path, steps: int, layers: int) -> Path:
    """Train a tiny base model of `layers` layers for `steps` with baseline-mtp; returns its final model."""
    from wmtp.config import load
    from wmtp.eval.tasks import humaneval_path
    from wmtp.models import build_tiny_models
    from wmtp.train import Trainer

    models = build_tiny_models(work / "models", layers=layers)
    config = {
        "paths": {"models": {"base": str(models["base"])}, "datasets": {"humaneval": str(humaneval_path())},
                  "checkpoints": {"base_path": str(work / "ckpt"), "save_interval": steps}, "output_dir": str(work)},
        "devices": {"compute_backend": "cpu"},
        "log_interval": 50,
    }  # fmt: skip
    recipe = {
        "run": {"name": "spec"},
        "train": {"algo": "baseline-mtp", "max_steps": steps, "eval_interval": steps},
        "optim": {"lr": 3e-3, "warmup_ratio": 0.05},
        "data": {"sources": [{"name": "humaneval"}], "max_length": 128, "batch_size": 8, "eval_fraction": 0.05},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    Trainer(*load(work / "config.yaml", work / "recipe.yaml")).train()
    return work / "ckpt" / "spec" / "final"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="A trained final model directory; default: train a tiny one.")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--layers", type=int, default=8, help="Trunk layers of the tiny model (heads cost 3 more).")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    import torch

    from wmtp.eval.decoding import Decoder
    from wmtp.eval.runner import load_model, measure_speed
    from wmtp.eval.tasks import humaneval, humaneval_path
    from wmtp.storage import Storage

    torch.set_num_threads(1)  # like for like: one thread for both decoders, whatever the machine's load
    with tempfile.TemporaryDirectory(prefix="wmtp-bench-spec-") as tmp:
        started = time.perf_counter()
        directory = args.model or train_tiny(Path(tmp), args.steps, args.layers)
        trained_s = time.perf_counter() - started
        model, tokenizer = load_model(str(directory), Storage())
        problems = humaneval(str(humaneval_path()), Storage())[: args.prompts]
        decoder = Decoder(model, tokenizer, args.max_new_tokens)
        decoder.stop_at_eos = False  # steady-state decoding: every prompt decodes max_new_tokens tokens
        speed = measure_speed(decoder, tokenizer, problems, stops=False)
        on_task = measure_speed(Decoder(model, tokenizer, args.max_new_tokens), tokenizer, problems)
    speed["train_seconds"] = round(trained_s, 1)
    speed["with_task_stops"] = {k: on_task[k] for k in ("tokens", "identical", "speedup", "mean_accepted")}
    print(json.dumps(speed, indent=1))
    print(
        f"self-speculative / greedy tokens/s: {speed['speedup']:.2f}x; mean accepted length "
        f"{speed['mean_accepted']:.2f} of {speed['heads']}; {speed['tokens_per_pass']:.2f} tokens per forward pass; "
        f"identical output: {speed['identical']}"
    )


if __name__ == "__main__":
    main()
