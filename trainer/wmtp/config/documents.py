"""Reading the YAML documents a user or the operator wrote: bounded, strict about encoding, one clear error.

Every YAML that enters (config and recipe files, recipeRef ConfigMaps, pull specs) goes through `parse_yaml`:
a size cap, a cap on the node count after alias expansion (a 549-byte alias bomb otherwise expands to gigabytes
the moment anything walks it), UTF-8 only. `clip` bounds any text before it reaches a status, an Event or a log.
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml
from pydantic import ValidationError

from wmtp.contract import RENDERED_MARKER

MAX_DOCUMENT_BYTES = 1 << 20  # a recipe is a few KB; a ConfigMap holds at most 1 MiB
MAX_NODES = 100_000  # after alias expansion: far above any real config, far below a bomb
MAX_DEPTH = 100  # nesting levels: a config has about five; deeper costs the parser time and recursion
MAX_MESSAGE = 400  # characters of an error text that may reach a status, an Event or a log line


class ConfigError(ValueError):
    """A config or recipe that cannot be used; the message says where and how to fix it."""


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` cut to `limit` characters, saying so, so that no input can make an unbounded message."""
    return text if len(text) <= limit else f"{text[: limit - 30]}… ({len(text) - limit + 30} more characters)"


def redact_uri(uri: str) -> str:
    """`uri` (or a text quoting URIs) with any user:password@ (or token@) part replaced, for logs, records, statuses
    and Events. Up to the authority's last `@`: a password with an unescaped `@` in it is hidden whole."""
    return re.sub(r"(?<=://)[^/?#\s]*@", "***@", uri)


def _expanded_size(root: yaml.Node) -> int:
    """Nodes in the document once every alias is expanded, computed without expanding anything."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError("a YAML alias refers to itself (a recursive document)")
        active.add(key)
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                break
        active.discard(key)
        sizes[key] = total
        return total

    return size(root)


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that refuses nesting deeper than MAX_DEPTH while composing, before reading further: the
    scanner is lazy, so a 1 MiB `[[[[…` costs microseconds instead of a quadratic scan and a RecursionError."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ConfigError(f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_yaml(data: str | bytes, source: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """One YAML document, bounded in size and in alias expansion; ConfigError naming `source` otherwise."""
    if isinstance(data, bytes):
        if len(data) > max_bytes:
            raise ConfigError(f"{source}: {len(data)} bytes, more than the {max_bytes} a document may have")
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{source}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    if len(data) > max_bytes:
        raise ConfigError(f"{source}: {len(data)} characters, more than the {max_bytes} a document may have")
    try:
        loader = _BoundedLoader(data)  # refuses control characters already
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {clip(' '.join(str(err).split()))}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_NODES:
            raise ConfigError(f"more than {MAX_NODES} values once its aliases are expanded (an alias bomb?)")
        return loader.construct_document(node)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {clip(' '.join(str(err).split()))}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested more than {MAX_DEPTH} levels deep") from None
    finally:
        loader.dispose()


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(text: str, env: dict[str, str] | None = None) -> str:
    """Expand `${VAR}` and `${VAR:-default}`; an unset variable without a default is an error."""
    env = os.environ if env is None else env

    def expand(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ConfigError(f"${{{name}}} is not set; export it or write ${{{name}:-default}}")
            return default
        return value

    return _VAR.sub(expand, text)


def read_document(path: os.PathLike[str] | str, max_bytes: int = MAX_DOCUMENT_BYTES) -> dict[str, Any]:
    """A YAML mapping from a file a user wrote (`${VAR}` expanded) or the operator rendered (starts with
    RENDERED_MARKER: its values are data and are never expanded)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it: {err.strerror}") from None
    text_or_bytes: str | bytes = raw
    if not raw.startswith(RENDERED_MARKER.encode()):
        try:
            text_or_bytes = substitute_env(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    data = parse_yaml(text_or_bytes, str(path), max_bytes)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


_MAX_PROBLEMS = 20  # listed per document; the rest are counted


def format_validation_error(source: str, err: ValidationError) -> str:
    """One line per problem (at most _MAX_PROBLEMS, each clipped): the dotted field path and what is wrong."""
    errors = err.errors()
    lines = [f"{clip(source)}: {len(errors)} problem(s)"]
    for e in errors[:_MAX_PROBLEMS]:
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        elif e["type"] == "literal_error" or e["type"] == "enum":
            msg = f"{msg} (got {clip(repr(e.get('input')), 100)})"
        lines.append(clip(f"  {where}: {msg}"))
    if len(errors) > _MAX_PROBLEMS:
        lines.append(f"  … and {len(errors) - _MAX_PROBLEMS} more")
    return "\n".join(lines)
