"""The training loop: build the parts once, then step, log, evaluate, finish."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from wmtp.algorithms import Algorithm, build_algorithm, compute_loss
from wmtp.algorithms.loss import head_cross_entropy
from wmtp.config import Algorithm as AlgorithmName
from wmtp.config import Config, OptimSection, Recipe, flatten
from wmtp.data import Batch, build_data
from wmtp.models import load_mtp_model, load_reference_model, load_reward_model
from wmtp.storage import Storage
from wmtp.tracking import Tracker

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(backend: str) -> torch.device:
    if backend == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if backend == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("devices.compute_backend=cuda but no CUDA device is visible; use cpu or auto")
    return torch.device(backend)


def build_optimizer(params: list[torch.nn.Parameter], optim: OptimSection) -> torch.optim.Optimizer:
    # Decay matrices only: decaying norms and biases pulls them towards zero for no regularisation benefit.
    decay = [p for p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in params if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas)


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimSection, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(optim.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    history: dict[str, list[float]] = field(default_factory=lambda: {"loss": [], "eval_loss": []})


class Trainer:
    """Owns the model, data, algorithm, optimizer and tracker of one run."""

    def __init__(self, config: Config, recipe: Recipe, storage: Storage | None = None) -> None:
        self.config, self.recipe = config, recipe
        self.storage = storage or Storage(config.s3)
        seed_everything(config.seed)
        self.device = pick_device(config.devices.compute_backend)
        models = config.paths.models
        self.model, self.tokenizer = load_mtp_model(
            models.base, self.storage, recipe.loss.n_heads, recipe.model.head_type
        )
        self.model.to(self.device)
        self.data = build_data(config, recipe, self.storage, self.tokenizer)
        algo = recipe.train.algo
        ref = load_reference_model(models.ref, self.storage) if algo is AlgorithmName.rho1_wmtp else None
        rm = load_reward_model(models.rm, self.storage) if algo is AlgorithmName.critic_wmtp else None
        self.algorithm: Algorithm = build_algorithm(
            recipe,
            ref_model=ref.to(self.device) if ref is not None else None,
            reward_model=rm.to(self.device) if rm is not None else None,
            hidden_size=self.model.hidden_size,
        )
        for module in self.algorithm.trainable_modules().values():
            module.to(self.device)
        self.total_steps = recipe.train.max_steps or recipe.train.num_epochs * max(
            1, len(self.data.train) // recipe.train.grad_accum
        )
        self.optimizer = build_optimizer(self.parameters(), recipe.optim)
        self.scheduler = build_scheduler(self.optimizer, recipe.optim, self.total_steps)
        self.run_dir = Path(config.paths.output_dir) / recipe.run.name
        self.tracker = Tracker(config.mlflow, self.run_dir)
        self.state = TrainState()
        self.console = Console(stderr=True)

    def parameters(self) -> list[torch.nn.Parameter]:
        extra = [p for m in self.algorithm.trainable_modules().values() for p in m.parameters()]
        return list(self.model.parameters()) + extra

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        bf16 = self.config.devices.mixed_precision == "bf16" and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def train(self) -> dict[str, Any]:
        recipe, state = self.recipe, self.state
        params = flatten(
            self.config.model_dump(mode="json", exclude={"s3": True}) | recipe.model_dump(mode="json")
        )
        self.tracker.start(recipe.run.name, params, {"algorithm": recipe.train.algo.value, **recipe.run.tags})
        self.maybe_pretrain()
        self.evaluate()
        started = time.perf_counter()
        with self.progress() as progress:
            task = progress.add_task("train", total=self.total_steps, loss=float("nan"), tps=0.0)
            while state.step < self.total_steps:
                metrics = self.train_step()
                state.step += 1
                metrics["tokens_per_s"] = state.tokens / (time.perf_counter() - started)
                progress.update(task, advance=1, loss=metrics["loss"], tps=metrics["tokens_per_s"])
                if state.step % self.config.log_interval == 0 or state.step == self.total_steps:
                    self.log_metrics(metrics)
                if state.step % recipe.train.eval_interval == 0 or state.step == self.total_steps:
                    self.evaluate()
        version = self.tracker.register_model(self.model, recipe.train.algo.value)
        self.tracker.end()
        summary = self.summary(time.perf_counter() - started, version)
        self.print_summary(summary)
        return summary

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches."""
        self.model.train()
        accum = self.recipe.train.grad_accum
        totals: dict[str, float] = {}
        for _ in range(accum):
            batch: Batch = next(self.data.train).to(self.device)
            with self.autocast():
                loss, metrics = compute_loss(self.model, self.algorithm, batch)
            (loss / accum).backward()
            self.state.tokens += batch.input_ids.numel()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value / accum
        if self.recipe.optim.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.parameters(), self.recipe.optim.grad_clip)
            totals["grad_norm"] = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals["lr"] = self.scheduler.get_last_lr()[0]
        self.state.history["loss"].append(totals["loss"])
        return totals

    def maybe_pretrain(self) -> None:
        """Stage 1 for algorithms that need it (critic-wmtp's value head); a no-op for the others."""
        steps = self.recipe.critic.pretrain_steps
        if self.recipe.train.algo is not AlgorithmName.critic_wmtp or steps == 0:
            return
        batches = (b.to(self.device) for b in self.data.train)
        self.algorithm.pretrain(
            self.model,
            batches,
            steps,
            lambda step, m: self.tracker.log_metrics({f"pretrain/{k}": v for k, v in m.items()}, step),
        )

    @torch.no_grad()
    def evaluate(self) -> float:
        """Unweighted mean CE over all heads on the held-out split: comparable across algorithms."""
        self.model.eval()
        total, count = torch.zeros(self.recipe.loss.n_heads), torch.zeros(self.recipe.loss.n_heads)
        for batch in self.data.eval_batches:
            batch = batch.to(self.device)
            with self.autocast():
                ce, mask = head_cross_entropy(self.model, self.model(batch.input_ids), batch.labels)
            total += ce.sum(dim=(0, 1)).float().cpu()
            count += mask.sum(dim=(0, 1)).float().cpu()
        per_head = total / count.clamp(min=1)
        loss = float(per_head.mean())
        self.state.history["eval_loss"].append(loss)
        metrics = {"eval/loss": loss, **{f"eval/ce_head{k}": float(v) for k, v in enumerate(per_head)}}
        self.tracker.log_metrics(metrics, self.state.step)
        log.info("eval step=%d loss=%.4f", self.state.step, loss)
        return loss

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(metrics, self.state.step)
        fields = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        log.info("step=%d/%d %s", self.state.step, self.total_steps, fields)

    def progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.console.is_terminal,
        )

    def summary(self, seconds: float, version: str | None) -> dict[str, Any]:
        history = self.state.history
        return {
            "run": self.recipe.run.name,
            "algorithm": self.recipe.train.algo.value,
            "steps": self.state.step,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(self.state.tokens / max(seconds, 1e-9)),
            "train_loss_first": history["loss"][0] if history["loss"] else None,
            "train_loss_last": history["loss"][-1] if history["loss"] else None,
            "eval_loss_first": history["eval_loss"][0],
            "eval_loss_last": history["eval_loss"][-1],
            "mlflow_run_id": self.tracker.run_id,
            "mlflow_tracking_uri": self.tracker.tracking_uri,
            "registered_model": f"wmtp-{self.recipe.train.algo.value} v{version}" if version else None,
        }

    def print_summary(self, summary: dict[str, Any]) -> None:
        table = Table(title=f"WMTP run {summary['run']}", show_header=False)
        for key, value in summary.items():
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        self.console.print(table)
