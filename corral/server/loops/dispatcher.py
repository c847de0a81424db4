"""Dispatcher: lock queued jobs onto instances with room (several servers at once)."""

from __future__ import annotations

import time

from corral.server import metrics
from corral.server.context import ServerContext
from corral.server.leases import deliveries_key, instance_key
from corral.store import dispatch

BATCH = 200
EXPLAIN_EVERY = 1.0  # seconds between passes that also explain jobs no instance can hold


async def dispatch_once(ctx: ServerContext) -> bool:
    if ctx.stopping:
        return False
    t0 = time.perf_counter()
    now = ctx.now()
    explain = not now - EXPLAIN_EVERY < ctx.explained_at <= now
    placements = await ctx.db.transact(
        dispatch.lock_jobs, ctx.db, now, batch=BATCH, explain=explain
    )
    if explain:
        ctx.explained_at = now
    metrics.DISPATCH_PASS.observe(time.perf_counter() - t0)
    metrics.PLACEMENTS.inc(len(placements))
    for p in placements:
        ctx.notifier.wake(
            instance_key(p.instance_id), deliveries_key(p.instance_id), ("job", p.job_id)
        )
    return len(placements) == BATCH
