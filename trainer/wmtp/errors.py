"""Ordinary failures as one line and an exit code (`ExitCode`); anything else is a bug, and says so."""

from __future__ import annotations

from wmtp.config import ConfigError
from wmtp.contract import ExitCode


def describe(err: Exception, bad_input: tuple[type[BaseException], ...] = ()) -> tuple[str, int]:
    """(the line to print, the exit code): storage failures by their kind, `ConfigError` and `bad_input` as bad
    input (2), permissions and missing files by the file they name, anything else as an unexpected error (1)."""
    from wmtp.storage import StorageError

    if isinstance(err, StorageError):
        return str(err), err.code
    if isinstance(err, (ConfigError, *bad_input)):
        return str(err), ExitCode.BAD_INPUT
    if isinstance(err, PermissionError):
        return f"{err.filename or ''}: permission denied; check the file's owner and mode", ExitCode.DENIED
    if isinstance(err, FileNotFoundError | NotADirectoryError | IsADirectoryError) and err.filename:
        return f"{err.filename}: {err.strerror}", ExitCode.BAD_INPUT
    return f"{type(err).__name__}: {err} (an unexpected error: --log-level debug shows where)", ExitCode.ERROR
