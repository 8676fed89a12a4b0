"""Shared pieces of the config and recipe models."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from wmtp.config.uris import ABSOLUTE, RELATIVE, shaped
from wmtp.storage import parse_uri


class Strict(BaseModel):
    # inf and nan are refused in every float field: `lr: .inf` would otherwise fail late, inside the optimizer.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


def check_uri(value: str | None) -> str | None:
    """A URI the resolver can take apart (its shape is the field's: `wmtp.config.uris`); `~nouser` is refused."""
    if value is not None:
        try:
            parse_uri(value)
        except RuntimeError as err:  # expanduser of a user that does not exist
            raise ValueError(f"{value[:120]!r}: {err}") from None
    return value


def empty_is_unset(value: Any) -> Any:
    """`${VAR:-}` in a user's file gives "": the same as leaving the field out."""
    return None if value == "" else value


LocalPath = shaped(f"{ABSOLUTE}|{RELATIVE}", "a local path")
# A dataset's name: it names a pull destination and MLflow metrics (`data/<name>/...`), so plain characters only.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
