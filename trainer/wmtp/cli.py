"""`wmtp`: train, validate and build the tiny local models."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from wmtp.config import EvalSettings, clip
from wmtp.contract import (
    CONFIG_FLAG,
    ENV_NODE_RANK,
    EVAL_DATASET_FLAG,
    EVAL_EXPERIMENT_FLAG,
    EVAL_MODEL_FLAG,
    LAUNCH_GRACE_FLAG,
    PULL_DEST_FLAG,
    PULL_SPEC_FLAG,
    PULL_WEIGHTS,
    PULL_WEIGHTS_RANK0,
    RECIPE_FLAG,
    RESUME_FALLBACK_FLAG,
    RESUME_FLAG,
    RESUME_HELP,
    ExitCode,
)
from wmtp.errors import describe
from wmtp.launcher import DEFAULT_GRACE_SECONDS

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
# Logs are read line by line: off a terminal, tables are not squeezed to 80 columns.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

ConfigOpt = typer.Option(..., CONFIG_FLAG, "-c", help="Environment config YAML (paths, mlflow, devices).")
RecipeOpt = typer.Option(..., RECIPE_FLAG, "-r", help="Experiment recipe YAML (algorithm, data, optim, loss).")
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


log = logging.getLogger(__name__)
MAX_ERROR_LINE = 2000


def one_line(text: str) -> str:
    """A message of several lines (a config report, a library's paragraph) as one clipped line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        return clip(f"{lines[0].rstrip(':')}: {'; '.join(lines[1:])}", MAX_ERROR_LINE)
    return clip(lines[0] if lines else text, MAX_ERROR_LINE)


def error(message: str) -> None:
    """One error line, never wrapped, never read as markup."""
    console.print(Text.assemble(("error: ", "red"), one_line(message)), soft_wrap=True, highlight=False)


def fail(message: str, code: int = ExitCode.BAD_INPUT) -> None:
    """One error line, then exit with `code`."""
    error(message)
    raise typer.Exit(code)


def end_worker(code: int) -> None:
    """In a torchrun worker, end the process now with `code`, without the interpreter's finalization; elsewhere
    return. torch's caches keep the process group alive past `destroy_process_group` (DTensor's sharding cache
    holds the device mesh, the mesh its gloo group), and gloo's threads torn down during finalization abort the
    process (SIGABRT; 3 of about 50 two-rank test runs on the 2-core development machine): a rank that
    finished would count as a failed one and restart the run."""
    from wmtp.distributed import under_torchrun

    if not under_torchrun():
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def reported(log_level: str | None, *bad_input: type[BaseException]) -> Iterator[None]:
    """Every failure inside as one unwrapped line on stderr and its exit code (`ExitCode`; docs/errors.md lists
    them): ConfigError, StorageError and `bad_input` by their kind, anything else as exit 1. The traceback is
    logged only at --log-level debug."""
    try:
        yield
    except (typer.Exit, typer.Abort, typer.BadParameter, click.exceptions.Exit, click.exceptions.Abort,
            click.ClickException):  # fmt: skip
        raise
    except Exception as err:
        if (log_level or "").lower() == "debug":
            log.debug("the traceback of the error below", exc_info=True)
        fail(*describe(err, bad_input))


@app.command()
def train(
    config: Path = ConfigOpt,
    recipe: Path = RecipeOpt,
    resume: str | None = typer.Option(
        None,
        RESUME_FLAG,
        help=f"{RESUME_HELP}. Default: the recipe's checkpointing.auto_resume_latest, else start fresh.",
    ),
    allow_config_change: bool = typer.Option(
        False, help="Resume from a checkpoint written with a different config or recipe."
    ),
    save_interval: int | None = typer.Option(None, min=1, help="Overrides the recipe's and the config's."),
    keep_last: int | None = typer.Option(None, min=1, help="Overrides the recipe's and the config's."),
    save_final: bool | None = typer.Option(None, "--save-final/--no-save-final", help="Overrides both files'."),
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
    from wmtp.stopping import StopRequest

    checkpointing = {"save_interval": save_interval, "keep_last": keep_last, "save_final": save_final}
    # SIGTERM is honoured from the very start (a stop asked for while the models load takes effect at the first
    # step boundary), and only here: this command owns the process, a library call never takes its signals.
    with StopRequest().installed() as stop:
        ended = run(config, recipe, resume, allow_config_change, resume_fallback, checkpointing, stop)
    if ended.reason == STOP_FAILED:
        error(ended.message)
    elif ended.reason == STOP_PREEMPTED:
        console.print(f"[yellow]{ended.message}[/yellow]")
    end_worker(ended.exit_code)
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
def validate(config: Path = ConfigOpt, recipe: Path = RecipeOpt, log_level: str | None = LogLevelOpt) -> None:
    """Dry run: load both files, then check what training would hit at its start, and report every problem.

    Models exist; a sample of every dataset parses with the training parser; a probe object can be written
    to and deleted from the checkpoint store; the MLflow server answers. Exit code: 0 valid, 2 if any problem
    is in the input, else the first problem's (3 missing, 4 denied, 5 unreachable).
    """
    setup_logging(log_level or "warning")
    from wmtp.validation import validate_run

    with reported(log_level):
        report = validate_run(str(config), str(recipe))
    if report.rows:  # what was checked, on stdout; the problems and the verdict on stderr, as every command's
        table = Table(title="What would run", show_lines=False)
        for column in ("item", "value", "detail"):
            table.add_column(column)
        for row in report.rows:
            table.add_row(*row)
        Console(width=None if sys.stdout.isatty() else 200).print(table)
    if not report.ok:
        console.print(f"[red]{len(report.problems)} problem(s):[/red]")
        for problem in report.problems:
            console.print(f"  - {one_line(problem.text)}", highlight=False, markup=False, soft_wrap=True)
        first = report.problems[0].text
        fail(f"not valid: {len(report.problems)} problem(s), the first: {first}", report.exit_code)
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
    log_level: str | None = LogLevelOpt,
) -> None:
    """Convert Meta's native multi-token checkpoint (params.json, consolidated*.pth, tokenizer.model)."""
    setup_logging(log_level)
    from wmtp.models.native import convert_native as convert
    from wmtp.storage import Storage

    # The converter names the file or tensor in its FileNotFoundError and ValueError.
    with reported(log_level, FileNotFoundError, ValueError):
        convert(src, dst, Storage())
    console.print(f"wrote {dst}")


checkpoints_app = typer.Typer(no_args_is_help=True, help="Inspect and prune a run's checkpoint store.")
app.add_typer(checkpoints_app, name="checkpoints")
StoreArg = typer.Argument(..., help="The run's checkpoint folder: <base_path>/<run name> (path, file:// or s3://).")


@checkpoints_app.command("list")
def checkpoints_list(uri: str = StoreArg, log_level: str | None = LogLevelOpt) -> None:
    """Checkpoints by step, committed or not, with their time and size."""
    import datetime

    from wmtp.checkpoint import CheckpointError, CheckpointStore
    from wmtp.storage import Storage

    setup_logging(log_level)
    with reported(log_level, CheckpointError):
        store = CheckpointStore(uri, Storage())
        table = Table(title=f"Checkpoints in {store.root.uri}")
        for column in ("step", "time", "size", "committed"):
            table.add_column(column)
        for info in store.list(include_uncommitted=True):
            stamp = info.committed_at
            when = datetime.datetime.fromtimestamp(stamp).isoformat(" ", "seconds") if stamp else "-"
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
    uri: str = StoreArg,
    keep: int = typer.Option(..., min=1, help="Committed checkpoints to keep."),
    log_level: str | None = LogLevelOpt,
) -> None:
    """Delete all but the newest KEEP committed checkpoints, and uncommitted leftovers older than them."""
    from wmtp.checkpoint import CheckpointError, CheckpointStore
    from wmtp.storage import Storage

    setup_logging(log_level)
    with reported(log_level, CheckpointError):
        for location in CheckpointStore(uri, Storage()).prune(keep):
            console.print(f"deleted {location.uri}")


