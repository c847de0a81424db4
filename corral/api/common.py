"""Shared pieces of the wire schema: name and sha256 patterns, the strict base model."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,62})$"


SHA256_PATTERN = r"^[0-9a-f]{64}$"


Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN)]


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _beyond_int64(value: object) -> bool:
    if isinstance(value, int):
        return not INT64_MIN <= value <= INT64_MAX
    if isinstance(value, list | tuple | set | frozenset):
        return any(_beyond_int64(v) for v in value)
    if isinstance(value, dict):
        return any(_beyond_int64(v) for v in value.values())
    return False


class Strict(BaseModel):
    """What clients and agents send: unknown fields are refused, and so are integers
    the database cannot hold (beyond 64 bits)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _int64(cls, value: object) -> object:
        if _beyond_int64(value):
            raise ValueError("integer out of range (at most 64 bits)")
        return value


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)


def _parse_size(text: str, default_unit: str, examples: str) -> float:
    """A size in KiB-based units: its value in bytes for `default_unit` 'b', in MiB
    for 'm'."""
    m = _MEMORY.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: {examples})")
    value, unit = float(m.group(1)), (m.group(2) or default_unit)[0].lower()
    exponent = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit]
    base = {"b": 0, "m": 2}[default_unit]
    return value * 1024.0 ** (exponent - base)


def parse_memory_mb(text: str) -> int:
    """'512' and '512M' are megabytes; '2G' is 2048 MB; '1.5GiB' is 1536 MB."""
    return int(_parse_size(text, "m", "512M, 2G"))


def parse_bytes(text: str) -> int:
    """'4M' is 4 MiB, '1G' 1 GiB, '512K' 512 KiB; a plain number is bytes."""
    return int(_parse_size(text, "b", "512K, 64M, 1G"))
