"""Dispatcher: lock queued jobs onto instances with room (several servers at once)."""

from __future__ import annotations

import time

from corral.server import metrics
from corral.server.context import ServerContext
from corral.server.leases import deliveries_key, instance_key
from corral.store import dispatch

BATCH = 200


async def dispatch_once(ctx: ServerContext) -> bool:
    if ctx.stopping:
        return False
    t0 = time.perf_counter()
    placements = await ctx.db.transact(dispatch.lock_jobs, ctx.db, ctx.now(), batch=BATCH)
    metrics.DISPATCH_PASS.observe(time.perf_counter() - t0)
    metrics.PLACEMENTS.inc(len(placements))
    for p in placements:
        ctx.notifier.wake(
            instance_key(p.instance_id), deliveries_key(p.instance_id), ("job", p.job_id)
        )
    return len(placements) == BATCH
