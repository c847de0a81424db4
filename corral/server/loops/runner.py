"""Run a loop body forever: on a timer, sooner when woken, never dying of one error."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from corral.server import metrics
from corral.server.context import ServerContext
from corral.store.db import DatabaseError

log = logging.getLogger("corral.loops")

RETRY_CAP = 2.0


async def run_loop(
    ctx: ServerContext,
    name: str,
    body: Callable[[ServerContext], Awaitable[bool]],
    interval: float,
    wake_key: str | None = None,
) -> None:
    """`body` returns True when it has more work right away (e.g. a full batch)."""
    failures = 0
    while True:
        gen = ctx.notifier.generation(wake_key) if wake_key else 0
        try:
            more = await body(ctx)
            failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a loop must survive a database hiccup
            if isinstance(exc, DatabaseError):
                metrics.DATABASE_ERRORS.labels(f"loop:{name}").inc()
            failures += 1
            if failures == 1:
                log.exception("%s loop failed", name)
            elif failures % 30 == 0:
                log.warning("%s loop failed %d times in a row: %s", name, failures, exc)
            more = False
            # retry soon (at most every RETRY_CAP, or its interval if longer): once the
            # database is back the fleet resumes within seconds, not half a minute
            await asyncio.sleep(min(max(interval, RETRY_CAP), interval * 2 ** min(failures, 5)))
        if more:
            await asyncio.sleep(0)
            continue
        if wake_key:
            await ctx.notifier.wait(wake_key, gen, interval)
        else:
            await asyncio.sleep(interval)
