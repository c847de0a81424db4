"""What the metrics endpoint and the dashboard's charts read from the database.

Gauges are computed here at scrape time, from the shared database, so every server
of a multi-server deployment reports the same fleet-wide figures."""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.domain.instances import InstanceState
from corral.domain.reconcile import ComponentState
from corral.store.objects import PRESENT
from corral.store.schema import (
    instance_components,
    instances,
    job_attempts,
    jobs,
    objects,
    replicas,
)


@dataclass
class Snapshot:
    jobs: dict[tuple[str, str], int] = field(default_factory=dict)  # (state, fleet) -> n
    agents: dict[tuple[str, bool], int] = field(default_factory=dict)  # (state, lost) -> n
    install_orders: dict[str, int] = field(default_factory=dict)  # component -> orders
    install_failures: dict[str, int] = field(default_factory=dict)  # component -> failed
    replicated_bytes: int = 0
    offloaded_bytes: int = 0
    attempts: dict[str, int] = field(default_factory=dict)  # state -> n


async def snapshot(conn: AsyncConnection) -> Snapshot:
    s = Snapshot()
    q = sa.select(jobs.c.state, jobs.c.fleet, sa.func.count()).group_by(jobs.c.state, jobs.c.fleet)
    for state, fleet, n in await conn.execute(q):
        s.jobs[(state, fleet or "")] = n
    q = (
        sa.select(instances.c.state, instances.c.lost_at.is_not(None), sa.func.count())
        .where(instances.c.state != InstanceState.TERMINATED)
        .group_by(instances.c.state, instances.c.lost_at.is_not(None))
    )
    for state, lost, n in await conn.execute(q):
        key = (state, bool(lost))
        s.agents[key] = s.agents.get(key, 0) + n
    ic = instance_components
    q = sa.select(
        ic.c.component,
        sa.func.coalesce(sa.func.sum(ic.c.orders_total), 0),
        sa.func.sum(sa.case((ic.c.state == ComponentState.INSTALL_FAILED, 1), else_=0)),
    ).group_by(ic.c.component)
    for component, orders, failed in await conn.execute(q):
        s.install_orders[component] = int(orders or 0)
        s.install_failures[component] = int(failed or 0)
    q = (
        sa.select(sa.func.coalesce(sa.func.sum(objects.c.size), 0))
        .select_from(replicas.join(objects, objects.c.sha256 == replicas.c.sha256))
        .where(replicas.c.delivered_at.is_not(None), replicas.c.state == PRESENT)
    )
    s.replicated_bytes = int((await conn.execute(q)).scalar() or 0)
    q = sa.select(sa.func.coalesce(sa.func.sum(objects.c.size), 0)).where(
        objects.c.durable_url.is_not(None)
    )
    s.offloaded_bytes = int((await conn.execute(q)).scalar() or 0)
    q = sa.select(job_attempts.c.state, sa.func.count()).group_by(job_attempts.c.state)
    s.attempts = {row[0]: row[1] for row in await conn.execute(q)}
    return s


async def job_times(conn: AsyncConnection, since: float) -> list[tuple]:
    """(created_at, started_at, finished_at) of every job alive at some point after
    `since`: what the queued/running/throughput charts are drawn from."""
    q = sa.select(jobs.c.created_at, jobs.c.started_at, jobs.c.finished_at).where(
        sa.or_(jobs.c.finished_at.is_(None), jobs.c.finished_at >= since)
    )
    return [tuple(r) for r in await conn.execute(q)]
