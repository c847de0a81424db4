"""What the dashboard's instance page reads: attempts placed on an instance, the
objects it holds, its components."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.store.schema import instance_components, job_attempts, jobs, objects, replicas


async def attempts_on(conn: AsyncConnection, instance_id: str, limit: int = 50):
    q = (
        sa.select(job_attempts, jobs.c.name.label("job_name"), jobs.c.command)
        .select_from(job_attempts.join(jobs, jobs.c.id == job_attempts.c.job_id))
        .where(job_attempts.c.instance_id == instance_id)
        .order_by(job_attempts.c.created_at.desc())
        .limit(limit)
    )
    return (await conn.execute(q)).mappings().all()


async def objects_held(conn: AsyncConnection, instance_id: str, limit: int = 200):
    q = (
        sa.select(
            replicas.c.sha256,
            replicas.c.state,
            replicas.c.updated_at,
            objects.c.size,
            objects.c.name,
            objects.c.origin,
        )
        .select_from(replicas.join(objects, objects.c.sha256 == replicas.c.sha256))
        .where(replicas.c.instance_id == instance_id)
        .order_by(replicas.c.updated_at.desc())
        .limit(limit)
    )
    return (await conn.execute(q)).mappings().all()


async def components_of(conn: AsyncConnection, instance_id: str):
    q = (
        sa.select(instance_components)
        .where(instance_components.c.instance_id == instance_id)
        .order_by(instance_components.c.component)
    )
    return (await conn.execute(q)).mappings().all()
