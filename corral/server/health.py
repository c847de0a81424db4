"""Health flags: conditions a person should look at, computed from the database."""

from __future__ import annotations

from corral.server.context import ServerContext
from corral.store import components, servers
from corral.store.db import DatabaseError


async def health_report(ctx: ServerContext) -> dict:
    now = ctx.now()
    flags: list[dict] = []
    try:
        rows = await ctx.db.query(servers.list_servers, include_stopped_since=now)
    except (DatabaseError, OSError) as exc:
        return {
            "status": "down",
            "database": f"error: {exc.__class__.__name__}",
            "server_id": ctx.server_id,
            "build_version": ctx.config.build_version,
            "flags": [],
        }
    alive = [
        r
        for r in rows
        if r["stopped_at"] is None and now - r["last_seen_at"] <= ctx.config.server_grace
    ]
    builds = sorted({r["build_version"] for r in alive})
    if len(builds) > 1:
        flags.append(
            {
                "flag": "mixed_server_builds",
                "message": "servers of different builds share this database: " + ", ".join(builds),
                "builds": builds,
            }
        )
    for provider in ctx.health_providers:
        flags.extend(await provider(ctx))
    return {
        "status": "degraded" if flags else "ok",
        "database": "ok",
        "server_id": ctx.server_id,
        "build_version": ctx.config.build_version,
        "servers_alive": len(alive),
        "flags": flags,
    }


async def install_health(ctx: ServerContext) -> list[dict]:
    """Components that did not install after the cap: a person has to look."""
    rows = await ctx.db.query(components.failed_installs)
    return [
        {
            "flag": "install_failed",
            "message": f"{r['instance_name']}: {r['component']} {r['target_version']} did not "
            f"install after {r['attempts']} orders ({r['last_error'] or 'no error'})",
            "instance_id": r["instance_id"],
            "component": r["component"],
        }
        for r in rows
    ]
