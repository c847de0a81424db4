"""Fleet size: set a target, shrink through drain (idle instances and least unique data
first), and the autoscaler's tick (grow while jobs wait, shrink what sat idle, only
after several consecutive checks agree). Nothing here terminates anything: every
scale-down is a drain, which keeps every byte."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.domain.drain import ScaleVote, desired_size, retire_first, vote
from corral.domain.instances import InstanceState
from corral.domain.jobs import LIVE_ATTEMPT_STATES, JobState
from corral.store import dispatch, drain, events, fleets
from corral.store.db import Database
from corral.store.schema import fleet_scaling, job_attempts, jobs
from corral.store.schema import fleets as fleets_t

WAITING_AFTER = 2.0  # a job queued this long found no room
ACTIVE = [InstanceState.PENDING, InstanceState.RUNNING]


async def set_target(conn: AsyncConnection, name: str, size: int, now: float, why: str) -> None:
    """Set a fleet's target size; shrinking drains the excess instances at once."""
    await conn.execute(
        sa.update(fleets_t).where(fleets_t.c.name == name).values(target_size=size, updated_at=now)
    )
    active = await fleets.fleet_instances(
        conn, name, [InstanceState.PENDING, InstanceState.RUNNING]
    )
    await events.record(
        conn,
        now,
        "info",
        "fleet.scaled",
        f"fleet {name}: target size {size} ({why}); {len(active)} active",
    )
    if size < len(active):
        await shrink(conn, name, len(active) - size, now, why)


async def shrink(
    conn: AsyncConnection,
    name: str,
    count: int,
    now: float,
    why: str,
    candidates: list[str] | None = None,
) -> list[str]:
    """Drain `count` instances of the fleet: idle ones before busy ones, and among
    those the ones holding the least unique data."""
    active = await fleets.fleet_instances(
        conn, name, [InstanceState.PENDING, InstanceState.RUNNING]
    )
    ids = [m["id"] for m in active if candidates is None or m["id"] in candidates]
    unique = await drain.unique_bytes(conn, ids)
    busy = {i for i in ids if await dispatch.live_attempts_on(conn, i)}
    # busy instances sort after idle ones, whatever their data
    weights = {i: unique[i] + (2**62 if i in busy else 0) for i in ids}
    chosen = retire_first(weights, count)
    names = {m["id"]: m["name"] for m in active}
    for iid in chosen:
        await drain.request_drain(conn, iid, False, now)
    if chosen:
        await events.record(
            conn,
            now,
            "info",
            "fleet.shrinking",
            f"fleet {name}: draining {', '.join(names[i] for i in chosen)} "
            f"({why}; idle and least unique data first)",
        )
    return chosen


async def autoscale(
    conn: AsyncConnection, db: Database, backends: list[str], now: float, checks: int
) -> None:
    """One autoscaler check of every fleet whose backend this server has."""
    all_fleets = await fleets.list_fleets(conn)
    for f in await fleets.claim_fleets(conn, db, backends):
        members = await fleets.fleet_instances(conn, f["name"], fleets.LIVE)
        active = [
            m for m in members if m["state"] in (InstanceState.PENDING, InstanceState.RUNNING)
        ]
        running = [m for m in active if m["state"] == InstanceState.RUNNING]
        shape = f["cpus"] or (sum(m["cpus"] for m in running) / len(running) if running else 1.0)
        eligible = jobs.c.fleet == f["name"]
        if f["name"] == "default" or len(all_fleets) == 1:
            eligible = sa.or_(eligible, jobs.c.fleet.is_(None))
        waiting = (
            await conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(jobs.c.cpus), 0)).where(
                    jobs.c.state == JobState.QUEUED,
                    jobs.c.created_at < now - WAITING_AFTER,
                    jobs.c.cpus <= shape,
                    eligible,
                )
            )
        ).scalar_one()
        idle = []
        for m in running:
            last = (
                await conn.execute(
                    sa.select(
                        sa.func.max(sa.func.coalesce(job_attempts.c.finished_at, now)),
                        sa.func.count(),
                    ).where(
                        job_attempts.c.instance_id == m["id"],
                        sa.or_(
                            job_attempts.c.state.in_([s.value for s in LIVE_ATTEMPT_STATES]),
                            job_attempts.c.finished_at.is_not(None),
                        ),
                    )
                )
            ).first()
            busy_until = last[0] if last and last[1] else m["registered_at"] or now
            live = (
                await conn.execute(
                    sa.select(sa.func.count()).where(
                        job_attempts.c.instance_id == m["id"],
                        job_attempts.c.state.in_([s.value for s in LIVE_ATTEMPT_STATES]),
                    )
                )
            ).scalar_one()
            if not live and busy_until < now - f["idle_timeout"]:
                idle.append(m["id"])
        size, direction = desired_size(
            active=len(active),
            minimum=f["min_size"],
            maximum=f["max_size"],
            waiting_cpus=float(waiting),
            instance_cpus=shape,
            idle=len(idle),
        )
        row = (
            (await conn.execute(sa.select(fleet_scaling).where(fleet_scaling.c.fleet == f["name"])))
            .mappings()
            .first()
        )
        v = vote(ScaleVote(row["direction"], row["count"]) if row else ScaleVote(None), direction)
        if direction is not None and v.count >= checks:
            why = (
                f"autoscaler: {waiting:g} cpus of jobs waiting"
                if direction == "up"
                else f"autoscaler: {len(idle)} instance(s) idle over {f['idle_timeout']:g}s"
            )
            await conn.execute(
                sa.update(fleets_t)
                .where(fleets_t.c.name == f["name"])
                .values(target_size=size, updated_at=now)
            )
            if direction == "down":
                await shrink(conn, f["name"], len(active) - size, now, why, candidates=idle)
            else:
                from corral.store import events

                await events.record(
                    conn,
                    now,
                    "info",
                    "fleet.scaled",
                    f"fleet {f['name']}: {len(active)} -> {size} ({why})",
                )
            v = ScaleVote(None)
        values = dict(direction=v.direction, count=v.count, updated_at=now)
        if row:
            await conn.execute(
                sa.update(fleet_scaling).where(fleet_scaling.c.fleet == f["name"]).values(**values)
            )
        else:
            await conn.execute(sa.insert(fleet_scaling).values(fleet=f["name"], **values))
