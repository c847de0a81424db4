"""Reaper: instances that stopped heartbeating, attempts that never started or went
silent. Their attempts are revoked and the jobs requeued (or failed when out of
attempts). Nothing is reaped during the first grace period after this server starts,
so agents and runners that were cut off by a server restart have time to come back.

Silence the server could not observe is never an agent's: when no reaper round trip
to the database worked for a while (the database, or this server's event loop, was
unavailable), that gap, plus the time agents need to notice the server is back,
extends every deadline (`corral.domain.heartbeat.Observation`)."""

from __future__ import annotations

import logging

from corral.domain.heartbeat import (
    Observation,
    grace_period,
    is_silent_too_long,
    renewal_interval,
)
from corral.server import metrics
from corral.server.context import ServerContext
from corral.server.leases import current_pacing, flush_leases, instance_key
from corral.store import dispatch, events, instances
from corral.store import jobs as jobs_repo

log = logging.getLogger("corral.reaper")


def observation(ctx: ServerContext) -> Observation:
    """This server's record of when it could observe (a gap of two missed reaper
    ticks and more counts as an outage)."""
    if ctx.observation is None:
        ctx.observation = Observation(tolerance=2 * ctx.config.reaper_interval + 1.0)
    return ctx.observation


async def reap_once(ctx: ServerContext) -> bool:
    cfg = ctx.config
    # renewals this server heard are written before anything is judged
    await flush_leases(ctx)
    now = ctx.now()
    # leases ran on while no server was up to renew them: give agents one grace
    pace = await current_pacing(ctx)
    told = renewal_interval(pace.interval, pace.lease)
    obs = observation(ctx)
    if now - ctx.started_at < grace_period(told, cfg.agent_grace):
        # nothing is reaped yet, but what this server could observe counts from its
        # start: an outage in its first seconds extends deadlines like any other
        await ctx.db.query(instances.count_live)
        obs.observed(now, ctx.now())
        return False
    gaps = obs.gaps(now)
    extra = obs.extension(now)  # the most any deadline is extended by: a coarse cutoff

    def overdue(last_heard: float | None, grace: float) -> bool:
        return is_silent_too_long(last_heard, now, grace, gaps)

    changed: list[tuple[int, int, str | None]] = []
    lost_instances: list[str] = []
    touched: set[str] = set()  # instances an attempt was lost on: their agents must look

    async def lost(conn):
        for inst in await instances.find_lost(conn, ctx.db, now, now - cfg.agent_grace):
            # its own grace (derived from the interval it was told: its lease), extended
            # by any silence this server could not observe
            if ctx.leases.is_pending(inst["id"]):
                continue  # renewed here since the flush above: heard, not yet written
            lease, heard = inst["lease_until"], inst["last_heartbeat_at"]
            if not overdue(heard, lease - heard if lease is not None else cfg.agent_grace):
                continue
            if not await instances.mark_lost(conn, inst["id"], now):
                continue
            silent = now - inst["last_heartbeat_at"]
            told = inst["heartbeat_interval"]
            every = f" (told to heartbeat every {told:g}s)" if told else ""
            await events.record(
                conn,
                now,
                "warning",
                "instance.lost",
                f"instance {inst['name']} ({inst['id']}) lost: no heartbeat for "
                f"{silent:.0f}s{every}",
                instance_id=inst["id"],
            )
            lost_instances.append(inst["id"])
            changed.extend(
                await dispatch.lose_all_on(
                    conn, inst["id"], f"instance {inst['name']} stopped heartbeating", now
                )
            )

    async def unstarted(conn):
        for a in await dispatch.claim_unstarted(conn, ctx.db, now - cfg.start_timeout - extra):
            if not overdue(a["handed_out_at"], cfg.start_timeout):
                continue
            state = await jobs_repo.lose_attempt(
                conn,
                a["job_id"],
                a["number"],
                f"did not start within {cfg.start_timeout:g}s on {a['instance_id']}",
                now,
                instance_id=a["instance_id"],
            )
            changed.append((a["job_id"], a["number"], state))
            touched.add(a["instance_id"])

    async def silent(conn):
        for a in await dispatch.claim_silent(conn, ctx.db, now - cfg.attempt_grace - extra):
            if not overdue(a["updated_at"], cfg.attempt_grace):
                continue
            state = await jobs_repo.lose_attempt(
                conn,
                a["job_id"],
                a["number"],
                f"runner silent for over {cfg.attempt_grace:g}s on {a['instance_id']}",
                now,
                instance_id=a["instance_id"],
            )
            changed.append((a["job_id"], a["number"], state))
            touched.add(a["instance_id"])

    for step in (lost, unstarted, silent):
        await ctx.db.transact(step)
    gap = obs.observed(now, ctx.now())
    if gap is not None:
        unseen = gap[1] - gap[0]
        message = (
            f"this server could not observe its agents for {unseen:.0f}s (its database "
            "or event loop was unavailable); their deadlines are extended by that"
        )
        log.warning("%s", message)
        await ctx.db.transact(
            events.record, now, "warning", "server.unobserved", message, server_id=ctx.server_id
        )
    metrics.ATTEMPTS_FINISHED.labels("lost").inc(sum(1 for *_, state in changed if state))
    for job_id, _n, _state in changed:
        ctx.notifier.wake(("job", job_id))
    for instance_id in [*lost_instances, *sorted(touched)]:
        ctx.notifier.wake(instance_key(instance_id))
    if changed:
        ctx.notifier.wake("dispatch")
    return False
