"""Reconciler: move rollouts along (batches, pause on failures, completion)."""

from __future__ import annotations

from corral.server.context import ServerContext
from corral.server.leases import instance_key
from corral.store import components


async def reconcile_once(ctx: ServerContext) -> bool:
    touched = await ctx.db.transact(components.advance, ctx.db, ctx.now())
    for instance_id in touched:
        ctx.notifier.wake(instance_key(instance_id))
    return False
