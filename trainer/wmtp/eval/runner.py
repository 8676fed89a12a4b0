"""`wmtp eval`: load a trained model, score it on code tasks, measure self-speculative decoding, report."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from wmtp.checkpoint import CheckpointError, CheckpointStore
from wmtp.config import EvalSettings, redact_uri
from wmtp.contract import EVAL_SPEED_FIELDS, MAX_EVAL_SCORES
from wmtp.eval.decoding import Decoder, Generation
from wmtp.eval.sandbox import Limits
from wmtp.eval.scoring import TaskResult, score
from wmtp.eval.tasks import Problem, load_task
from wmtp.models import MTPModel, load_tokenizer
from wmtp.storage import Storage, StorageError, parse_uri
from wmtp.tracking import bounded_retries

log = logging.getLogger(__name__)


class EvalOptions(EvalSettings):
    """What to evaluate (the final model's URI) and how (`EvalSettings`, as `wmtp eval` and spec.eval give it)."""

    model: str


def load_model(uri: str, storage: Storage) -> tuple[MTPModel, Any]:
    """A final model directory (`save_pretrained` layout with mtp.json) from a path, file:// or s3://."""
    with storage.local_copy(parse_uri(uri)) as directory:
        return MTPModel.from_pretrained(directory), load_tokenizer(directory)


def _completer(decoder: Decoder, tokenizer: Any, options: EvalOptions) -> Callable[[Problem], list[str]]:
    generator = torch.Generator().manual_seed(options.seed)

    def complete(problem: Problem) -> list[str]:
        decoder.stop = problem.stop
        prompt = tokenizer(problem.prompt)["input_ids"]
        if options.samples == 1:
            return [decoder.text(decoder.greedy(prompt).tokens)]
        runs = [decoder.sample(prompt, options.temperature, generator) for _ in range(options.samples)]
        return [decoder.text(run.tokens) for run in runs]

    return complete


def measure_speed(decoder: Decoder, tokenizer: Any, problems: list[Problem], stops: bool = True) -> dict[str, Any]:
    """Greedy and self-speculative decoding of the same prompts: tokens/s, passes, and whether they agree.
    `stops` False decodes each prompt to the decoder's max_new_tokens (steady-state throughput)."""
    greedy: list[Generation] = []
    speculative: list[Generation] = []
    for problem in problems:
        decoder.stop = problem.stop if stops else ()
        prompt = tokenizer(problem.prompt)["input_ids"]
        greedy.append(decoder.greedy(prompt))
        speculative.append(decoder.speculative(prompt))
    tokens = sum(len(g.tokens) for g in greedy)

    def rate(runs: list[Generation]) -> float:
        return tokens / max(sum(r.seconds for r in runs), 1e-9)

    return {
        "prompts": len(problems),
        "tokens": tokens,
        "identical": all(g.tokens == s.tokens for g, s in zip(greedy, speculative, strict=True)),
        "greedy_tokens_per_s": rate(greedy),
        "speculative_tokens_per_s": rate(speculative),
        "speedup": rate(speculative) / max(rate(greedy), 1e-9),
        "tokens_per_pass": tokens / max(sum(s.passes for s in speculative), 1),
        # Tokens kept per verifying pass (every pass but each prompt's first, which only drafts).
        "mean_accepted": tokens / max(sum(s.passes - 1 for s in speculative), 1),
        "heads": decoder.model.n_heads,
    }


def evaluate(options: EvalOptions, storage: Storage, progress: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Everything `wmtp eval` reports, as one JSON-able dict."""
    problems = {name: load_task(name, options.datasets.get(name), storage)[: options.limit] for name in options.tasks}
    model, tokenizer = load_model(options.model, storage)
    decoder = Decoder(model, tokenizer, options.max_new_tokens)
    limits = Limits(timeout_s=options.program_timeout)
    log.info("model=%s", redact_uri(options.model))
    complete = _completer(decoder, tokenizer, options)
    results: dict[str, TaskResult] = {
        name: score(name, task, complete, options.k, limits, progress=progress) for name, task in problems.items()
    }
    sandbox = ", ".join(sorted(set().union(*(r.sandboxes() for r in results.values()))))
    log.info("sandbox=%s", sandbox)
    report: dict[str, Any] = {
        "model": redact_uri(options.model),
        "samples": options.samples,
        "sandbox": sandbox,  # what held the programs, as each run reported it
        "tasks": {name: {"problems": len(r.problems), **r.summary()} for name, r in results.items()},
        "problems": {name: [p.as_dict() for p in r.problems] for name, r in results.items()},
    }
    if options.speed_prompts:
        prompts = [p for task in problems.values() for p in task][: options.speed_prompts]
        report["speed"] = measure_speed(decoder, tokenizer, prompts)
    return report


def metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's headline numbers as MLflow metric names (which may not hold '@') and values."""
    out = {
        f"eval/{task}/{key.replace('@', '_at_')}": value
        for task, scores in report["tasks"].items()
        for key, value in scores.items()
    }
    speed = report.get("speed") or {}
    for key in ("greedy_tokens_per_s", "speculative_tokens_per_s", "speedup", "mean_accepted", "tokens_per_pass"):
        if key in speed:
            out[f"eval/speculative/{key}"] = float(speed[key])
    return {k: float(v) for k, v in out.items()}


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The report's headline for the termination message (`contract.TERMINATION_EVAL`): scores, speed and the
    MLflow run, rounded; never per-problem data."""

    def short(value: Any) -> Any:
        return float(f"{value:.4g}") if isinstance(value, float) else value

    speed = report.get("speed")
    return {
        "tasks": {
            name: {key: short(value) for key, value in list(scores.items())[: 1 + MAX_EVAL_SCORES]}
            for name, scores in report["tasks"].items()
        },
        "speed": {key: short(speed[key]) for key in EVAL_SPEED_FIELDS if key in speed} if speed else None,
        "mlflow_run_id": report.get("mlflow_run_id"),
    }


def training_run(model: str, storage: Storage) -> str | None:
    """The MLflow run that trained `model`, as the final model's COMMITTED marker names it; None for a model
    without one (a plain HF directory, or a final model saved before markers named it), and, with a warning, for
    a marker that cannot be read."""
    location = parse_uri(model)
    store = CheckpointStore(location, storage)
    try:
        return store.read_marker(location).mlflow_run_id if store.is_committed(location) else None
    except (CheckpointError, StorageError) as err:
        log.warning("%s; the evaluation goes to a new MLflow run", err)
        return None


TRAINING_RUN_TAG = "wmtp.training_run"  # on a new eval run, when the training run is not in the store


def log_to_mlflow(report: dict[str, Any], tracking_uri: str | None, run_id: str | None, experiment: str) -> str | None:
    """Log the metrics to the training run `run_id`, or to a new eval run tagged with the model it evaluates (and
    the training run, when the store has lost it).

    Returns the run id; MLflow trouble is a warning (the results are in the report whatever happens)."""
    try:
        import time

        from mlflow import MlflowClient
        from mlflow.entities import Metric

        bounded_retries()
        client = MlflowClient(tracking_uri)
        tags = {"wmtp.evaluates": report["model"]}
        if run_id is not None and not _exists(client, run_id):
            log.warning("mlflow run %s is not in the store: the evaluation goes to a new run that names it", run_id)
            run_id, tags = None, {**tags, TRAINING_RUN_TAG: run_id}
        created = run_id is None
        if created:
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(experiment)
            run_id = client.create_run(experiment_id, run_name="eval", tags=tags).info.run_id
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics(report).items()])
        if created:
            client.set_terminated(run_id)
        return run_id
    except Exception as err:  # evaluation results must not be lost to a tracking problem
        log.warning("could not log the evaluation to MLflow at %s: %s", redact_uri(tracking_uri or "(default)"), err)
        return None


def _exists(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True
