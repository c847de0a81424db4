"""Autoscaler: grow fleets while jobs wait, retire idle instances after the idle
timeout; act only after several consecutive checks agree. It never terminates
anything itself: shrinking goes through drain, which keeps every byte."""

from __future__ import annotations

import sqlalchemy as sa

from corral.domain.drain import ScaleVote, desired_size, vote
from corral.domain.instances import InstanceState
from corral.domain.jobs import LIVE_ATTEMPT_STATES, JobState
from corral.server.context import ServerContext
from corral.store import fleets
from corral.store.schema import fleet_scaling, job_attempts, jobs

WAITING_AFTER = 2.0  # a job queued this long found no room


async def autoscale_once(ctx: ServerContext) -> bool:
    if not ctx.backends or ctx.extras.get("stopping"):
        return False
    now = ctx.now()
    checks = ctx.config.autoscale_checks

    async def tick(conn):  # noqa: ANN001
        all_fleets = await fleets.list_fleets(conn)
        for f in await fleets.claim_fleets(conn, ctx.db, list(ctx.backends)):
            members = await fleets.fleet_instances(conn, f["name"], fleets.LIVE)
            active = [m for m in members
                      if m["state"] in (InstanceState.PENDING, InstanceState.RUNNING)]
            running = [m for m in active if m["state"] == InstanceState.RUNNING]
            shape = f["cpus"] or (sum(m["cpus"] for m in running) / len(running)
                                  if running else 1.0)
            eligible = jobs.c.fleet == f["name"]
            if f["name"] == "default" or len(all_fleets) == 1:
                eligible = sa.or_(eligible, jobs.c.fleet.is_(None))
            waiting = (await conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(jobs.c.cpus), 0)).where(
                    jobs.c.state == JobState.QUEUED, jobs.c.created_at < now - WAITING_AFTER,
                    jobs.c.cpus <= shape, eligible))).scalar_one()
            idle = []
            for m in running:
                last = (await conn.execute(
                    sa.select(sa.func.max(sa.func.coalesce(job_attempts.c.finished_at, now)),
                              sa.func.count()).where(
                        job_attempts.c.instance_id == m["id"],
                        sa.or_(job_attempts.c.state.in_([s.value for s in LIVE_ATTEMPT_STATES]),
                               job_attempts.c.finished_at.is_not(None))))).first()
                busy_until = last[0] if last and last[1] else m["registered_at"] or now
                live = (await conn.execute(sa.select(sa.func.count()).where(
                    job_attempts.c.instance_id == m["id"],
                    job_attempts.c.state.in_([s.value for s in LIVE_ATTEMPT_STATES])))).scalar_one()
                if not live and busy_until < now - f["idle_timeout"]:
                    idle.append(m["id"])
            size, direction = desired_size(
                active=len(active), minimum=f["min_size"], maximum=f["max_size"],
                waiting_cpus=float(waiting), instance_cpus=shape, idle=len(idle))
            row = (await conn.execute(sa.select(fleet_scaling).where(
                fleet_scaling.c.fleet == f["name"]))).mappings().first()
            v = vote(ScaleVote(row["direction"], row["count"]) if row else ScaleVote(None),
                     direction)
            if direction is not None and v.count >= checks:
                why = (f"autoscaler: {waiting:g} cpus of jobs waiting" if direction == "up"
                       else f"autoscaler: {len(idle)} instance(s) idle over "
                            f"{f['idle_timeout']:g}s")
                await conn.execute(sa.update(fleets.fleets).where(
                    fleets.fleets.c.name == f["name"]).values(target_size=size, updated_at=now))
                if direction == "down":
                    await fleets.shrink(conn, f["name"], len(active) - size, now, why,
                                        candidates=idle)
                else:
                    from corral.store import events

                    await events.record(conn, now, "info", "fleet.scaled",
                                        f"fleet {f['name']}: {len(active)} -> {size} ({why})")
                v = ScaleVote(None)
            values = dict(direction=v.direction, count=v.count, updated_at=now)
            if row:
                await conn.execute(sa.update(fleet_scaling).where(
                    fleet_scaling.c.fleet == f["name"]).values(**values))
            else:
                await conn.execute(sa.insert(fleet_scaling).values(fleet=f["name"], **values))

    await ctx.db.transact(tick)
    ctx.notifier.wake("fleets", "drain")
    return False
