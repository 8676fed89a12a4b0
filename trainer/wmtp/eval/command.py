"""What `wmtp eval` needs besides its options: parsing them, and showing the report."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.table import Table


def ints(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{option}: comma-separated integers, e.g. 1,10") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{option}: at least one positive integer")
    return values


def datasets(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, uri = pair.partition("=")
        if not sep or not name or not uri:
            raise typer.BadParameter(f"--dataset {pair!r}: write NAME=URI, e.g. mbpp=s3://data/mbpp.jsonl")
        out[name] = uri
    return out


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
