"""The training loop: build the parts once, then step, log, evaluate, checkpoint, finish."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from safetensors.torch import save_file

from wmtp.algorithms import compute_loss
from wmtp.algorithms.loss import head_cross_entropy
from wmtp.checkpoint import FINAL_ALGORITHM, CheckpointManager, plan_resume
from wmtp.components import build_models, build_store, count_steps, pick_device
from wmtp.config import Config, Recipe, check_compatible, clip, config_hash, flatten, resolve_checkpointing
from wmtp.conversion import Conversion
from wmtp.data import Batch, build_data
from wmtp.distributed import full_tensor, gather_full_state_dict, init_distributed
from wmtp.optim import build_optimizer, build_scheduler
from wmtp.reporting import Reporter
from wmtp.stopping import Preempted, StopRequest
from wmtp.storage import Location, Storage
from wmtp.tracking import Tracker

log = logging.getLogger(__name__)


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
    """Owns the model, data, algorithm, optimizer, checkpoints and tracker of one run."""

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
        self.config, self.recipe, self.stop = config, recipe, stop or StopRequest()
        self.warnings: list[str] = []  # what went wrong without stopping training: for the termination message
        self.storage = storage or Storage(s3=config.s3)
        self.dist = init_distributed(config.devices.distributed, pick_device(config.devices.compute_backend))
        self.device = self.dist.device
        store = build_store(config, recipe, self.storage, self.dist)
        # Before any weights load: a --resume that names nothing usable fails in seconds.
        auto = recipe.checkpointing.auto_resume_latest
        self.resume_plan = plan_resume(
            store,
            resume,
            auto=auto,
            fallback=resume_fallback,
            allow_config_change=allow_config_change,
            overwrite=recipe.checkpointing.overwrite,
        )
        if self.resume_plan.warning:
            self.warn(self.resume_plan.warning)
        models = build_models(config, recipe, self.storage, self.dist)
        self.model, self.tokenizer, self.algorithm = models.model, models.tokenizer, models.algorithm
        self.modules = models.modules()  # one module tree for the optimizer and the checkpoint
        self.data = build_data(config, recipe, self.storage, self.tokenizer, self.dist.rank, self.dist.world_size)
        self.total_steps = count_steps(recipe, self.data)
        self.conversion = Conversion.build(self.model, recipe)  # new heads first, pretrained parameters slower
        self.optimizer = build_optimizer(list(self.modules.parameters()), recipe.optim, self.conversion)
        self.conversion.maybe_freeze()  # after the optimizer is built: frozen parameters stay in it
        self.scheduler = build_scheduler(self.optimizer, recipe.optim, self.total_steps)
        self.state = TrainState()
        self.run_dir = Path(config.paths.output_dir) / recipe.run.name
        # Rank 0 alone talks to MLflow and the WMTPRun status; every rank writes its own checkpoint shards.
        self.tracker = Tracker(config.mlflow, self.run_dir, enabled=self.dist.is_main, warnings=self.warnings)
        # Set only inside a pod the operator created: progress and checkpoints go to the WMTPRun's status.
        self.reporter = Reporter.from_env() if self.dist.is_main else None
        self.checkpoints = CheckpointManager(
            store,
            modules=self.modules,
            optimizer=self.optimizer,
            states={"lr_scheduler": self.scheduler, "dataloader": self.data.train, "train_state": self.state},
            save_interval=config.paths.checkpoints.save_interval,
            keep_last=config.paths.checkpoints.keep_last,
            fingerprint=config_hash(config, recipe),
            report=self.report_checkpoint,
            rank=self.dist.rank,
            group=self.dist.new_group(),
        )
        self.console = Console(stderr=True)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        bf16 = self.config.devices.mixed_precision == "bf16" and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def train(self) -> dict[str, Any]:
        """Resume or start fresh; step to the end, logging, evaluating and handing each step to the checkpoint
        manager (it saves when due, and at the last step or a stop); finish. Returns the run's summary."""
        state, total = self.state, self.total_steps
        self.start()
        started, first_tokens = time.perf_counter(), state.tokens
        with self.progress() as progress, self.tracker.closing(stopped=(Preempted,)):
            task = progress.add_task("train", total=total, completed=state.step, loss=float("nan"), tps=0.0)
            while state.step < total:
                metrics = self.train_step()
                state.step += 1
                if self.reporter:
                    self.reporter.step_done(state.step, metrics["loss"])
                last = state.step == total
                metrics["tokens_per_s"] = (state.tokens - first_tokens) / (time.perf_counter() - started)
                progress.update(task, advance=1, loss=metrics["loss"], tps=metrics["tokens_per_s"])
                if state.step % self.config.log_interval == 0 or last:
                    self.log_metrics(metrics)
                if state.step % self.recipe.train.eval_interval == 0 or last:
                    self.evaluate()
                # A signal may reach one rank a step before another: agreeing every step makes them all save this one.
                stop = self.dist.any(self.stop.requested)
                self.checkpoints.save(state.step, last=last or stop)
                if stop and not last:
                    checkpoint = self.checkpoints.latest.uri
                    raise Preempted(f"stopped at step {state.step} on SIGTERM; checkpoint {checkpoint}")
        summary = self.finish(time.perf_counter() - started)
        if self.dist.is_main:
            self.print_summary(summary)
        return summary

    def start(self) -> None:
        """Continue from the resume plan's checkpoint, or start fresh (the data's counts, the algorithm's own
        pretraining, a first evaluation); either way open the MLflow run, the checkpoint's when it names one."""
        recipe, state, location = self.recipe, self.state, self.resume_plan.location
        if location is not None:
            self.checkpoints.load(location, allow_fingerprint_change=self.resume_plan.allow_config_change)
            log.info("resumed step=%d from=%s", state.step, location.uri)
        if self.reporter:  # start-up ends here: the operator times restarts from these reports
            self.reporter.loaded()
        params = flatten(self.config.model_dump(mode="json", exclude={"s3": True}) | recipe.model_dump(mode="json"))
        tags = {"algorithm": recipe.train.algo, **recipe.run.tags}
        self.tracker.start(recipe.run.name, params, tags, run_id=state.mlflow_run_id)
        # Without MLflow this attempt, the next one may still continue the run the checkpoint names.
        state.mlflow_run_id = self.tracker.run_id or state.mlflow_run_id
        if location is None:
            self.tracker.log_metrics(self.data.metrics(), 0)  # per source: read, kept, skipped, tokens
            self.algorithm.pretrain(
                self.model,
                (b.to(self.device) for b in self.data.train),
                lambda step, m: self.tracker.log_metrics({f"pretrain/{k}": v for k, v in m.items()}, step),
            )
            self.evaluate()

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

    def report_checkpoint(self, location: Location) -> bool:
        """Tell the run's status about a committed checkpoint (the operator resumes from what it was told); False
        when that failed. With no status to tell, nobody needs telling."""
        if self.reporter is None:
            return True
        losses = self.state.history["loss"]
        return self.reporter.report(self.state.step, losses[-1] if losses else None, latest_checkpoint=location.uri)

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(clip(message, 1000))

    def finish(self, seconds: float) -> dict[str, Any]:
        """The final model and the algorithm's trained modules, gathered to rank 0, to the store; the model to
        the MLflow registry, once; the final metrics to MLflow."""
        self.checkpoints.wait()
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
        final = self.checkpoints.store.final_location if save_final else None
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
