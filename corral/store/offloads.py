"""Offloads: copies of stranded objects to a fleet's durable store.

When an instance is leaving and no running instance can take an object only it
holds, and its fleet has a durable store, the drainer orders the instance to upload
that object there (pending). The agent reports the upload (uploaded, or failed); a
server then checks the bucket itself, and only then records the durable copy on the
object and drops the order. Until that record exists the object counts as at risk,
so the instance cannot retire on the agent's word alone.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.api import ObjectError
from corral.domain.drain import ObjectState
from corral.store import events
from corral.store.db import Database
from corral.store.schema import instances, objects, offloads

PENDING, UPLOADED, FAILED = "pending", "uploaded", "failed"
RETRY_AFTER = 10.0


async def order(
    conn: AsyncConnection, shas: list[str], fleet: str, instance_id: str, now: float
) -> int:
    """Order `instance_id` to upload each of `shas` to `fleet`'s durable store, unless
    an order is already under way or failed in the last few seconds. Returns how
    many orders are new."""
    existing = {
        r.sha256: r
        for r in (
            await conn.execute(
                sa.select(offloads.c.sha256, offloads.c.state, offloads.c.updated_at).where(
                    offloads.c.sha256.in_(shas)
                )
            )
        ).all()
    }
    placed = 0
    for sha in shas:
        row = existing.get(sha)
        values = dict(
            fleet=fleet,
            instance_id=instance_id,
            state=PENDING,
            created_at=now,
            delivered_at=None,
            updated_at=now,
            reason=None,
        )
        if row is None:
            await conn.execute(sa.insert(offloads).values(sha256=sha, **values))
        elif row.state == FAILED and row.updated_at <= now - RETRY_AFTER:
            await conn.execute(sa.update(offloads).where(offloads.c.sha256 == sha).values(**values))
        else:
            continue
        placed += 1
    return placed


_UNDELIVERED = (
    sa.select(offloads.c.sha256, offloads.c.fleet, objects.c.size)
    .select_from(offloads.join(objects, objects.c.sha256 == offloads.c.sha256))
    .where(
        offloads.c.instance_id == sa.bindparam("o_instance_id"),
        offloads.c.state == PENDING,
        offloads.c.delivered_at.is_(None),
    )
)


async def deliver(conn: AsyncConnection, instance_id: str, now: float):
    """The orders not yet handed to `instance_id`, marked as handed over now.
    Rows carry the object's size and the fleet whose store takes it."""
    rows = (await conn.execute(_UNDELIVERED, {"o_instance_id": instance_id})).all()
    if rows:
        await conn.execute(
            sa.update(offloads)
            .where(offloads.c.sha256.in_([r.sha256 for r in rows]))
            .values(delivered_at=now)
        )
    return rows


async def report(
    conn: AsyncConnection,
    instance_id: str,
    uploaded: list[str],
    errors: list[ObjectError],
    now: float,
) -> bool:
    """What the agent says of its uploads. True if some now await confirmation."""
    mine = offloads.c.instance_id == instance_id
    if uploaded:
        await conn.execute(
            sa.update(offloads)
            .where(mine, offloads.c.state == PENDING, offloads.c.sha256.in_(uploaded))
            .values(state=UPLOADED, updated_at=now)
        )
    for err in errors:
        r = await conn.execute(
            sa.update(offloads)
            .where(mine, offloads.c.state == PENDING, offloads.c.sha256 == err.sha256)
            .values(state=FAILED, updated_at=now, reason=err.error[:1000])
        )
        if r.rowcount:
            await _warn(conn, err.sha256, instance_id, err.error, now)
    return bool(uploaded)


async def claim_uploaded(conn: AsyncConnection, db: Database):
    q = db.claim(
        sa.select(offloads.c.sha256, offloads.c.fleet, offloads.c.instance_id, objects.c.size)
        .select_from(offloads.join(objects, objects.c.sha256 == offloads.c.sha256))
        .where(offloads.c.state == UPLOADED)
    )
    return (await conn.execute(q)).all()


async def confirmed(conn: AsyncConnection, sha256: str, fleet: str, url: str, now: float) -> None:
    """The bucket holds it: the object is safe without any instance."""
    r = await conn.execute(
        sa.delete(offloads).where(offloads.c.sha256 == sha256, offloads.c.state == UPLOADED)
    )
    if not r.rowcount:
        return  # another server confirmed it first
    await conn.execute(
        sa.update(objects)
        .where(objects.c.sha256 == sha256)
        .values(durable_url=url, durable_fleet=fleet, state=ObjectState.LIVE, updated_at=now)
    )
    await events.record(
        conn,
        now,
        "info",
        "object.offloaded",
        f"object {sha256[:12]}… is in fleet {fleet}'s durable store ({url})",
    )


async def rejected(
    conn: AsyncConnection, sha256: str, instance_id: str, why: str, now: float
) -> None:
    r = await conn.execute(
        sa.update(offloads)
        .where(offloads.c.sha256 == sha256, offloads.c.state == UPLOADED)
        .values(state=FAILED, updated_at=now, reason=why[:1000])
    )
    if r.rowcount:
        await _warn(conn, sha256, instance_id, why, now)


async def expire(conn: AsyncConnection, now: float, timeout: float) -> int:
    """Orders handed over long ago and never reported fail (and are placed again)."""
    r = await conn.execute(
        sa.update(offloads)
        .where(
            offloads.c.state == PENDING,
            offloads.c.delivered_at.is_not(None),
            offloads.c.delivered_at < now - timeout,
        )
        .values(state=FAILED, updated_at=now, reason="upload took too long")
    )
    return r.rowcount


async def _warn(conn: AsyncConnection, sha256: str, instance_id: str, why: str, now: float) -> None:
    name = (
        await conn.execute(sa.select(instances.c.name).where(instances.c.id == instance_id))
    ).scalar()
    await events.record(
        conn,
        now,
        "warning",
        "object.offload_failed",
        f"uploading object {sha256[:12]}… from {name} to the durable store "
        f"failed (retried in {RETRY_AFTER:g}s): {why[:500]}",
        instance_id=instance_id,
    )
