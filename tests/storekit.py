"""Store-level test helpers: one way to register an instance straight through the store
(what the agents route does, without HTTP), with the details a test does not care about
filled in."""

from __future__ import annotations

from typing import Any

from corral.store import instances
from corral.store.db import Database


async def register(
    db: Database,
    name: str,
    now: float,
    *,
    instance_id: str | None = None,
    cpus: float = 1,
    memory_mb: int = 1,
    fleet: str | None = None,
    peer_url: str | None = None,
    **extra: Any,
) -> instances.Registration:
    """Register (or re-register, with `instance_id`) the instance `name` at `now`."""
    return await db.transact(
        instances.register,
        name=name,
        instance_id=instance_id,
        cpus=cpus,
        memory_mb=memory_mb,
        host=extra.pop("host", None),
        agent_version=extra.pop("agent_version", None),
        fleet=fleet,
        peer_url=peer_url,
        now=now,
        **extra,
    )