@app.command()
def pull(
    sources: list[str] = typer.Argument(None, metavar="SRC_URI...", help="s3:// prefixes (mirrored) or objects."),
    dest: Path | None = typer.Option(None, PULL_DEST_FLAG, "-d", help="Folder to pull SRC_URI... into."),
    spec: Path | None = typer.Option(
        None, PULL_SPEC_FLAG, help="YAML/JSON list of {uri, dest[, weights]}, instead of SRC_URI..."
    ),
    workers: int = typer.Option(16, min=1, max=32, help="Parallel range requests (the S3 client keeps 32 sockets)."),
    part_size: int = typer.Option(64, "--part-size", min=1, help="MiB per ranged GET of a larger object."),
    verify: bool = typer.Option(False, "--verify", help="Also re-hash files already in place against the marker."),
    endpoint_url: str | None = typer.Option(None, help="S3 endpoint. Default: AWS_ENDPOINT_URL, else AWS."),
    region: str | None = typer.Option(None, help="S3 region. Default: AWS_REGION / AWS_DEFAULT_REGION."),
    node_rank: int | None = typer.Option(
        None,
        "--node-rank",
        envvar=ENV_NODE_RANK,
        min=0,
        help=f"This pod's node rank: other than 0, spec entries with {PULL_WEIGHTS}: {PULL_WEIGHTS_RANK0} leave "
        "out their weight files. Unset: pull everything.",
    ),
    log_level: str | None = LogLevelOpt,
) -> None:
    """Copy models and datasets from S3: parallel, resumable, verified, safe to run concurrently.

    Prints one JSON summary line on stdout, or one error line on stderr. Exit codes: 0 done,
    1 transfer or verification failed, 2 bad arguments or spec, 3 bucket/key/prefix missing,
    4 access denied or no credentials, 5 endpoint unreachable.
    """
    setup_logging(log_level)
    from wmtp.pull import main

    options = {"workers": workers, "part_size_mb": part_size, "verify": verify, "node_rank": node_rank}
    with reported(log_level):
        code = main(sources or [], dest, spec, **options, endpoint_url=endpoint_url, region=region)
    raise typer.Exit(code)


