"""Health flags: conditions a person should look at, computed from the database."""

from __future__ import annotations

import sqlalchemy as sa

from corral.server.context import ServerContext
from corral.store import servers


async def health_report(ctx: ServerContext) -> dict:
    now = ctx.now()
    flags: list[dict] = []
    try:
        rows = await ctx.db.query(servers.list_servers, include_stopped_since=now)
    except (sa.exc.SQLAlchemyError, OSError) as exc:
        return {"status": "down", "database": f"error: {exc.__class__.__name__}",
                "server_id": ctx.server_id, "build_version": ctx.config.build_version,
                "flags": []}
    alive = [r for r in rows if r["stopped_at"] is None
             and now - r["last_seen_at"] <= ctx.config.server_grace]
    builds = sorted({r["build_version"] for r in alive})
    if len(builds) > 1:
        flags.append({
            "flag": "mixed_server_builds",
            "message": "servers of different builds share this database: " + ", ".join(builds),
            "builds": builds,
        })
    for provider in ctx.extras.get("health_providers", []):
        flags.extend(await provider(ctx))
    return {
        "status": "degraded" if flags else "ok",
        "database": "ok",
        "server_id": ctx.server_id,
        "build_version": ctx.config.build_version,
        "servers_alive": len(alive),
        "flags": flags,
    }
