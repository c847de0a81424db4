"""An instance's provisioning record: which step its backend is at, the last error,
how many tries, when the next one is due, and which server is working on it."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.domain.instances import InstanceState
from corral.domain.provisioning import IN_PROGRESS, ProvisionState
from corral.store.schema import instances


async def begin(conn: AsyncConnection, instance_id: str, server_id: str, now: float) -> int:
    """A server starts a try (connecting); returns which try this is."""
    row = (
        await conn.execute(
            sa.update(instances)
            .where(instances.c.id == instance_id)
            .values(
                provision_state=ProvisionState.CONNECTING,
                provision_attempts=instances.c.provision_attempts + 1,
                provision_next_at=None,
                provision_updated_at=now,
                provision_server=server_id,
            )
            .returning(instances.c.provision_attempts)
        )
    ).first()
    return int(row[0]) if row else 0


async def step(
    conn: AsyncConnection, instance_id: str, state: ProvisionState, server_id: str, now: float
) -> None:
    """The backend moved on (connecting -> installing -> starting); only while this
    server still owns the try."""
    await conn.execute(
        sa.update(instances)
        .where(
            instances.c.id == instance_id,
            instances.c.provision_server == server_id,
            instances.c.provision_state.in_([s.value for s in IN_PROGRESS]),
        )
        .values(provision_state=state, provision_updated_at=now)
    )


async def started(conn: AsyncConnection, instance_id: str, ref: str, now: float) -> str:
    """Its agent was started: wait for it to register (or it already did)."""
    row = (
        await conn.execute(sa.select(instances.c.state).where(instances.c.id == instance_id))
    ).first()
    state = (
        ProvisionState.STARTED
        if row is not None and row[0] == InstanceState.PENDING
        else ProvisionState.READY
    )
    await conn.execute(
        sa.update(instances)
        .where(instances.c.id == instance_id)
        .values(
            provision_state=state,
            provision_updated_at=now,
            backend_ref=ref,
            **({"provision_error": None} if state is ProvisionState.READY else {}),
        )
    )
    return state


async def ready(conn: AsyncConnection, instance_id: str, now: float) -> None:
    await conn.execute(
        sa.update(instances)
        .where(instances.c.id == instance_id)
        .values(
            provision_state=ProvisionState.READY,
            provision_error=None,
            provision_next_at=None,
            provision_updated_at=now,
        )
    )


async def failed(
    conn: AsyncConnection,
    instance_id: str,
    state: ProvisionState,
    error: str,
    next_at: float | None,
    now: float,
) -> None:
    await conn.execute(
        sa.update(instances)
        .where(instances.c.id == instance_id)
        .values(
            provision_state=state,
            provision_error=error[:4000],
            provision_next_at=next_at,
            provision_updated_at=now,
        )
    )


async def stop_failed(
    conn: AsyncConnection, instance_id: str, error: str, failures: int, next_at: float, now: float
) -> None:
    """Stopping its agent failed (`failures` times in a row); retried at next_at."""
    await conn.execute(
        sa.update(instances)
        .where(instances.c.id == instance_id)
        .values(
            provision_state=ProvisionState.STOP_FAILED,
            provision_error=error[:4000],
            provision_attempts=failures,
            provision_next_at=next_at,
            provision_updated_at=now,
        )
    )


async def rearm(conn: AsyncConnection, fleet: str) -> list[str]:
    """A person re-applied the fleet: pending instances that failed or are backing
    off are tried again at once, with a fresh count."""
    rows = (
        await conn.execute(
            sa.update(instances)
            .where(
                instances.c.fleet == fleet,
                instances.c.state == InstanceState.PENDING,
                instances.c.provision_state.in_([ProvisionState.FAILED, ProvisionState.BACKOFF]),
            )
            .values(provision_state=None, provision_attempts=0, provision_next_at=None)
            .returning(instances.c.id)
        )
    ).all()
    return [r[0] for r in rows]
