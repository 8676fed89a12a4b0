"""Reading the YAML documents a user or the operator wrote, and reporting what is wrong with them in bounded lines.

Every YAML that enters (config and recipe files, recipeRef ConfigMaps, pull specs) is parsed by
`wmtp.config.bounded.parse_yaml` (size, nesting, values after alias expansion, string and integer size bounded
before the work; UTF-8 only). A user's own file has its `${VAR}`s expanded first; a file the operator rendered is
data. `clip` bounds any text before it reaches a status, an Event or a log.
"""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import ValidationError

from wmtp.config.bounded import DOCUMENT, MAX_MESSAGE, ConfigError, clip, parse_yaml
from wmtp.config.uris import redact_uri
from wmtp.contract import RENDERED_MARKER

__all__ = ["MAX_DOCUMENT_BYTES", "MAX_MESSAGE", "MAX_NODES", "ConfigError", "clip", "format_validation_error",
           "parse_yaml", "read_document", "redact_uri", "substitute_env"]  # fmt: skip

MAX_DOCUMENT_BYTES = DOCUMENT.max_bytes
MAX_NODES = DOCUMENT.max_nodes


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
    data = parse_yaml(text_or_bytes, DOCUMENT.within(max_bytes=max_bytes), source=str(path))
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
