"""The `wmtp eval` command: options, progress, the table and the JSON summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{option}: comma-separated integers, e.g. 1,10") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{option}: at least one positive integer")
    return values


def _datasets(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, uri = pair.partition("=")
        if not sep or not name or not uri:
            raise typer.BadParameter(f"--dataset {pair!r}: write NAME=URI, e.g. mbpp=s3://data/mbpp.jsonl")
        out[name] = uri
    return out


def eval_command(
    model: str = typer.Option(..., "--model", "-m", help="The final model: <checkpoints>/<run>/final (path or URI)."),
    tasks: str = typer.Option("humaneval", help="Comma-separated tasks: humaneval, mbpp."),
    k: str = typer.Option("1", "--k", help="Comma-separated k of pass@k, each at most --samples."),
    samples: int = typer.Option(1, min=1, help="Completions per problem: 1 is greedy, more are sampled."),
    temperature: float = typer.Option(0.8, min=0.01, help="Sampling temperature when --samples > 1."),
    max_new_tokens: int = typer.Option(256, min=1, help="Longest completion, in tokens."),
    limit: int | None = typer.Option(None, min=1, help="At most this many problems per task."),
    dataset: list[str] = typer.Option([], help="NAME=URI of a task's data (mbpp needs one; humaneval is bundled)."),
    timeout: float = typer.Option(10.0, min=0.1, help="Seconds a program may run against its tests."),
    speed_prompts: int = typer.Option(8, min=0, help="Prompts decoded greedily and self-speculatively; 0 skips."),
    seed: int = typer.Option(0, help="Seed of the sampling."),
    output: Path | None = typer.Option(None, help="Write the whole report (every problem) as JSON here."),
    mlflow_run_id: str | None = typer.Option(None, help="Log the metrics to this (training) run; else a new run."),
    experiment: str = typer.Option("wmtp", help="MLflow experiment of a new eval run."),
    log_level: str | None = typer.Option(None, "--log-level", help="debug|info|warning."),
) -> None:
    """pass@k on HumanEval and MBPP in a sandbox, and the speed-up of self-speculative decoding.

    Prints a table on stderr and one JSON line on stdout: the per-task scores and the decoding speed.
    """
    from wmtp.cli import console, reported, setup_logging
    from wmtp.eval.runner import EvalOptions, evaluate, log_to_mlflow
    from wmtp.storage import Storage

    setup_logging(log_level)
    options = EvalOptions(
        model=model, tasks=[t.strip() for t in tasks.split(",") if t.strip()], ks=_ints(k, "--k"), samples=samples,
        temperature=temperature, max_new_tokens=max_new_tokens, limit=limit, datasets=_datasets(dataset),
        timeout_s=timeout, speed_prompts=speed_prompts, seed=seed,
    )  # fmt: skip
    columns = (TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("eval", total=None)
        with reported(log_level, ValueError):
            report = evaluate(options, Storage(), progress=lambda: bar.advance(task))
    if output is not None:
        output.write_text(json.dumps(report, indent=1))
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if mlflow_run_id or tracking_uri:
        report["mlflow_run_id"] = log_to_mlflow(report, tracking_uri, mlflow_run_id, experiment)
    table = Table(title="pass@k")
    for column in ("task", "problems", *(f"pass@{n}" for n in options.ks)):
        table.add_column(column)
    for name, scores in report["tasks"].items():
        table.add_row(name, str(scores["problems"]), *(f"{scores[f'pass@{n}']:.3f}" for n in options.ks))
    console.print(table)
    if "speed" in report:
        speed = report["speed"]
        console.print(
            f"self-speculative decoding: {speed['speedup']:.2f}× greedy tokens/s, "
            f"{speed['mean_accepted']:.2f} tokens per pass, identical output: {speed['identical']}"
        )
    summary = {key: report[key] for key in ("model", "tasks", "speed", "mlflow_run_id") if key in report}
    print(json.dumps(summary), flush=True)
