"""`wmtp`: train, validate and build the tiny local models."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from wmtp.contract import LAUNCH_GRACE_FLAG, RESUME_FALLBACK_FLAG
from wmtp.launcher import DEFAULT_GRACE_SECONDS

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
# Logs are read line by line: off a terminal, tables are not squeezed to 80 columns.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

ConfigOpt = typer.Option(..., "--config", "-c", help="Environment config YAML (paths, mlflow, devices).")
RecipeOpt = typer.Option(..., "--recipe", "-r", help="Experiment recipe YAML (algorithm, data, optim, loss).")
LogLevelOpt = typer.Option(
    None,
    "--log-level",
    help="debug|info|warning. Default: warning on a terminal (the progress bar shows), else info.",
)


def setup_logging(level: str | None) -> None:
    # Third-party progress bars (weight loading, shard writing) would interleave with ours.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
    """One error line (never wrapped, never read as markup), then exit with `code`."""
    console.print(Text.assemble(("error: ", "red"), message), soft_wrap=True, highlight=False)
    raise typer.Exit(code)


@app.command()
def train(
    config: Path = ConfigOpt,
    recipe: Path = RecipeOpt,
    resume: str | None = typer.Option(
        None,
        help="latest | step_N | a checkpoint URI | auto (latest if any) | never. Default: the recipe's "
        "checkpointing.auto_resume_latest, else start fresh.",
    ),
    allow_config_change: bool = typer.Option(
        False, help="Resume from a checkpoint written with a different config or recipe."
    ),
    resume_fallback: bool = typer.Option(
        False,
        RESUME_FALLBACK_FLAG,
        help="When the --resume checkpoint is gone or damaged, resume from the newest intact one instead (the "
        "operator's choice; a resume you name yourself should fail loudly, so leave this off).",
    ),
    log_level: str | None = LogLevelOpt,
) -> None:
    """Train a multi-token model with the recipe's algorithm; checkpoints as configured, resumable."""
    setup_logging(log_level)
    from wmtp.attempt import run
    from wmtp.contract import STOP_FAILED, STOP_PREEMPTED

    ended = run(config, recipe, resume, allow_config_change, resume_fallback)
    if ended.reason == STOP_FAILED:
        fail(ended.message, ended.exit_code)
    if ended.reason == STOP_PREEMPTED:
        console.print(f"[yellow]{ended.message}[/yellow]")
        raise typer.Exit(ended.exit_code)


