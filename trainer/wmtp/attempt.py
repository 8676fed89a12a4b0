"""One `wmtp train` process from start to its termination message: whatever happens, it says why it stopped.

The operator reads that message from the container's terminated state; `wmtp launch` reads it too, to exit with
the workers' meaning. Every node's first local worker writes it (each pod has its own), with the warnings of
this attempt (rank 0's are the MLflow ones). The command that owns the process hands in its SIGTERM request, so a
stop asked for while the models load takes effect at the first step boundary, after a checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from wmtp.checkpoint import CheckpointError
from wmtp.config import clip, load, override_checkpointing
from wmtp.contract import STOP_FAILED, STOP_PREEMPTED, STOP_SUCCEEDED, ExitCode
from wmtp.data import DataError
from wmtp.distributed import close_process_group
from wmtp.errors import describe
from wmtp.models.loading import ModelError
from wmtp.reporting import Termination, write_termination
from wmtp.stopping import Preempted, StopRequest
from wmtp.train import Trainer

log = logging.getLogger(__name__)


def run(
    config_path: Path,
    recipe_path: Path,
    resume: str | None = None,
    allow_config_change: bool = False,
    resume_fallback: bool = False,
    checkpointing: Mapping[str, object] | None = None,
    stop: StopRequest | None = None,
) -> Termination:
    """Train, with the command line's `checkpointing` settings over the recipe's; returns how it ended. A failure
    ends as one line and its exit code (`wmtp.errors.describe`); its traceback is logged at debug level. `stop` is
    the process's SIGTERM request, installed by the command that owns the process (a library call installs no
    signal handler)."""
    trainer: Trainer | None = None
    termination = Termination(STOP_FAILED, ExitCode.ERROR, "the trainer stopped before it could say why")
    try:
        config, recipe = load(config_path, recipe_path)
        recipe = override_checkpointing(recipe, **(checkpointing or {}))
        trainer = Trainer(
            config, recipe, resume=resume, allow_config_change=allow_config_change,
            resume_fallback=resume_fallback, stop=stop,
        )  # fmt: skip
        summary = trainer.train()
        termination = Termination(STOP_SUCCEEDED, ExitCode.OK, f"finished at step {summary['steps']}")
    except Preempted as stopped:
        termination = Termination(STOP_PREEMPTED, ExitCode.PREEMPTED, str(stopped))
    except Exception as err:
        log.debug("the traceback of the error below", exc_info=True)
        message, code = describe(err, (CheckpointError, DataError, ModelError))
        termination = Termination(STOP_FAILED, code, clip(message, 2000))
    except BaseException as err:
        termination.message = clip(f"{type(err).__name__}: {err}", 2000)
        raise
    finally:
        if trainer is not None:
            latest = trainer.checkpoints.latest
            termination.step, termination.checkpoint = trainer.state.step, latest.uri if latest else None
            termination.warnings = trainer.warnings
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            write_termination(termination)
        close_process_group()
    return termination
