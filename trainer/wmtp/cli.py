"""`wmtp`: train, validate and build the tiny local models."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from wmtp.config import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)

ConfigOpt = typer.Option(..., "--config", "-c", help="Environment config YAML (paths, mlflow, devices).")
RecipeOpt = typer.Option(..., "--recipe", "-r", help="Experiment recipe YAML (algorithm, data, optim, loss).")
LogLevelOpt = typer.Option(
    None,
    "--log-level",
    help="debug|info|warning. Default: warning on a terminal (the progress bar shows), else info.",
)


def setup_logging(level: str | None) -> None:
    if level is None:
        level = "warning" if sys.stderr.isatty() else "info"
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("wmtp").setLevel(level.upper())


def fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    raise typer.Exit(code)


@app.command()
def train(config: Path = ConfigOpt, recipe: Path = RecipeOpt, log_level: str | None = LogLevelOpt) -> None:
    """Train a multi-token model with the recipe's algorithm."""
    setup_logging(log_level)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from wmtp.config import load
    from wmtp.train import Trainer

    try:
        cfg, rcp = load(config, recipe)
    except ConfigError as err:
        fail(str(err))
    Trainer(cfg, rcp).train()


@app.command()
def validate(config: Path = ConfigOpt, recipe: Path = RecipeOpt) -> None:
    """Dry run: load both files, check every model and dataset exists, show what would run."""
    from wmtp.validation import validate_run

    report = validate_run(str(config), str(recipe))
    if report.rows:
        table = Table(title="What would run", show_lines=False)
        for column in ("item", "value", "detail"):
            table.add_column(column)
        for row in report.rows:
            table.add_row(*row)
        console.print(table)
    if not report.ok:
        console.print(f"[red]{len(report.problems)} problem(s):[/red]")
        for problem in report.problems:
            console.print(f"  - {problem}", highlight=False, markup=False)
        raise typer.Exit(1)
    console.print("[green]valid[/green]")


@app.command("tiny-models")
def tiny_models(dest: Path = typer.Argument(..., help="Folder to write base/, ref/ and rm/ into.")) -> None:
    """Build small random models and a BPE tokenizer offline, for the quickstart and tests."""
    from wmtp.models import build_tiny_models

    for role, path in build_tiny_models(dest).items():
        console.print(f"{role}: {path}")


if __name__ == "__main__":
    app()
