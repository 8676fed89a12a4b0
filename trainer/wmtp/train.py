"""The training loop: build the parts once, then step, log, evaluate, finish."""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from safetensors.torch import save_file

from wmtp import contract
from wmtp.algorithms import Algorithm, build_algorithm, compute_loss
from wmtp.algorithms.loss import head_cross_entropy
from wmtp.checkpoint import FINAL_ALGORITHM, CheckpointError, CheckpointManager, CheckpointStore
from wmtp.config import (
    Config,
    Recipe,
    check_compatible,
    checkpoint_root,
    clip,
    config_hash,
    flatten,
    resolve_checkpointing,
)
from wmtp.conversion import Conversion
from wmtp.data import Batch, build_data
from wmtp.distributed import full_tensor, gather_full_state_dict, init_distributed, load_weights, parallelize
from wmtp.models import FROZEN_LOADERS, check_vocabularies, load_mtp_model
from wmtp.optim import build_optimizer, build_scheduler
from wmtp.reporting import Reporter
from wmtp.stopping import Preempted, StopRequest
from wmtp.storage import Location, Storage
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


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0  # training wall time, summed over every attempt
    mlflow_run_id: str | None = None
    history: dict[str, list[float]] = field(default_factory=lambda: {"loss": [], "eval_loss": []})
    last: dict[str, float] = field(default_factory=dict)  # the newest loss and eval_loss, kept across attempts

    def state_dict(self) -> dict[str, Any]:
        metrics = self.last | {k: v[-1] for k, v in self.history.items() if v}
        return {"step": self.step, "tokens": self.tokens, "seconds": self.seconds,
                "mlflow_run_id": self.mlflow_run_id, "metrics": metrics}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens, self.mlflow_run_id = state["step"], state["tokens"], state["mlflow_run_id"]
        self.seconds, self.last = state.get("seconds", 0.0), state.get("metrics", {})


