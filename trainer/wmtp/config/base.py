"""Shared pieces of the config and recipe models."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from wmtp.storage import parse_uri


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def check_uri(value: str | None) -> str | None:
    if value is not None:
        parse_uri(value)
    return value


Uri = Annotated[str, Field(min_length=1)]