EVAL = EvalSettings()  # the defaults of `wmtp eval`'s options


def _eval_help(name: str) -> str:
    return EvalSettings.model_fields[name].description or ""


@app.command("eval")
def evaluate(
    model: str = typer.Option(
        ..., EVAL_MODEL_FLAG, "-m", help="The final model: <checkpoints>/<run>/final (path or URI)."
    ),
    tasks: str = typer.Option(",".join(EVAL.tasks), help=f"Comma-separated. {_eval_help('tasks')}"),
    k: str = typer.Option(",".join(map(str, EVAL.k)), "--k", help=f"Comma-separated. {_eval_help('k')}"),
    samples: int = typer.Option(EVAL.samples, help=_eval_help("samples")),
    temperature: float = typer.Option(EVAL.temperature, help=_eval_help("temperature")),
    max_new_tokens: int = typer.Option(EVAL.max_new_tokens, help=_eval_help("max_new_tokens")),
    limit: int | None = typer.Option(EVAL.limit, help=_eval_help("limit")),
    dataset: list[str] = typer.Option(
        [], EVAL_DATASET_FLAG, help="NAME=URI of a task's data (mbpp needs one; humaneval is bundled)."
    ),
    program_timeout: float = typer.Option(EVAL.program_timeout, help=_eval_help("program_timeout")),
    speed_prompts: int = typer.Option(EVAL.speed_prompts, help=_eval_help("speed_prompts")),
    seed: int = typer.Option(EVAL.seed, help=_eval_help("seed")),
    batch_size: int = typer.Option(EVAL.batch_size, help=_eval_help("batch_size")),
    chat_template: str = typer.Option(
        str(EVAL.chat_template).lower(), help=f"true|false. {_eval_help('chat_template')}"
    ),
    extract_code: str = typer.Option(str(EVAL.extract_code).lower(), help=f"true|false. {_eval_help('extract_code')}"),
    output: Path | None = typer.Option(None, help="Write the whole report (every problem) as JSON here."),
    mlflow_run_id: str | None = typer.Option(
        None,
        help="Log the metrics to this (training) run. Default: the run the final model's COMMITTED marker names, "
        "else a new run.",
    ),
    experiment: str = typer.Option("wmtp", EVAL_EXPERIMENT_FLAG, help="MLflow experiment of a new eval run."),
    log_level: str | None = typer.Option(None, "--log-level", help="debug|info|warning."),
) -> None:
    """pass@k on HumanEval and MBPP in a sandbox, and the speed-up of self-speculative decoding.

    Prints a table on stderr and one JSON line on stdout: the per-task scores and the decoding speed. Leaves a
    termination message as the trainer does (the scores, or the one-line error).
    """
    setup_logging(log_level)
    from wmtp.eval.command import boolean, datasets, headline, ints, last_words, options, progress, show
    from wmtp.eval.runner import evaluate as run_eval
    from wmtp.eval.runner import log_to_mlflow, summary, training_run
    from wmtp.storage import Storage

    storage = Storage()
    with reported(log_level, ValueError), last_words(ValueError) as ended:
        settings = options(
            model=model, tasks=[t.strip() for t in tasks.split(",") if t.strip()], k=ints(k, "--k"), samples=samples,
            temperature=temperature, max_new_tokens=max_new_tokens, limit=limit, datasets=datasets(dataset),
            program_timeout=program_timeout, speed_prompts=speed_prompts, seed=seed, batch_size=batch_size,
            chat_template=boolean(chat_template, "--chat-template"),
            extract_code=boolean(extract_code, "--extract-code"),
        )  # fmt: skip
        with progress(console) as advance:
            report = run_eval(settings, storage, progress=advance)
        if output is not None:
            output.write_text(json.dumps(report, indent=1))
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
        if mlflow_run_id or tracking_uri:
            run_id = mlflow_run_id or training_run(model, storage)
            report["mlflow_run_id"] = log_to_mlflow(report, tracking_uri, run_id, experiment)
        ended.eval, ended.message = summary(report), headline(report)
    show(report, settings.k, console)


if __name__ == "__main__":
    app()
