"""Path and query integers the database can hold: beyond 64 bits is a 422 naming the
parameter, never an overflow inside the store."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

from corral.api.common import INT64_MAX, INT64_MIN, SHA256_PATTERN

PathInt = Annotated[int, Path(ge=INT64_MIN, le=INT64_MAX)]
PathSha256 = Annotated[str, Path(pattern=SHA256_PATTERN, description="64 lowercase hex digits")]
