"""Bearer credentials (admin, join, per-instance agent), stored only as hashes."""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.domain.tokens import hash_secret, well_formed
from corral.store.schema import tokens

ADMIN, JOIN, AGENT = "admin", "join", "agent"


def new_secret(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


async def create_token(
    conn: AsyncConnection,
    kind: str,
    now: float,
    *,
    instance_id: str | None = None,
    note: str | None = None,
    secret: str | None = None,
) -> str:
    """Create a token of `kind`; return its plaintext (the only time it is seen)."""
    secret = secret or new_secret({ADMIN: "cra", JOIN: "crj", AGENT: "crg"}[kind])
    await conn.execute(
        sa.insert(tokens).values(
            id=secrets.token_hex(8),
            kind=kind,
            token_hash=hash_secret(secret),
            instance_id=instance_id,
            created_at=now,
            note=note,
        )
    )
    return secret


async def lookup(conn: AsyncConnection, secret: str | None) -> sa.RowMapping | None:
    if not secret or not well_formed(secret.split("_", 1)[-1]):
        return None
    row = (
        (
            await conn.execute(
                sa.select(tokens).where(
                    tokens.c.token_hash == hash_secret(secret), tokens.c.revoked_at.is_(None)
                )
            )
        )
        .mappings()
        .first()
    )
    return row


async def any_of_kind(conn: AsyncConnection, kind: str) -> bool:
    q = (
        sa.select(sa.func.count())
        .select_from(tokens)
        .where(tokens.c.kind == kind, tokens.c.revoked_at.is_(None))
    )
    return (await conn.execute(q)).scalar_one() > 0


async def revoke_instance_tokens(conn: AsyncConnection, instance_id: str, now: float) -> None:
    await conn.execute(
        sa.update(tokens)
        .where(tokens.c.instance_id == instance_id, tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