@app.command(context_settings={"allow_interspersed_args": False})
def launch(
    torchrun_args: list[str] = typer.Argument(..., metavar="-- TORCHRUN_ARGS...", help="Everything torchrun takes."),
    grace_seconds: float = typer.Option(
        DEFAULT_GRACE_SECONDS,
        LAUNCH_GRACE_FLAG,
        min=0,
        help="How long a SIGTERM save may take before the workers are killed.",
    ),
    log_level: str | None = LogLevelOpt,
) -> None:
    """Run torchrun as a container's PID 1: SIGTERM reaches the training workers, who save and stop; exits 75
    after a clean stop-and-save (torchrun alone exits 1), and leaves the termination message.

    Example: wmtp launch -- --standalone --nproc-per-node 2 -m wmtp train -c config.yaml -r recipe.yaml
    """
    setup_logging(log_level or "info")
    from wmtp.launcher import launch as run_torchrun

    raise typer.Exit(run_torchrun(torchrun_args, grace_seconds))


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
            console.print(f"  - {problem}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print("[green]valid[/green]")


@app.command("tiny-models")
def tiny_models(dest: Path = typer.Argument(..., help="Folder to write base/, ref/ and rm/ into.")) -> None:
    """Build small random models and a BPE tokenizer offline, for the quickstart and tests."""
    setup_logging(None)
    from wmtp.models import build_tiny_models

    for role, path in build_tiny_models(dest).items():
        console.print(f"{role}: {path}")


@app.command("convert-native")
def convert_native(
    src: str = typer.Argument(..., help="Meta's native checkpoint directory: path, file:// or s3://."),
    dst: Path = typer.Argument(..., help="Folder to write the HF model, extra heads and tokenizer into."),
) -> None:
    """Convert Meta's native multi-token checkpoint (params.json, consolidated*.pth, tokenizer.model)."""
    setup_logging(None)
    from wmtp.models.native import convert_native as convert
    from wmtp.storage import Storage

    try:
        convert(src, dst, Storage())
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    console.print(f"wrote {dst}")


checkpoints_app = typer.Typer(no_args_is_help=True, help="Inspect and prune a run's checkpoint store.")
app.add_typer(checkpoints_app, name="checkpoints")
StoreArg = typer.Argument(..., help="The run's checkpoint folder: <base_path>/<run name> (path, file:// or s3://).")


@checkpoints_app.command("list")
def checkpoints_list(uri: str = StoreArg) -> None:
    """Checkpoints by step, committed or not, with their time and size."""
    import datetime

    from wmtp.checkpoint import CheckpointError, CheckpointStore
    from wmtp.storage import Storage

    store = CheckpointStore(uri, Storage())
    table = Table(title=f"Checkpoints in {store.root.uri}")
    for column in ("step", "time", "size", "committed"):
        table.add_column(column)
    for info in store.list(include_uncommitted=True):
        when = (
            datetime.datetime.fromtimestamp(info.committed_at).isoformat(" ", "seconds") if info.committed_at else "-"
        )
        size = f"{store.storage.size(info.location) / 2**20:.1f} MiB"
        status = "yes" if info.committed else "NO (ignored)"
        if info.committed:
            try:
                store.verify(info.location)
            except CheckpointError as err:
                status = f"DAMAGED: {str(err).split(': damaged checkpoint: ')[-1]}"
        table.add_row(str(info.step), when, size, status)
    Console().print(table)


@checkpoints_app.command("prune")
def checkpoints_prune(
    uri: str = StoreArg, keep: int = typer.Option(..., min=1, help="Committed checkpoints to keep.")
) -> None:
    """Delete all but the newest KEEP committed checkpoints, and uncommitted leftovers older than them."""
    from wmtp.checkpoint import CheckpointStore
    from wmtp.storage import Storage

    for location in CheckpointStore(uri, Storage()).prune(keep):
        console.print(f"deleted {location.uri}")


@app.command()
def pull(
    sources: list[str] = typer.Argument(None, metavar="SRC_URI...", help="s3:// prefixes (mirrored) or objects."),
    dest: Path | None = typer.Option(None, "--dest", "-d", help="Folder to pull SRC_URI... into."),
    spec: Path | None = typer.Option(None, "--spec", help="YAML/JSON list of {uri, dest}, instead of SRC_URI..."),
    workers: int = typer.Option(16, min=1, max=32, help="Parallel range requests (the S3 client keeps 32 sockets)."),
    part_size: int = typer.Option(64, "--part-size", min=1, help="MiB per ranged GET of a larger object."),
    verify: bool = typer.Option(False, "--verify", help="Also re-hash files already in place against the marker."),
    endpoint_url: str | None = typer.Option(None, help="S3 endpoint. Default: AWS_ENDPOINT_URL, else AWS."),
    region: str | None = typer.Option(None, help="S3 region. Default: AWS_REGION / AWS_DEFAULT_REGION."),
    log_level: str | None = LogLevelOpt,
) -> None:
    """Copy models and datasets from S3: parallel, resumable, verified, safe to run concurrently.

    Prints one JSON summary line on stdout, or one error line on stderr. Exit codes: 0 done,
    1 transfer or verification failed, 2 bad arguments or spec, 3 bucket/key/prefix missing,
    4 access denied or no credentials, 5 endpoint unreachable.
    """
    setup_logging(log_level)
    from wmtp.pull import main

    options = {"workers": workers, "part_size_mb": part_size, "verify": verify}
    raise typer.Exit(main(sources or [], dest, spec, **options, endpoint_url=endpoint_url, region=region))


if __name__ == "__main__":
    app()
