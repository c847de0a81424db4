"""Read-only queries that check the invariants from the database's side (the simulator
and tests use them; nothing here writes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.domain.drain import ReplicaState
from corral.domain.instances import InstanceState
from corral.domain.jobs import LIVE_ATTEMPT_STATES
from corral.store.schema import instances, job_attempts, job_outputs, jobs, replicas


async def jobs_with_several_live_attempts(conn: AsyncConnection) -> list[tuple[int, int]]:
    """(job id, live attempts) for every job with more than one live attempt (I1)."""
    rows = (
        await conn.execute(
            sa.select(job_attempts.c.job_id, sa.func.count())
            .where(job_attempts.c.state.in_(sorted(LIVE_ATTEMPT_STATES)))
            .group_by(job_attempts.c.job_id)
            .having(sa.func.count() > 1)
        )
    ).all()
    return [(int(j), int(n)) for j, n in rows]


async def placed_after_retirement(
    conn: AsyncConnection,
) -> tuple[list[tuple[int, int, str]], list[tuple[str, str]]]:
    """Attempts (job, number, instance) and replicas (sha256, instance) created on an
    instance after it retired (I3)."""
    retired = (
        sa.select(instances.c.id, instances.c.retired_at)
        .where(instances.c.retired_at.is_not(None))
        .subquery()
    )
    attempts = (
        await conn.execute(
            sa.select(job_attempts.c.job_id, job_attempts.c.number, retired.c.id)
            .join(retired, retired.c.id == job_attempts.c.instance_id)
            .where(job_attempts.c.created_at > retired.c.retired_at)
        )
    ).all()
    copies = (
        await conn.execute(
            sa.select(replicas.c.sha256, retired.c.id)
            .join(retired, retired.c.id == replicas.c.instance_id)
            .where(replicas.c.created_at > retired.c.retired_at)
        )
    ).all()
    return [(j, n, i) for j, n, i in attempts], [(s, i) for s, i in copies]


async def all_jobs(conn: AsyncConnection) -> Sequence[sa.RowMapping]:
    return (await conn.execute(sa.select(jobs))).mappings().all()


async def all_job_outputs(conn: AsyncConnection) -> Sequence[sa.RowMapping]:
    return (await conn.execute(sa.select(job_outputs))).mappings().all()


async def present_holders(conn: AsyncConnection) -> list[tuple[str, str]]:
    """(sha256, instance name) for every present replica on a running or draining
    instance."""
    rows: Sequence[Any] = (
        await conn.execute(
            sa.select(replicas.c.sha256, instances.c.name)
            .join(instances, instances.c.id == replicas.c.instance_id)
            .where(
                replicas.c.state == ReplicaState.PRESENT,
                instances.c.state.in_([InstanceState.RUNNING, InstanceState.DRAINING]),
            )
        )
    ).all()
    return [(s, n) for s, n in rows]
