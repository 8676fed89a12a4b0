"""One bounded parser for untrusted JSON and YAML: limits checked before the work, every refusal one line.

Everything that reads text another party wrote goes through `parse_json` or `parse_yaml` with the `Limits` that
fit it: configs, recipes (files, recipeRef ConfigMaps) and pull specs; termination messages, the operator's state
annotation and the trainer's reports. A refusal is a `DocumentError` (a `ConfigError`, so exit 2 in the CLIs).

Why before the work: a parser's cost grows with what it builds, and a Python parser recurses, so a limit checked
afterwards comes too late (a 1 MiB `[1,1,…]` took 15 s and 364 MB before a count refused it; `"[" * 4000` raised
RecursionError). So the size is checked first; JSON's nesting and value count come from its brackets and commas
(one C-speed pass, strings skipped only when they could matter); YAML is read as an event stream (libyaml's where
PyYAML has it) that stops at the first event past a limit, counting what aliases expand to without expanding them.
Integers are bounded by digits (Python refuses past 4,300 with a ValueError, after quadratic work). Only then is
the document built, and JSON's strings measured (the size already bounds their total).

`check_tree` applies the same limits to data that arrived already parsed (a field of an API object).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Any

import yaml

from wmtp import contract

MAX_MESSAGE = 400  # characters of an error text that may reach a status, an Event or a log line


class ConfigError(ValueError):
    """A config, recipe or other input that cannot be used; the message says where and how to fix it."""


class DocumentError(ConfigError):
    """A document refused by the bounded parser: too large, too deep, too many values, or not JSON/YAML."""


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` cut to `limit` characters, saying so, so that no input can make an unbounded message."""
    return text if len(text) <= limit else f"{text[: limit - 30]}… ({len(text) - limit + 30} more characters)"


@dataclass(frozen=True)
class Limits:
    """What one document may be. The defaults fit a config, a recipe or a pull spec (a few KB, about five levels,
    a few hundred values) with room to spare, and refuse a bomb in milliseconds."""

    max_bytes: int = 1 << 20  # a ConfigMap holds at most 1 MiB
    max_depth: int = 100  # nested mappings and sequences
    max_nodes: int = 10_000  # values, counted after alias expansion
    max_string: int = 1 << 16  # characters of one key or value
    max_int_digits: int = 64  # an int64 has 19

    def within(self, **changes: int) -> Limits:
        return replace(self, **changes)


DOCUMENT = Limits()
# A trainer's last words: one small JSON object (`wmtp.reporting` writes it, the operator reads it from the pod).
TERMINATION = Limits(
    max_bytes=contract.TERMINATION_MESSAGE_MAX,
    max_depth=8,
    max_nodes=1_000,
    max_string=contract.TERMINATION_MESSAGE_MAX,
)


def _fail(source: str, problem: str) -> DocumentError:
    return DocumentError(f"{source}: {problem}" if source else problem)


