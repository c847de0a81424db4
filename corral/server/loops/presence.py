"""Presence: keep this server's row fresh and flag servers of different builds."""

from __future__ import annotations

from corral.server.context import ServerContext
from corral.store import events, servers

MIXED_BUILDS = "servers.mixed_builds"


async def presence_once(ctx: ServerContext) -> bool:
    now = ctx.now()

    async def tick(conn):
        await servers.touch_server(conn, ctx.server_id, now)
        rows = await servers.list_servers(conn, include_stopped_since=now)
        alive = [
            r
            for r in rows
            if r["stopped_at"] is None and now - r["last_seen_at"] <= ctx.config.server_grace
        ]
        builds = sorted({r["build_version"] for r in alive})
        if len(builds) < 2:
            return
        message = "servers of different builds share this database: " + "; ".join(
            f"{b} ({', '.join(r['id'] for r in alive if r['build_version'] == b)})" for b in builds
        )
        last = await events.last_of_kind(conn, MIXED_BUILDS)
        if last is None or last["message"] != message or now - last["ts"] > 3600:
            await events.record(
                conn,
                now,
                "warning",
                MIXED_BUILDS,
                message + ". Desired versions come from the database, so they cannot fight; "
                "upgrade the older servers.",
                server_id=ctx.server_id,
                data={"builds": builds},
            )

    await ctx.db.transact(tick)
    return False