class Trainer:
    """Owns the model, data, algorithm, optimizer and tracker of one run."""

    def __init__(
        self,
        config: Config,
        recipe: Recipe,
        storage: Storage | None = None,
        resume: str | None = None,
        allow_config_change: bool = False,
        resume_fallback: bool = False,
        stop: StopRequest | None = None,
    ) -> None:
        check_compatible(config, recipe)
        config = resolve_checkpointing(config, recipe)  # recipe checkpoint settings over the config's
        self.stop = stop or StopRequest()
        self.config, self.recipe = config, recipe
        # CLI --resume beats the recipe's auto_resume_latest, which beats starting fresh.
        self.resume = resume or (contract.RESUME_AUTO if recipe.checkpointing.auto_resume_latest else None)
        self.allow_config_change, self.resume_fallback = allow_config_change, resume_fallback
        self.warnings: list[str] = []  # what went wrong without stopping training: for the termination message
        self.storage = storage or Storage(s3=config.s3)
        self.dist = init_distributed(config.devices.distributed, pick_device(config.devices.compute_backend))
        self.device = self.dist.device
        self.store = CheckpointStore(checkpoint_root(config, recipe), self.storage)
        if self.dist.is_main:  # a store that cannot be written fails now, not at the first save
            self.storage.probe(self.store.root)
        self.resume_from = self.resume_point()  # before loading anything: a bad --resume fails at once
        trainable = self.build_models()
        # One module tree for the optimizer and the checkpoint: the model and the algorithm's trainable parts.
        self.modules = torch.nn.ModuleDict({"model": self.model, **trainable})
        self.data = build_data(config, recipe, self.storage, self.tokenizer, self.dist.rank, self.dist.world_size)
        self.total_steps = recipe.train.max_steps or recipe.train.num_epochs * max(
            1, len(self.data.train) // recipe.train.grad_accum
        )
        self.conversion = Conversion.build(self.model, recipe)  # new heads first, pretrained parameters slower
        self.optimizer = build_optimizer(list(self.modules.parameters()), recipe.optim, self.conversion)
        self.conversion.maybe_freeze()  # after the optimizer is built: frozen parameters stay in it
        self.scheduler = build_scheduler(self.optimizer, recipe.optim, self.total_steps)
        self.run_dir = Path(config.paths.output_dir) / recipe.run.name
        # Rank 0 alone talks to MLflow and the WMTPRun status; every rank writes its own checkpoint shards.
        self.tracker = Tracker(config.mlflow, self.run_dir, enabled=self.dist.is_main, warnings=self.warnings)
        self.state = TrainState()
        self.checkpoints = CheckpointManager(
            self.store,
            modules=self.modules,
            optimizer=self.optimizer,
            states={"lr_scheduler": self.scheduler, "dataloader": self.data.train, "train_state": self.state},
            save_interval=config.paths.checkpoints.save_interval,
            keep_last=config.paths.checkpoints.keep_last,
            fingerprint=config_hash(config, recipe),
            rank=self.dist.rank,
            group=self.dist.new_group(),
        )
        self.console = Console(stderr=True)
        # Set only inside a pod the operator created: progress goes to the WMTPRun's status.
        self.reporter = Reporter.from_env() if self.dist.is_main else None

    def build_models(self) -> dict[str, torch.nn.Module]:
        """The model, the frozen models the algorithm asks for and the algorithm, on the device and parallelized;
        returns the algorithm's trainable modules. Distributed, every rank builds each model empty (on the meta
        device) and rank 0 alone reads its weights, which `load_weights` scatters into the shards: no rank but 0
        ever holds a whole model, and rank 0 one at a time."""
        config, recipe, storage, empty = self.config, self.recipe, self.storage, self.dist.enabled
        models, heads = config.paths.models, (recipe.loss.n_heads, recipe.model.head_type)
        check_vocabularies(models, contract.algorithm(recipe.train.algo).frozen, storage)
        seed_everything(config.seed)
        self.model, self.tokenizer = load_mtp_model(models.base, storage, *heads, empty=empty)
        readers = {self.model: lambda: load_mtp_model(models.base, storage, *heads)[0].state_dict()}
        frozen = {}
        for role in contract.algorithm(recipe.train.algo).frozen:
            load = functools.partial(FROZEN_LOADERS[role], getattr(models, role), storage)
            frozen[role] = load(empty=empty)
            readers[frozen[role]] = lambda load=load: load().state_dict()
        # The algorithm's own modules start from the same numbers on every rank, however the models were built.
        seed_everything(config.seed)
        self.algorithm: Algorithm = build_algorithm(recipe, frozen, self.model.hidden_size)
        trainable = self.algorithm.trainable_modules()
        for module in [*trainable.values(), *([] if empty else readers)]:
            module.to(self.device)
        # Before the optimizer is built: sharding turns the parameters into DTensors.
        parallelize(self.model, list(trainable.values()), list(frozen.values()), config.devices, self.dist)
        for module, read in readers.items() if empty else ():
            load_weights(module, read, self.dist)
        return trainable

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        bf16 = self.config.devices.mixed_precision == "bf16" and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def train(self) -> dict[str, Any]:
        recipe, state = self.recipe, self.state
        resumed = self.maybe_resume()
        params = flatten(self.config.model_dump(mode="json", exclude={"s3": True}) | recipe.model_dump(mode="json"))
        tags = {"algorithm": recipe.train.algo, **recipe.run.tags}
        self.tracker.start(recipe.run.name, params, tags, run_id=state.mlflow_run_id)
        # Without MLflow this attempt, the next one may still continue the run the checkpoint names.
        state.mlflow_run_id = self.tracker.run_id or state.mlflow_run_id
        if not resumed:
            self.tracker.log_metrics(self.data.metrics(), 0)  # per source: read, kept, skipped, tokens
            self.algorithm.pretrain(
                self.model,
                (b.to(self.device) for b in self.data.train),
                lambda step, m: self.tracker.log_metrics({f"pretrain/{k}": v for k, v in m.items()}, step),
            )
            self.evaluate()
        started, first_tokens = time.perf_counter(), state.tokens
        with self.progress() as progress, self.tracker.closing(stopped=(Preempted,)):
            task = progress.add_task("train", total=self.total_steps, completed=state.step, loss=float("nan"), tps=0.0)
            while state.step < self.total_steps:
                metrics = self.train_step()
                state.step += 1
                metrics["tokens_per_s"] = (state.tokens - first_tokens) / (time.perf_counter() - started)
                progress.update(task, advance=1, loss=metrics["loss"], tps=metrics["tokens_per_s"])
                if state.step % self.config.log_interval == 0 or state.step == self.total_steps:
                    self.log_metrics(metrics)
                if state.step % recipe.train.eval_interval == 0 or state.step == self.total_steps:
                    self.evaluate()
                self.maybe_save(last=state.step == self.total_steps)
        summary = self.finish(time.perf_counter() - started)
        if self.dist.is_main:
            self.print_summary(summary)
        return summary

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches."""
        started = time.perf_counter()
        self.model.train()
        accum = self.recipe.train.grad_accum
        totals: dict[str, float] = {}
        for _ in range(accum):
            batch: Batch = next(self.data.train).to(self.device)
            with self.autocast():
                loss, metrics = compute_loss(self.model, self.algorithm, batch)
            (loss / accum).backward()
            # Global tokens: every rank's micro-batch has the same shape.
            self.state.tokens += batch.input_ids.numel() * self.dist.world_size
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value / accum
        totals = self.dist.mean(totals)
        self.conversion.hold(self.state.step)
        if self.recipe.optim.grad_clip is not None:
            totals["grad_norm"] = self.clip_gradients(self.recipe.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals["lr"] = self.scheduler.get_last_lr()[0]
        self.state.history["loss"].append(totals["loss"])
        self.state.seconds += time.perf_counter() - started
        return totals

    def clip_gradients(self, max_norm: float) -> float:
        """Scale all gradients to a global norm of at most `max_norm`; returns the norm before clipping."""
        params = [p for p in self.modules.parameters() if p.grad is not None]
        # Sharded gradients give a partial norm per rank; full_tensor() reduces it to the global one.
        norm = full_tensor(torch.nn.utils.get_total_norm([p.grad for p in params]))
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)

    def maybe_resume(self) -> bool:
        """Restore every stateful part from the checkpoint `self.resume` resolves to, if any."""
        location = self.resume_from
        if location is None:
            return False
        self.checkpoints.load(location, allow_fingerprint_change=self.allow_config_change)
        log.info("resumed step=%d from=%s", self.state.step, location.uri)
        self.after_commit(location)
        return True

    def resume_point(self) -> Location | None:
        """Where `self.resume` points. A resume the operator chose (`resume_fallback`) falls back to the newest
        intact checkpoint when that one is gone or damaged, and says so; any other must be usable as named. With
        nothing to resume, the start is fresh: `check_fresh_start`."""
        try:
            location = self.store.resolve(self.resume)
        except CheckpointError as err:
            if not self.resume_fallback:
                raise
            location = self.store.newest_intact()
            self.warn(f"{err}; " + (f"resuming from {location.uri} instead" if location else "starting fresh"))
        if location is None:
            self.check_fresh_start()
        return location

    def check_fresh_start(self) -> None:
        """A fresh start saves from step 0 into the run's prefix: never over committed checkpoints (an earlier run's
        of the same name, or this run's after a lost resume) unless the recipe says checkpointing.overwrite."""
        committed = [] if self.recipe.checkpointing.overwrite else self.store.list()
        if committed:
            steps = ", ".join(str(info.step) for info in committed[-3:])
            raise CheckpointError(
                f"{self.store.root.uri} already holds committed checkpoints (newest steps: {steps}); a fresh start "
                "would overwrite them: resume (--resume auto), use another run name or checkpoint path, or set "
                "checkpointing.overwrite: true in the recipe"
            )

    def maybe_save(self, last: bool) -> None:
        """Checkpoint every save_interval steps, at the last step, and when asked to stop; report and prune each
        checkpoint once it has committed."""
        step = self.state.step
        # A signal may reach one rank a step before another: agreeing every step makes them all save this one.
        stop = self.dist.any(self.stop.requested)
        due = last or stop or self.checkpoints.due(step)
        self.after_commit(self.checkpoints.wait() if due else self.checkpoints.poll())
        if due:
            self.checkpoints.save(step)
        if last or stop:
            self.after_commit(self.checkpoints.wait())
        if stop and not last:
            raise Preempted(f"stopped at step {step} on SIGTERM; checkpoint {self.checkpoints.latest.uri}")

    def after_commit(self, location: Location | None) -> None:
        """Report a committed checkpoint (the operator resumes from what was reported), then prune: retention
        never deletes the newest reported checkpoint."""
        if location is None:
            return
        losses = self.state.history["loss"]
        loss = losses[-1] if losses else None
        if self.reporter is None or self.reporter.report(self.state.step, loss, latest_checkpoint=location.uri):
            self.checkpoints.reported = location
        self.checkpoints.prune()

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(clip(message, 1000))

    def finish(self, seconds: float) -> dict[str, Any]:
        """The final model and the algorithm's trained modules, gathered to rank 0, to the store; the model to
        the MLflow registry, once; the final metrics to MLflow."""
        self.after_commit(self.checkpoints.wait())
        state_dict = gather_full_state_dict(self.modules)  # a collective: every rank takes part
        final, version = self.publish_final(state_dict) if self.dist.is_main else (None, None)
        self.log_final_metrics()
        self.tracker.end()
        return self.summary(seconds, version) | {"final_model": final.uri if final else None}

    def publish_final(self, state_dict: dict[str, torch.Tensor]) -> tuple[Location | None, str | None]:
        """Write the HF directory from the full state dict (to the store if save_final), the algorithm's modules
        beside it, and register that folder: what MLflow holds is exactly what the store holds (safetensors and
        JSON, never a pickle or a sharded module)."""
        save_final = self.config.paths.checkpoints.save_final
        final = self.store.final_location if save_final else None
        staging = (
            self.checkpoints.save_final(self.state.mlflow_run_id)
            if save_final
            else tempfile.TemporaryDirectory(dir=self.run_dir)
        )
        with staging as directory:
            model_sd = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
            self.model.save_pretrained(directory, state_dict=model_sd)
            self.tokenizer.save_pretrained(directory)
            algorithm_sd = {k: v.contiguous() for k, v in state_dict.items() if not k.startswith("model.")}
            if algorithm_sd:
                save_file(algorithm_sd, Path(directory) / FINAL_ALGORITHM)
            state_dict.clear()  # the only reference to the gathered copy
            model_sd.clear()
            if final is not None and self.storage.local_path(final) is None:  # a URI others can reach
                self.tracker.log_param("final_checkpoint_uri", final.uri)
            version = self.tracker.register_model(Path(directory), self.recipe.train.algo, final.uri if final else None)
        return final, version

    def log_final_metrics(self) -> None:
        state = self.state
        last = state.last | {k: v[-1] for k, v in state.history.items() if v}
        metrics = {"final/step": state.step, "final/tokens": state.tokens, "final/wall_seconds": state.seconds}
        metrics |= {f"final/train_{k}" if k == "loss" else f"final/{k}": v for k, v in last.items()}
        self.tracker.log_metrics(metrics, state.step)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Unweighted mean CE over all heads on the held-out split: comparable across algorithms."""
        if not self.data.eval_batches:  # data.eval_fraction 0: no held-out split, so no eval metric at all
            return None
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
        if self.reporter:
            self.reporter.report(self.state.step, metrics["loss"])
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
            disable=not (self.console.is_terminal and self.dist.is_main),
        )

    def summary(self, seconds: float, version: str | None) -> dict[str, Any]:
        history = self.state.history
        return {
            "run": self.recipe.run.name,
            "algorithm": self.recipe.train.algo,
            "steps": self.state.step,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(self.state.tokens / max(seconds, 1e-9)),
            # After a resume these cover this process's steps only; MLflow holds the whole curve.
            "train_loss_first": history["loss"][0] if history["loss"] else None,
            "train_loss_last": history["loss"][-1] if history["loss"] else None,
            "eval_loss_first": history["eval_loss"][0] if history["eval_loss"] else None,
            "eval_loss_last": history["eval_loss"][-1] if history["eval_loss"] else None,
            "mlflow_run_id": self.tracker.run_id,
            "mlflow_tracking_uri": self.tracker.shown_uri,
            "warnings": len(self.warnings),
            "registered_model": f"{self.tracker.model_name(self.recipe.train.algo)} v{version}" if version else None,
        }

    def print_summary(self, summary: dict[str, Any]) -> None:
        table = Table(title=f"WMTP run {summary['run']}", show_header=False)
        for key, value in summary.items():
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            table.add_row(key, text)
        self.console.print(table)