def _text(data: str | bytes, limits: Limits, source: str) -> str:
    """The document as text, refused when larger than the limit or not UTF-8 (checked before anything else)."""
    if isinstance(data, bytes):
        if len(data) > limits.max_bytes:
            raise _fail(source, f"{len(data)} bytes, more than the {limits.max_bytes} a document may have")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _fail(source, f"not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    if len(data) > limits.max_bytes:
        raise _fail(source, f"{len(data)} characters, more than the {limits.max_bytes} a document may have")
    try:
        data.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _fail(source, f"not UTF-8 text (character {err.start})") from None
    return data


def _int_digits(text: str) -> int:
    return len(text.lstrip("+-").replace("_", ""))


# A JSON string, or an unterminated one up to the end (possessive: linear on any input).
_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"?', re.S)
_STRUCTURE = b"[]{},"
_NOT_STRUCTURE = bytes(set(range(256)) - set(_STRUCTURE))
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def _skeleton(text: str) -> bytes:
    """The brackets and commas of `text`, in order: one C-speed pass."""
    return text.encode("utf-8", "surrogatepass").translate(None, _NOT_STRUCTURE)


def _json_shape(text: str, limits: Limits, source: str) -> None:
    """Nesting and value count of a JSON text, from its brackets and commas alone: first counting those inside
    strings too (an over-estimate, enough for nearly every document), then, only if that is over a limit, those
    outside strings."""
    skeleton = _skeleton(text)
    if _over(skeleton, limits):
        skeleton = _skeleton(_JSON_STRING.sub("", text))
        if _depth_over(skeleton, limits.max_depth):
            raise _fail(source, f"nested more than {limits.max_depth} levels deep")
        if _values(skeleton) > limits.max_nodes:
            raise _fail(source, f"more than {limits.max_nodes} values")


def _values(skeleton: bytes) -> int:
    """Every value but the first follows a comma or opens a container: an upper bound, exact for most documents."""
    return skeleton.count(b",") + skeleton.count(b"[") + skeleton.count(b"{") + 1


def _over(skeleton: bytes, limits: Limits) -> bool:
    return skeleton.count(b"[") + skeleton.count(b"{") > limits.max_depth or _values(skeleton) > limits.max_nodes


def json_nested_over(text: str, limit: int) -> bool:
    """Whether the JSON `text` nests deeper than `limit` (strings skipped), without parsing it."""
    skeleton = _skeleton(text)
    return skeleton.count(b"[") + skeleton.count(b"{") > limit and _depth_over(
        _skeleton(_JSON_STRING.sub("", text)), limit
    )


def _depth_over(skeleton: bytes, limit: int) -> bool:
    """Whether the brackets nest deeper than `limit`: running sums a chunk at a time, so that a deep document is
    refused at its first chunk."""
    if skeleton.count(b"[") + skeleton.count(b"{") <= limit:
        return False
    depth, chunk = 0, 1 << 16
    for start in range(0, len(skeleton), chunk):
        sums = list(accumulate(map(_STEP.__getitem__, skeleton[start : start + chunk]), initial=depth))
        if max(sums) > limit:
            return True
        depth = sums[-1]
    return False


def _longest_string(data: Any) -> int:
    """The longest key or string value in parsed data (at most `max_nodes` of them: counted before parsing)."""
    longest, stack = 0, [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            longest = max(longest, len(value))
        elif isinstance(value, dict):
            stack += value.values()
            longest = max(longest, max(map(len, value), default=0))
        elif isinstance(value, list):
            stack += value
    return longest


def parse_json(data: str | bytes, limits: Limits = DOCUMENT, *, source: str = "") -> Any:
    """One JSON value within `limits`; DocumentError (one line, naming `source`) otherwise."""
    text = _text(data, limits, source)
    _json_shape(text, limits, source)

    def bounded_int(digits: str) -> int:
        if _int_digits(digits) > limits.max_int_digits:
            raise _fail(source, f"an integer of {_int_digits(digits)} digits, more than {limits.max_int_digits}")
        return int(digits)

    try:
        data = json.loads(text, parse_int=bounded_int)
    except json.JSONDecodeError as err:
        raise _fail(source, f"not valid JSON: {err.msg} (line {err.lineno} column {err.colno})") from None
    except RecursionError:  # only below a caller already deep in its own stack
        raise _fail(source, "nested too deeply to read") from None
    longest = _longest_string(data)  # after: the total is bounded by the size, and this costs a pass per value
    if longest > limits.max_string:
        raise _fail(source, f"a string of {longest} characters, more than the {limits.max_string} allowed")
    return data


# libyaml's parser when PyYAML has it: about fifteen times faster than the pure-Python one, the same documents.
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_INT_TAG = "tag:yaml.org,2002:int"


def _yaml_shape(text: str, limits: Limits, source: str) -> None:
    """Walk the YAML's events (nothing is built) and stop at the first past a limit. Aliases count what they
    expand to: the size of each anchored node is remembered when it ends."""
    loader = _LOADER(text)
    sizes: dict[str, int] = {}  # anchor → values in its node, aliases expanded
    open_anchors: list[tuple[str | None, int]] = []  # per open collection: its anchor and the count at its start
    total = documents = 0
    aliased = False
    try:
        while True:
            event = loader.get_event()
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    return  # building it reports "expected a single document"
            elif isinstance(event, yaml.StreamEndEvent):
                return
            elif isinstance(event, yaml.CollectionStartEvent):
                total += 1
                open_anchors.append((event.anchor, total - 1))
                if len(open_anchors) > limits.max_depth:
                    raise _fail(source, f"nested more than {limits.max_depth} levels deep")
            elif isinstance(event, yaml.CollectionEndEvent):
                anchor, start = open_anchors.pop()
                if anchor is not None:
                    sizes[anchor] = total - start
            elif isinstance(event, yaml.ScalarEvent):
                total += 1
                _check_scalar(loader, event, limits, source)
                if event.anchor is not None:
                    sizes[event.anchor] = 1
            elif isinstance(event, yaml.AliasEvent):
                if event.anchor not in sizes and any(event.anchor == anchor for anchor, _ in open_anchors):
                    raise _fail(source, "a YAML alias refers to itself (a recursive document)")
                total += sizes.get(event.anchor, 1)
                aliased = True
            if total > limits.max_nodes:
                bomb = " once its aliases are expanded (an alias bomb?)" if aliased else ""
                raise _fail(source, f"more than {limits.max_nodes} values{bomb}")
    finally:
        loader.dispose()


def _check_scalar(loader: yaml.SafeLoader, event: yaml.ScalarEvent, limits: Limits, source: str) -> None:
    value = event.value
    if len(value) > limits.max_string:
        raise _fail(source, f"a string of {len(value)} characters, more than the {limits.max_string} allowed")
    if len(value) > limits.max_int_digits and _INT_TAG in (event.tag, _resolved(loader, event)):
        raise _fail(source, f"an integer of {_int_digits(value)} digits, more than {limits.max_int_digits}")


def _resolved(loader: yaml.SafeLoader, event: yaml.ScalarEvent) -> str | None:
    """The tag a plain scalar resolves to (int, float, bool, ...), None for any other."""
    return loader.resolve(yaml.ScalarNode, event.value, event.implicit) if event.tag is None else None


def parse_yaml(data: str | bytes, limits: Limits = DOCUMENT, *, source: str = "") -> Any:
    """One YAML document (safe tags only) within `limits`; DocumentError (one line, naming `source`) otherwise."""
    text = _text(data, limits, source)
    try:
        _yaml_shape(text, limits, source)
        loader = _LOADER(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except DocumentError:
        raise
    except Exception as err:  # YAMLError, and whatever a constructor raises (`!!timestamp x`: AttributeError)
        said = " ".join(str(err).split()) or type(err).__name__
        if "exceeded maximum nesting depth" in said:  # libyaml's own limit, met while it looks ahead
            raise _fail(source, f"nested more than {limits.max_depth} levels deep") from None
        raise _fail(source, f"not valid YAML: {clip(said)}") from None
    except RecursionError:
        raise _fail(source, "nested too deeply to read") from None


def check_tree(data: Any, limits: Limits, source: str = "") -> None:
    """Data that arrived parsed (a field of an API object) within `limits`, walked without recursion and stopped at
    the first excess; the bytes are those of its compact JSON, estimated without writing it."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    nodes = size = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > limits.max_nodes:
            raise _fail(source, f"more than {limits.max_nodes} values")
        if isinstance(value, dict | list):
            if depth + 1 > limits.max_depth:
                raise _fail(source, f"nested more than {limits.max_depth} levels deep")
            items = value.items() if isinstance(value, dict) else ((None, item) for item in value)
            size += 2
            for key, item in items:
                if key is not None:
                    size += _scalar_size(str(key), limits, source) + 1
                stack.append((item, depth + 1))
                size += 1
        else:
            size += _scalar_size(value, limits, source)
        if size > limits.max_bytes:
            raise _fail(source, f"more than the {limits.max_bytes} bytes a document may have")


def _scalar_size(value: Any, limits: Limits, source: str) -> int:
    if isinstance(value, str):
        if len(value) > limits.max_string:
            raise _fail(source, f"a string of {len(value)} characters, more than the {limits.max_string} allowed")
        return len(value) + 2
    if isinstance(value, int) and not isinstance(value, bool):
        digits = len(str(value)) if value.bit_length() < 4 * limits.max_int_digits else limits.max_int_digits + 1
        if digits > limits.max_int_digits:
            raise _fail(source, f"an integer of more than {limits.max_int_digits} digits")
        return digits
    return 24  # a float, a bool, null
