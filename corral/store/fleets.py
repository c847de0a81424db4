"""Fleets: a backend, a size range and a target size."""

from __future__ import annotations

import re
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.domain.instances import InstanceState
from corral.domain.presign import DurableStore
from corral.store.schema import fleets, instances
from corral.store.sealing import sealer_of

SEALED_SECRET = "secret_key_sealed"  # durable.secret_key as the database keeps it


def _sealed_spec(conn: AsyncConnection, spec: dict | None) -> dict:
    """The spec with its durable store's secret key sealed (a spec read back from the
    database is sealed already and stays as it is)."""
    spec = dict(spec or {})
    durable = spec.get("durable")
    if durable and durable.get("secret_key"):
        durable = dict(durable)
        durable[SEALED_SECRET] = sealer_of(conn).seal(durable.pop("secret_key"))
        spec["durable"] = durable
    return spec


async def upsert_fleet(
    conn: AsyncConnection,
    *,
    name: str,
    backend: str,
    min_size: int,
    max_size: int,
    target_size: int,
    now: float,
    idle_timeout: float = 300.0,
    cpus: float | None = None,
    memory_mb: int | None = None,
    spec: dict | None = None,
) -> None:
    exists = (await conn.execute(sa.select(fleets.c.name).where(fleets.c.name == name))).first()
    values = dict(
        backend=backend,
        min_size=min_size,
        max_size=max_size,
        target_size=target_size,
        idle_timeout=idle_timeout,
        cpus=cpus,
        memory_mb=memory_mb,
        spec=_sealed_spec(conn, spec),
        updated_at=now,
    )
    if exists:
        await conn.execute(sa.update(fleets).where(fleets.c.name == name).values(**values))
    else:
        await conn.execute(sa.insert(fleets).values(name=name, created_at=now, **values))


async def get_fleet(conn: AsyncConnection, name: str):
    return (await conn.execute(sa.select(fleets).where(fleets.c.name == name))).mappings().first()


async def durable_store(conn: AsyncConnection, name: str | None) -> DurableStore | None:
    """The fleet's durable store, if it has one."""
    if not name:
        return None
    spec = (await conn.execute(sa.select(fleets.c.spec).where(fleets.c.name == name))).scalar()
    durable = (spec or {}).get("durable")
    if not durable:
        return None
    durable = dict(durable)
    if SEALED_SECRET in durable:
        durable["secret_key"] = sealer_of(conn).unseal(durable.pop(SEALED_SECRET))
    return DurableStore.from_spec(durable)


async def seal_plaintext_secrets(conn: AsyncConnection) -> int:
    """Seal the durable keys a database written before sealing existed holds in clear;
    return how many fleets changed. Raises SealError if a sealed key does not open
    with this server's key (a server started with another key)."""
    changed = 0
    for name, spec in (await conn.execute(sa.select(fleets.c.name, fleets.c.spec))).all():
        durable = (spec or {}).get("durable") or {}
        if SEALED_SECRET in durable:  # the key must be the one that sealed it
            sealer_of(conn).unseal(durable[SEALED_SECRET])
        if durable.get("secret_key"):
            await conn.execute(
                sa.update(fleets).where(fleets.c.name == name).values(spec=_sealed_spec(conn, spec))
            )
            changed += 1
    return changed


async def list_fleets(conn: AsyncConnection):
    return (await conn.execute(sa.select(fleets).order_by(fleets.c.name))).mappings().all()


async def claim_fleets(conn: AsyncConnection, db, backends: list[str]):
    q = db.claim(sa.select(fleets).where(fleets.c.backend.in_(backends)).order_by(fleets.c.name))
    return (await conn.execute(q)).mappings().all()


async def fleet_instances(conn: AsyncConnection, fleet: str, states: Sequence[str] | None = None):
    q = sa.select(instances).where(instances.c.fleet == fleet).order_by(instances.c.created_at)
    if states:
        q = q.where(instances.c.state.in_(states))
    return (await conn.execute(q)).mappings().all()


async def next_instance_names(conn: AsyncConnection, fleet: str, count: int) -> list[str]:
    """Fresh names `<fleet>-<n>`: never one an instance ever had (a retired name is
    refused for good, so it must not be handed out again)."""
    names = (
        (await conn.execute(sa.select(instances.c.name).where(instances.c.name.like(f"{fleet}-%"))))
        .scalars()
        .all()
    )
    pattern = re.compile(rf"^{re.escape(fleet)}-(\d+)$")
    highest = max((int(m.group(1)) for n in names if (m := pattern.match(n))), default=0)
    return [f"{fleet}-{highest + i}" for i in range(1, count + 1)]


LIVE = [InstanceState.PENDING, InstanceState.RUNNING, InstanceState.DRAINING]
# instances that still occupy their machine (a retired one until it is terminated)
HOLDING = [*LIVE, InstanceState.RETIRED]
