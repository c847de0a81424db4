"""The event log: what the control plane decided and why, for people to read."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.store.schema import events

LEVELS = ("debug", "info", "warning", "error")
log = logging.getLogger("corral.events")
_PY_LEVEL = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


async def record(
    conn: AsyncConnection,
    now: float,
    level: str,
    kind: str,
    message: str,
    *,
    job_id: int | None = None,
    instance_id: str | None = None,
    server_id: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    if level not in LEVELS:
        raise ValueError(f"unknown event level {level!r}")
    log.log(_PY_LEVEL[level], "%s: %s", kind, message)
    await conn.execute(
        sa.insert(events).values(
            ts=now,
            level=level,
            kind=kind,
            message=message,
            job_id=job_id,
            instance_id=instance_id,
            server_id=server_id,
            data=data,
        )
    )


async def list_events(
    conn: AsyncConnection,
    *,
    min_level: str = "debug",
    after_id: int = 0,
    limit: int = 100,
    kind: str | None = None,
    job_id: int | None = None,
    instance_id: str | None = None,
    newest: bool = False,
):
    if min_level not in LEVELS:
        raise ValueError(f"unknown event level {min_level!r}")
    allowed = LEVELS[LEVELS.index(min_level) :]
    q = sa.select(events).where(events.c.level.in_(allowed), events.c.id > after_id)
    if kind is not None:
        q = q.where(events.c.kind == kind)
    if job_id is not None:
        q = q.where(events.c.job_id == job_id)
    if instance_id is not None:
        q = q.where(events.c.instance_id == instance_id)
    if newest:
        rows = (await conn.execute(q.order_by(events.c.id.desc()).limit(limit))).mappings().all()
        return list(reversed(rows))
    return (await conn.execute(q.order_by(events.c.id).limit(limit))).mappings().all()


async def last_of_kind(conn: AsyncConnection, kind: str) -> sa.RowMapping | None:
    """The newest event of `kind` (its message and time), if any."""
    q = (
        sa.select(events.c.message, events.c.ts)
        .where(events.c.kind == kind)
        .order_by(events.c.id.desc())
        .limit(1)
    )
    return (await conn.execute(q)).mappings().first()
