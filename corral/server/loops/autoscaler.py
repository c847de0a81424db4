"""Autoscaler: grow fleets while jobs wait, retire idle instances after the idle
timeout; act only after several consecutive checks agree (corral.store.scaling)."""

from __future__ import annotations

from corral.server.context import ServerContext
from corral.store import scaling


async def autoscale_once(ctx: ServerContext) -> bool:
    if not ctx.backends or ctx.stopping:
        return False
    await ctx.db.transact(
        scaling.autoscale, ctx.db, list(ctx.backends), ctx.now(), ctx.config.autoscale_checks
    )
    ctx.notifier.wake("fleets", "drain")
    return False
