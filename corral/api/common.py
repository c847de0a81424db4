"""Shared pieces of the wire schema: name and sha256 patterns, the strict base model."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,62})$"


SHA256_PATTERN = r"^[0-9a-f]{64}$"


Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)


def parse_memory_mb(text: str) -> int:
    """'512' and '512M' are megabytes; '2G' is 2048 MB; '1.5GiB' is 1536 MB."""
    m = _MEMORY.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 512M, 2G)")
    value, unit = float(m.group(1)), (m.group(2) or "m")[0].lower()
    factor = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}[unit]
    return int(value * factor)
