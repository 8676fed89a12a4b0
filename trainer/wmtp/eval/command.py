"""What `wmtp eval` needs besides its options: parsing them, showing the report, and its termination message."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import click
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from wmtp.config import ConfigError, clip
from wmtp.contract import STOP_FAILED, STOP_SUCCEEDED, ExitCode
from wmtp.errors import describe
from wmtp.eval.runner import EvalOptions
from wmtp.reporting import Termination, write_termination


def ints(text: str, option: str) -> list[int]:
    """Comma-separated integers (their bounds are `EvalSettings`')."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{option}: comma-separated integers, e.g. 1,10") from None


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


def show(report: dict[str, Any], ks: list[int], console: Console) -> None:
    """The table and the speed line on stderr, the summary as one JSON line on stdout."""
    table = Table(title="pass@k")
    for column in ("task", "problems", *(f"pass@{n}" for n in ks)):
        table.add_column(column)
    for name, scores in report["tasks"].items():
        table.add_row(name, str(scores["problems"]), *(f"{scores[f'pass@{n}']:.3f}" for n in ks))
    console.print(table)
    if "speed" in report:
        speed = report["speed"]
        console.print(
            f"self-speculative decoding: {speed['speedup']:.2f}× greedy tokens/s, {speed['mean_accepted']:.2f} "
            f"tokens accepted per verifying pass, identical output: {speed['identical']}"
        )
    summary = {key: report[key] for key in ("model", "tasks", "speed", "mlflow_run_id") if key in report}
    print(json.dumps(summary), flush=True)


def headline(report: dict[str, Any]) -> str:
    """The scores and the speed-up in one line."""
    scores = [
        f"{task} {key} {value:.3f}" for task, values in report["tasks"].items() for key, value in values.items()
        if key != "problems"
    ]  # fmt: skip
    speed = report.get("speed")
    if speed:
        scores.append(f"self-speculative decoding {speed['speedup']:.2f}× greedy")
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
