"""Records as users have them, one parser per format: each turns a record into an `Example` (prompt + solution)
or names why the record is skipped, and raises `BadRecord` for a record that does not fit its format."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, get_args

from wmtp.config import DEFAULT_LANGUAGES, DatasetFormat


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file and, for a bad record, the line or row."""


class BadRecord(Exception):
    """Raised by a record parser; the reader adds the file and line."""


@dataclass(frozen=True)
class Example:
    prompt: str
    solution: str

    @property
    def text(self) -> str:
        # Completion-style data ("def f(x):" + "    return x") must stay byte-exact; only two texts that
        # would otherwise run together get a newline between them.
        if not self.prompt or self.prompt[-1].isspace() or self.solution[:1].isspace():
            return self.prompt + self.solution
        return f"{self.prompt}\n{self.solution}"


# A parser's answer: the example, or the reason the record is skipped (counted, never trained on).
Parsed = Example | str


def _field(record: dict[str, Any], name: str, kind: type = str) -> Any:
    if name not in record:
        raise BadRecord(f"missing field {name!r} (has: {', '.join(sorted(map(str, record)))[:300] or 'nothing'})")
    value = record[name]
    if not isinstance(value, kind):
        raise BadRecord(f"field {name!r} is {type(value).__name__}, expected {kind.__name__}")
    return value


def _strings(record: dict[str, Any], name: str, default: list[str] | None = None) -> list[str]:
    value = record.get(name, default) if default is not None else _field(record, name, list)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise BadRecord(f"field {name!r} must be a list of strings")
    return value


def _mbpp(record: dict[str, Any]) -> Parsed:
    """MBPP full (`text`, `code`, `test_list`) or sanitized (`prompt`, `code`, `test_list`, `test_imports`)."""
    if "text" not in record and "prompt" not in record:
        raise BadRecord("missing field 'text' (MBPP full) or 'prompt' (MBPP sanitized)")
    description = _field(record, "text" if "text" in record else "prompt")
    tests = "\n".join([*_strings(record, "test_imports", []), *_strings(record, "test_list")])
    # The tests fix the function name and signature the solution must use, as in the MBPP paper's prompt.
    return Example(f'"""\n{description.strip()}\n\n{tests}\n"""\n', _field(record, "code"))


# deepmind/code_contests solution languages, as ids (the dataset's own) and as names.
CODECONTESTS_LANGUAGES = {0: "unknown", 1: "python2", 2: "cpp", 3: "python3", 4: "java"}


def _language(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return CODECONTESTS_LANGUAGES.get(value, "unknown")
    return str(value).lower().replace(" ", "") if isinstance(value, str) else "unknown"


def _codecontests(record: dict[str, Any], languages: Sequence[str]) -> Parsed:
    """The first solution in the most preferred accepted language; skipped when there is none."""
    description = _field(record, "description")
    solutions = _field(record, "solutions", dict)
    found, codes = _field(solutions, "language", list), _strings(solutions, "solution")
    if len(found) != len(codes):
        raise BadRecord(f"solutions has {len(found)} languages for {len(codes)} solutions")
    if not codes:
        return "no_solutions"
    names = [_language(value) for value in found]
    for language in languages:
        if language in names:
            return Example(description, codes[names.index(language)])
    return "no_accepted_language"


def _humaneval(record: dict[str, Any]) -> Parsed:
    return Example(_field(record, "prompt"), _field(record, "canonical_solution"))


def _jsonl(record: dict[str, Any]) -> Parsed:
    if "prompt" in record:
        answer = "completion" if "completion" in record else "solution"
        if answer not in record:
            raise BadRecord("missing field 'completion' (or 'solution') next to 'prompt'")
        return Example(_field(record, "prompt"), _field(record, answer))
    if "text" in record:
        return Example("", _field(record, "text"))
    raise BadRecord("missing field 'prompt' (with 'completion' or 'solution') or 'text'")


FORMATS: tuple[str, ...] = get_args(DatasetFormat)


def parser(fmt: str, languages: Sequence[str] = DEFAULT_LANGUAGES) -> Callable[[dict[str, Any]], Parsed]:
    """The record parser of a format; `languages` (codecontests) are the accepted ones, preferred first."""
    parsers: dict[str, Callable[[dict[str, Any]], Parsed]] = {
        "mbpp": _mbpp,
        "codecontests": functools.partial(_codecontests, languages=tuple(languages)),
        "humaneval": _humaneval,
        "jsonl": _jsonl,
    }
    if fmt not in parsers:
        raise DataError(f"unknown dataset format {fmt!r}; known: {', '.join(FORMATS)}")
    return parsers[fmt]
