"""Credentials as the admin sees them: never the secret, except once after a rotation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from corral.api.common import Wire


class TokenView(Wire):
    id: str
    kind: Literal["admin", "join", "agent"]
    instance_id: str | None = Field(default=None, description="agent credentials: whose")
    note: str | None = None
    created_at: float
    last_used_at: float | None = Field(
        default=None, description="last request made with it (recorded at most once a minute)"
    )
    revoked_at: float | None = None


class TokenRotated(Wire):
    id: str
    kind: Literal["admin", "join"]
    secret: str = Field(description="the new token: shown this once, stored only as a hash")
    revoked: int = Field(description="how many tokens of this kind stopped working")
