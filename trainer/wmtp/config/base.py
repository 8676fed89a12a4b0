"""Shared pieces of the config and recipe models."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from wmtp.storage import parse_uri


class Strict(BaseModel):
    # inf and nan are refused in every float field: `lr: .inf` would otherwise fail late, inside the optimizer.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


def check_uri(value: str | None) -> str | None:
    if value is not None:
        parse_uri(value)
    return value


Uri = Annotated[str, Field(min_length=1)]
# A dataset's name: it names a pull destination and MLflow metrics (`data/<name>/...`), so plain characters only.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
