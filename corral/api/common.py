"""Shared pieces of the wire schema: name and sha256 patterns, the strict base model."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,62})$"


SHA256_PATTERN = r"^[0-9a-f]{64}$"


Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
