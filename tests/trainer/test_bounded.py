"""The bounded parser (`wmtp.config.bounded`): every hostile shape of JSON and YAML (deep, wide, huge integers, huge
strings, alias bombs) is one DocumentError line, refused in well under half a second and bounded memory, before
the parser builds anything of it; and what is within the limits reads as `json` and `yaml.safe_load` read it."""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from wmtp.config import DOCUMENT, TERMINATION, DocumentError, Limits, check_tree, parse_json, parse_yaml


def laughs(width: int = 9, depth: int = 9) -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


def merge_bomb() -> str:
    lines = ["k0: &k0 {a0: 1, b0: 2}"]
    lines += [f"k{i}: &k{i} {{<<: [*k{i - 1}], x: [{', '.join([f'*k{i - 1}'] * 6)}]}}" for i in range(1, 10)]
    return "\n".join(lines) + "\n"


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": [value]}
    return value


MiB = 1 << 20
# (parser, text, limits, the words of the refusal)
HOSTILE: dict[str, tuple[Callable[..., Any], str, Limits, str]] = {
    "deep JSON arrays": (parse_json, "[" * MiB, DOCUMENT, "nested more than 100 levels deep"),
    "deep JSON objects": (parse_json, '{"a":' * 200_000, DOCUMENT, "nested more than 100 levels deep"),
    "deep JSON after a wide start": (parse_json, "[" + "[]," * 300_000 + "[" * 200, DOCUMENT, "nested more than 100"),
    "deep YAML flow": (parse_yaml, "[" * MiB, DOCUMENT, "nested more than 100 levels deep"),
    "deep YAML block": (parse_yaml, "".join(f"{' ' * i}k:\n" for i in range(1400)), DOCUMENT, "nested more than 100"),
    "deep YAML block sequence": (parse_yaml, "- " * 100_000 + "x", DOCUMENT, "nested more than 100 levels deep"),
    "wide JSON": (parse_json, "[" + "1," * (MiB // 2 - 2) + "1]", DOCUMENT, "more than 10000 values"),
    "wide JSON object": (parse_json, "{" + ",".join(f'"{i}":0' for i in range(100_000)) + "}", DOCUMENT, "values"),
    "wide YAML flow": (parse_yaml, "[" + "1," * (MiB // 2 - 2) + "1]", DOCUMENT, "more than 10000 values"),
    "wide YAML block": (parse_yaml, "".join(f"k{i}: 1\n" for i in range(90_000)), DOCUMENT, "more than 10000"),
    "huge JSON integer": (parse_json, "9" * 5000, DOCUMENT, "an integer of 5000 digits, more than 64"),
    "huge JSON integer deep in": (parse_json, '{"a": [1, ' + "9" * 100_000 + "]}", DOCUMENT, "100000 digits"),
    "huge YAML integer": (parse_yaml, "a: " + "9" * 5000, DOCUMENT, "an integer of 5000 digits, more than 64"),
    "huge YAML hex integer": (parse_yaml, "a: 0x" + "f" * 50_000, DOCUMENT, "digits, more than 64"),
    "huge YAML base-60 integer": (parse_yaml, "a: " + "1:" * 20_000 + "1", DOCUMENT, "digits, more than 64"),
    "huge tagged YAML integer": (parse_yaml, "a: !!int " + "1" * 5000, DOCUMENT, "digits, more than 64"),
    "huge JSON string": (parse_json, '["' + "x" * 900_000 + '"]', DOCUMENT, "a string of 900000 characters"),
    "huge YAML string": (parse_yaml, "a: '" + "x" * 900_000 + "'", DOCUMENT, "a string of 900000 characters"),
    "huge YAML key": (parse_yaml, "x" * 100_000 + ": 1", DOCUMENT, "a string of 100000 characters"),
    "too large JSON": (parse_json, " " * (2 * MiB), DOCUMENT, "more than the 1048576 a document may have"),
    "too large YAML": (parse_yaml, "#" * (2 * MiB), DOCUMENT, "more than the 1048576 a document may have"),
    "billion laughs": (parse_yaml, laughs(), DOCUMENT, "once its aliases are expanded (an alias bomb?)"),
    "wide laughs": (parse_yaml, laughs(width=400, depth=3), DOCUMENT, "once its aliases are expanded"),
    "merge-key bomb": (parse_yaml, merge_bomb(), DOCUMENT, "once its aliases are expanded"),
    "recursive alias": (parse_yaml, "a: &a [1, *a]\n", DOCUMENT, "a YAML alias refers to itself"),
    "last words of brackets": (parse_json, "[" * 4000, TERMINATION, "nested more than 8 levels deep"),
    "last words too long": (parse_json, '"' + "x" * 5000 + '"', TERMINATION, "more than the 4096"),
    "unterminated strings": (parse_json, '"\\"' * 300_000, DOCUMENT, "not valid JSON"),
    "not UTF-8": (parse_yaml, b"a: caf\xe9", DOCUMENT, "not UTF-8 text (byte 6)"),
    "a control character": (parse_yaml, "a: \x1b[31m", DOCUMENT, "not valid YAML"),
    "python tags": (parse_yaml, "!!python/object/apply:os.system [ls]", DOCUMENT, "not valid YAML"),
    "a timestamp that is none": (parse_yaml, "a: !!timestamp x", DOCUMENT, "not valid YAML"),
    "a date out of range": (parse_yaml, "a: 2001-13-40", DOCUMENT, "not valid YAML: month must be in 1..12"),
}


def refusal(parse: Callable[..., Any], text: Any, limits: Limits) -> str:
    with pytest.raises(DocumentError) as refused:
        parse(text, limits, source="doc")
    return str(refused.value)


@pytest.mark.parametrize("shape", list(HOSTILE))
def test_a_hostile_document_is_one_line_refused_fast_in_bounded_memory(shape: str) -> None:
    parse, text, limits, says = HOSTILE[shape]
    seconds = []
    for _ in range(3):  # the best of three: the machine is shared
        started = time.perf_counter()
        message = refusal(parse, text, limits)
        seconds.append(time.perf_counter() - started)
    tracemalloc.start()
    try:
        refusal(parse, text, limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message.startswith("doc: ") and says in message and "\n" not in message and len(message) < 600, message
    assert min(seconds) < 0.5 and peak < 32 * MiB, (seconds, peak)


WITHIN = [
    '{"a": "[[[[{{{{", "b": [1, 2.5, true, null], "c": {"d": "\\"]"}}',
    '[[[[[[[[["nine deep is fine"]]]]]]]]]',
    '{"big": 123456789012345678901234567890, "neg": -42, "exp": 1e300}',
]


@pytest.mark.parametrize("text", WITHIN)
def test_json_within_the_limits_reads_as_json_reads_it(text: str) -> None:
    assert parse_json(text) == json.loads(text) == parse_json(text.encode())


def test_yaml_within_the_limits_reads_as_safe_load_reads_it() -> None:
    text = "a: &x {b: [1, 2]}\nc: *x\ne: {<<: *x, f: 2001-12-14}\ng: 0x1f\nh: 1_000\ni: !!binary aGk=\n"
    assert parse_yaml(text) == yaml.safe_load(text)
    assert parse_yaml("") is None
    with pytest.raises(DocumentError, match="not valid YAML: expected a single document"):
        parse_yaml("--- a\n--- b\n")


@pytest.mark.parametrize(
    ("data", "limits", "says"),
    [
        (nested(600), DOCUMENT, "nested more than 100 levels deep"),
        ([0] * 20_000, DOCUMENT, "more than 10000 values"),
        ({"k": "x" * 70_000}, DOCUMENT, "a string of 70000 characters"),
        ({"x" * 70_000: 1}, DOCUMENT, "a string of 70000 characters"),
        ([10**5000], DOCUMENT, "an integer of more than 64 digits"),
        (["x" * 60_000] * 20, DOCUMENT, "more than the 1048576 bytes"),
        ({"a": nested(20)}, DOCUMENT.within(max_depth=16), "nested more than 16 levels deep"),
    ],
    ids=["deep", "wide", "long string", "long key", "huge int", "large", "deeper than a recipe"],
)
def test_parsed_data_is_held_to_the_same_limits(data: Any, limits: Limits, says: str) -> None:
    started = time.process_time()
    with pytest.raises(DocumentError, match=says):
        check_tree(data, limits, "spec.recipe")
    assert time.process_time() - started < 0.5
    check_tree({"run": {"tags": {"a": "b"}}, "optim": {"betas": [0.9, 0.95], "lr": 1e-3}}, limits)
