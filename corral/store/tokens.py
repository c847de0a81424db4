"""Bearer credentials (admin, join, per-instance agent), stored only as hashes."""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.domain.instances import InstanceState
from corral.domain.tokens import hash_secret, well_formed
from corral.store.schema import instances, tokens

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
    _, secret = await _insert(conn, kind, now, instance_id=instance_id, note=note, secret=secret)
    return secret


async def _insert(
    conn: AsyncConnection,
    kind: str,
    now: float,
    *,
    instance_id: str | None = None,
    note: str | None = None,
    secret: str | None = None,
) -> tuple[str, str]:
    secret = secret or new_secret({ADMIN: "cra", JOIN: "crj", AGENT: "crg"}[kind])
    token_id = secrets.token_hex(8)
    await conn.execute(
        sa.insert(tokens).values(
            id=token_id,
            kind=kind,
            token_hash=hash_secret(secret),
            instance_id=instance_id,
            created_at=now,
            note=note,
        )
    )
    return token_id, secret


async def rotate(conn: AsyncConnection, kind: str, now: float, note: str) -> tuple[str, str, int]:
    """Revoke every live token of `kind` (admin or join) and mint one new one, in one
    transaction; return (id, plaintext, how many were revoked)."""
    if kind not in (ADMIN, JOIN):
        raise ValueError(f"only admin and join tokens are rotated, not {kind!r}")
    result = await conn.execute(
        sa.update(tokens)
        .where(tokens.c.kind == kind, tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    token_id, secret = await _insert(conn, kind, now, note=note)
    return token_id, secret, result.rowcount


async def list_tokens(conn: AsyncConnection) -> list[sa.RowMapping]:
    """Every credential, oldest first, without its hash."""
    cols = [c for c in tokens.c if c.name != "token_hash"]
    q = sa.select(*cols).order_by(tokens.c.created_at, tokens.c.id)
    return list((await conn.execute(q)).mappings().all())


async def get_token(conn: AsyncConnection, token_id: str) -> sa.RowMapping | None:
    cols = [c for c in tokens.c if c.name != "token_hash"]
    q = sa.select(*cols).where(tokens.c.id == token_id)
    return (await conn.execute(q)).mappings().first()


class LastAdmin(Exception):
    """Revoking this token would leave no admin token at all."""


async def revoke(conn: AsyncConnection, token_id: str, now: float) -> sa.RowMapping | None:
    """Revoke one credential at once; None if there is no such token. The last live
    admin token is not revoked (nobody could manage the server): rotate it instead."""
    row = await get_token(conn, token_id)
    if row is None:
        return None
    if row["revoked_at"] is None:
        if row["kind"] == ADMIN:
            q = (
                sa.select(sa.func.count())
                .select_from(tokens)
                .where(tokens.c.kind == ADMIN, tokens.c.revoked_at.is_(None))
            )
            if (await conn.execute(q)).scalar_one() <= 1:
                raise LastAdmin(token_id)
        await conn.execute(
            sa.update(tokens)
            .where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
    return await get_token(conn, token_id)


async def touch(conn: AsyncConnection, token_id: str, now: float) -> None:
    """Record a use (callers do this at most about once a minute per token)."""
    await conn.execute(sa.update(tokens).where(tokens.c.id == token_id).values(last_used_at=now))


_TOUCH = (
    sa.update(tokens)
    .where(tokens.c.id == sa.bindparam("t_id"))
    .values(last_used_at=sa.bindparam("t_at"))
)


async def touch_many(conn: AsyncConnection, uses: dict[str, float]) -> None:
    """Record the last use of many tokens in one statement (executemany)."""
    if uses:
        await conn.execute(_TOUCH, [{"t_id": k, "t_at": at} for k, at in uses.items()])


_LOOKUP = sa.select(tokens).where(
    tokens.c.token_hash == sa.bindparam("t_hash"), tokens.c.revoked_at.is_(None)
)


async def lookup(conn: AsyncConnection, secret: str | None) -> sa.RowMapping | None:
    """The live credential with this secret (every authenticated request asks)."""
    if not secret or not well_formed(secret.split("_", 1)[-1]):
        return None
    return (await conn.execute(_LOOKUP, {"t_hash": hash_secret(secret)})).mappings().first()


async def why_refused(conn: AsyncConnection, secret: str | None) -> str:
    """Why `secret` is not a live credential, for the 401 answer."""
    if not secret or not well_formed(secret.split("_", 1)[-1]):
        return "unknown or revoked token"
    row = (
        await conn.execute(
            sa.select(tokens.c.kind, tokens.c.instance_id, tokens.c.revoked_at).where(
                tokens.c.token_hash == hash_secret(secret)
            )
        )
    ).first()
    if row is None or row.revoked_at is None:
        return "unknown or revoked token"
    if row.kind == AGENT and row.instance_id:
        state = (
            await conn.execute(
                sa.select(instances.c.state).where(instances.c.id == row.instance_id)
            )
        ).scalar()
        if state in (InstanceState.RETIRED, InstanceState.TERMINATED):
            return f"instance {row.instance_id} is {state}: its credential was revoked"
        return f"the credential of instance {row.instance_id} was revoked"
    return f"this {row.kind} token was revoked"


async def any_of_kind(conn: AsyncConnection, kind: str) -> bool:
    q = (
        sa.select(sa.func.count())
        .select_from(tokens)
        .where(tokens.c.kind == kind, tokens.c.revoked_at.is_(None))
    )
    return (await conn.execute(q)).scalar_one() > 0


async def revoke_instance_tokens(conn: AsyncConnection, instance_id: str, now: float) -> None:
    """A retired (or terminated) instance's credential works no more."""
    await conn.execute(
        sa.update(tokens)
        .where(tokens.c.instance_id == instance_id, tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
