"""Every server registers itself so mixed builds on one database are visible."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.store.schema import servers


async def register_server(
    conn: AsyncConnection,
    *,
    id: str,
    build_version: str,
    host: str,
    pid: int,
    url: str | None,
    now: float,
) -> None:
    await conn.execute(
        sa.insert(servers).values(
            id=id,
            build_version=build_version,
            host=host,
            pid=pid,
            url=url,
            started_at=now,
            last_seen_at=now,
        )
    )


async def touch_server(conn: AsyncConnection, server_id: str, now: float) -> None:
    await conn.execute(sa.update(servers).where(servers.c.id == server_id).values(last_seen_at=now))


async def stop_server(conn: AsyncConnection, server_id: str, now: float) -> None:
    await conn.execute(
        sa.update(servers).where(servers.c.id == server_id).values(stopped_at=now, last_seen_at=now)
    )


async def list_servers(conn: AsyncConnection, *, include_stopped_since: float | None = None):
    q = sa.select(servers).order_by(servers.c.started_at)
    if include_stopped_since is not None:
        q = q.where(
            sa.or_(servers.c.stopped_at.is_(None), servers.c.stopped_at >= include_stopped_since)
        )
    return (await conn.execute(q)).mappings().all()
