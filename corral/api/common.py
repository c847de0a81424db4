"""Shared pieces of the wire schema: name and sha256 patterns, the strict base model."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    field_validator,
)

# the size parsers live in the domain (the CLI uses them without pydantic); re-exported
from corral.domain.sizes import parse_bytes as parse_bytes
from corral.domain.sizes import parse_memory_mb as parse_memory_mb

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


class Wire(BaseModel):
    """The base of every wire model. Its schema is built on first use (validation,
    serialisation, a JSON schema), not when its module is imported: a client that
    submits a job builds two models, not the whole protocol (`corral run` starts in
    a fraction of the time)."""

    model_config = ConfigDict(defer_build=True)


class Strict(Wire):
    """What clients and agents send: unknown fields are refused, and so are integers
    the database cannot hold (beyond 64 bits)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _int64(cls, value: object) -> object:
        if _beyond_int64(value):
            raise ValueError("integer out of range (at most 64 bits)")
        return value


class UtcTime(float):
    """A moment as seconds since the epoch (so the server's arithmetic on it stays
    plain), shown on the wire as ISO-8601 UTC: `2026-05-01T12:00:00.250000Z`.
    `.datetime` is the timezone-aware datetime."""

    @property
    def datetime(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self, dt.UTC)

    def isoformat(self) -> str:
        return self.datetime.isoformat().replace("+00:00", "Z")

    def __repr__(self) -> str:
        return f"UtcTime({self.isoformat()!r})"


def _to_utc_time(value: Any) -> Any:
    """Accept ISO-8601 (a naive one is UTC), a datetime, or epoch seconds."""
    if value is None or isinstance(value, UtcTime):
        return value
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO-8601 time") from None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return UtcTime(value.timestamp())
    if isinstance(value, int | float) and not isinstance(value, bool):
        return UtcTime(value)
    return value


def _iso(value: float) -> str:
    return UtcTime(value).isoformat()


Timestamp = Annotated[
    float,
    BeforeValidator(_to_utc_time),
    AfterValidator(UtcTime),
    PlainSerializer(_iso, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
"""A wire-schema time: ISO-8601 UTC in JSON, a `UtcTime` (epoch float) in Python."""
