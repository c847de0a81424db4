"""Fleet provisioning: keep each fleet this server can provision at its target size,
and bring back the machines of live instances after a restart."""

from __future__ import annotations

import logging

from corral.domain.instances import InstanceState
from corral.server.context import ServerContext
from corral.store import events, fleets, instances

log = logging.getLogger("corral.fleets")


async def provision_once(ctx: ServerContext) -> bool:
    if not ctx.backends or ctx.stopping:
        return False
    now = ctx.now()
    created: list[tuple[dict, str, str]] = []  # (fleet, instance id, name)
    live: list[tuple[dict, dict]] = []

    async def plan(conn):
        for fleet in await fleets.claim_fleets(conn, ctx.db, list(ctx.backends)):
            members = await fleets.fleet_instances(conn, fleet["name"], fleets.LIVE)
            active = [m for m in members if m["state"] != InstanceState.DRAINING]
            missing = fleet["target_size"] - len(active)
            for name in await fleets.next_instance_names(conn, fleet["name"], max(0, missing)):
                instance_id = await instances.create_pending(
                    conn, name=name, fleet=fleet["name"], now=now
                )
                created.append((dict(fleet), instance_id, name))
                await events.record(
                    conn,
                    now,
                    "info",
                    "instance.created",
                    f"fleet {fleet['name']}: creating instance {name} ({instance_id}) "
                    f"on backend {fleet['backend']} (target {fleet['target_size']})",
                    instance_id=instance_id,
                )
            live.extend((dict(fleet), dict(m)) for m in members)

    await ctx.db.transact(plan)
    for fleet, instance_id, name in created:
        ref = await ctx.backends[fleet["backend"]].create(
            instance_id, name, fleet["name"], cpus=fleet["cpus"], memory_mb=fleet["memory_mb"]
        )

        await ctx.db.transact(instances.set_backend_ref, instance_id, ref)
    for fleet, m in live:
        await ctx.backends[fleet["backend"]].ensure(
            m["id"],
            m["name"],
            m["fleet"],
            m["backend_ref"],
            cpus=fleet["cpus"],
            memory_mb=fleet["memory_mb"],
        )
    return False
