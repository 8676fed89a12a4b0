"""What `wmtp eval` needs besides its options: parsing them, showing the report, and its termination message."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import click
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from wmtp.config import ConfigError, clip
from wmtp.contract import STOP_FAILED, STOP_SUCCEEDED, ExitCode
from wmtp.errors import describe
from wmtp.eval.runner import EvalOptions
from wmtp.reporting import Termination, write_termination

log = logging.getLogger(__name__)
# Off a terminal (a pod's log) progress is a plain line every this many problems, or this many seconds.
PROGRESS_EVERY = 10
PROGRESS_SECONDS = 60.0


def ints(text: str, option: str) -> list[int]:
    """Comma-separated integers (their bounds are `EvalSettings`')."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{option}: comma-separated integers, e.g. 1,10") from None


def boolean(text: str, option: str) -> bool:
    """true/false (also yes/no, 1/0, any case): a value, not a bare flag, so that spec.eval's rendering
    `--name value` works for every setting."""
    try:
        return bool(click.BOOL.convert(text, None, None))
    except click.BadParameter:
        raise typer.BadParameter(f"{option}: true or false, not {text!r}") from None


def datasets(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, uri = pair.partition("=")
        if not sep or not name or not uri:
            raise typer.BadParameter(f"--dataset {pair!r}: write NAME=URI, e.g. mbpp=s3://data/mbpp.jsonl")
        out[name] = uri
    return out


def options(**values: Any) -> EvalOptions:
    """The options, checked by `EvalSettings`: a bad value is one line naming its flag."""
    try:
        return EvalOptions(**values)
    except ValidationError as err:
        problems = [
            (f"--{str(e['loc'][0]).replace('_', '-')}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
            for e in err.errors()
        ]
        raise ConfigError(clip("; ".join(problems), 500)) from None


@contextlib.contextmanager
def progress(console: Console) -> Iterator[Callable[[int, int], None]]:
    """`progress(done, total)` for the problems: a bar on a terminal, else a log line every `PROGRESS_EVERY`
    problems or `PROGRESS_SECONDS` seconds, whichever comes first, and at the end."""
    columns = (TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    started = last = time.monotonic()

    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("eval", total=None)

        def advance(done: int, total: int) -> None:
            nonlocal last
            bar.update(task, completed=done, total=total)
            now = time.monotonic()
            due = done % PROGRESS_EVERY == 0 or done == total or now - last >= PROGRESS_SECONDS
            if console.is_terminal or not due:
                return
            last, elapsed = now, now - started
            left = elapsed / done * (total - done)
            log.info("progress: %d/%d problems, %.0f s elapsed, about %.0f s left", done, total, elapsed, left)

        yield advance


def show(report: dict[str, Any], ks: list[int], console: Console) -> None:
    """The table, the decoding and speed lines on stderr, the summary as one JSON line on stdout."""
    table = Table(title="pass@k")
    for column in ("task", "problems", *(f"pass@{n}" for n in ks)):
        table.add_column(column)
    for name, scores in report["tasks"].items():
        table.add_row(name, str(scores["problems"]), *(f"{scores[f'pass@{n}']:.3f}" for n in ks))
    console.print(table)
    console.print(f"{report['samples']} samples per problem; programs ran in the sandbox: {report['sandbox']}")
    decoding = report["decoding"]
    console.print(
        f"decoding: {decoding['tokens']} tokens in {decoding['seconds']:.1f} s, {decoding['tokens_per_s']:.1f} "
        f"tokens/s (batches of {decoding['batch_size']})"
    )
    if "speed" in report:
        console.print(speed_line(report["speed"]))
    keys = ("model", "samples", "sandbox", "decoding", "tasks", "speed", "mlflow_run_id")
    print(json.dumps({key: report[key] for key in keys if key in report}), flush=True)


def speed_line(speed: dict[str, Any]) -> str:
    low, high = speed["speedup_spread"]
    line = (
        f"self-speculative decoding: {speed['speedup']:.2f}× cached greedy tokens/s (median of {speed['rounds']} "
        f"rounds, {low:.2f}–{high:.2f}×; {speed['greedy_tokens_per_s']:.1f} → {speed['speculative_tokens_per_s']:.1f}"
        f" tokens/s); {speed['tokens_per_pass']:.2f} tokens per forward pass, {speed['mean_accepted']:.2f} per "
        f"verifying pass, which costs {speed['pass_cost']:.2f} greedy passes; identical output: {speed['identical']}"
    )
    if speed["speedup_suspect"]:
        line += "; SUSPECT: more than the passes saved can explain, the measurement is wrong"
    return line


def headline(report: dict[str, Any]) -> str:
    """The scores and the speed-up in one line."""
    scores = [
        f"{task} {key} {value:.3f}" for task, values in report["tasks"].items() for key, value in values.items()
        if key != "problems"
    ]  # fmt: skip
    speed = report.get("speed")
    if speed:
        suspect = " (SUSPECT: more than the passes saved explain)" if speed.get("speedup_suspect") else ""
        scores.append(f"self-speculative decoding {speed['speedup']:.2f}× greedy{suspect}")
    return ", ".join(scores)


@contextlib.contextmanager
def last_words(*bad_input: type[BaseException]) -> Iterator[Termination]:
    """Leave the termination message on the way out, as the trainer does: success once the block ends (the caller
    sets the results), else the failure's one line and exit code (`wmtp.errors.describe`)."""
    ended = Termination(STOP_FAILED, ExitCode.ERROR, "wmtp eval stopped before it could say why")
    try:
        yield ended
        ended.reason, ended.exit_code = STOP_SUCCEEDED, ExitCode.OK
    except (click.ClickException, typer.BadParameter) as err:  # a bad option value (typer's click is its own)
        ended.message, ended.exit_code = clip(err.format_message(), 2000), err.exit_code
        raise
    except Exception as err:
        message, ended.exit_code = describe(err, bad_input)
        ended.message = clip(" ".join(message.split()), 2000)
        raise
    finally:
        write_termination(ended)
