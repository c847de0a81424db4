"""Instances: identity, incarnation, reachability and lifecycle state."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.domain.errors import IllegalTransition
from corral.domain.instances import (
    Admission,
    InstanceState,
    RegisterDecision,
    check_instance_transition,
    decide_heartbeat,
    decide_register,
    instance_sources,
)
from corral.domain.jobs import LIVE_ATTEMPT_STATES
from corral.domain.tokens import hash_secret, same_hash
from corral.store import events, fleets, tokens
from corral.store.schema import instances, job_attempts


class NameInUse(Exception):
    pass


class UnknownFleet(Exception):
    pass


def new_instance_id() -> str:
    return "i-" + secrets.token_hex(5)


@dataclass
class Registration:
    decision: RegisterDecision
    instance: sa.RowMapping | None
    credential: str | None = None


_GET_INSTANCE = sa.select(instances).where(instances.c.id == sa.bindparam("i_id"))


async def get_instance(conn: AsyncConnection, instance_id: str) -> sa.RowMapping | None:
    return (await conn.execute(_GET_INSTANCE, {"i_id": instance_id})).mappings().first()


async def require_instance(conn: AsyncConnection, instance_id: str) -> sa.RowMapping:
    row = await get_instance(conn, instance_id)
    if row is None:
        raise KeyError(instance_id)
    return row


async def get_by_name(conn: AsyncConnection, name: str) -> sa.RowMapping | None:
    q = sa.select(instances).where(instances.c.name == name)
    return (await conn.execute(q)).mappings().first()


async def create_pending(
    conn: AsyncConnection,
    *,
    name: str,
    fleet: str | None,
    now: float,
    backend_ref: str | None = None,
    instance_id: str | None = None,
) -> str:
    instance_id = instance_id or new_instance_id()
    await conn.execute(
        sa.insert(instances).values(
            id=instance_id,
            name=name,
            fleet=fleet,
            state=InstanceState.PENDING,
            incarnation=0,
            created_at=now,
            backend_ref=backend_ref,
        )
    )
    return instance_id


async def register(
    conn: AsyncConnection,
    *,
    name: str,
    instance_id: str | None,
    cpus: float,
    memory_mb: int,
    host: str | None,
    agent_version: str | None,
    fleet: str | None,
    peer_url: str | None,
    now: float,
    sandbox: str | None = None,
    sandbox_warnings: list[str] | None = None,
    join_key: str | None = None,
    interval: float | None = None,
    grace: float | None = None,
) -> Registration:
    """Register an agent. With `instance_id` (an agent that already has an identity,
    authenticated by its credential) this is a restart: same id, next incarnation.
    Without, the agent joins by name: a pending instance of that name is bound, a free
    name creates a new instance, a retired name is refused for good. A join that
    presents the `join_key` the instance joined with is a retry of that join (its
    answer was lost): the same instance, with a new credential (the unseen one is
    revoked)."""
    credential = None
    key_hash = hash_secret(join_key) if join_key else None
    if fleet is not None and await fleets.get_fleet(conn, fleet) is None:
        raise UnknownFleet(
            f"fleet {fleet!r} does not exist: create it first with `corral fleet apply FILE` "
            f"(a fleet file with `name: {fleet}`; see `corral fleet apply --help`), "
            f"or start the agent without --fleet"
        )
    if instance_id is not None:
        row = await get_instance(conn, instance_id)
    else:
        row = await get_by_name(conn, name)
        if row is not None and row["state"] not in (InstanceState.PENDING,):
            decision = decide_register(row["state"])
            if decision.admission is Admission.EXIT:
                return Registration(decision, row)
            if not same_hash(row["join_key_hash"], key_hash):
                raise NameInUse(
                    f"instance name {name!r} is in use by {row['id']} ({row['state']}); "
                    f"pick another --name, or reuse that agent's data dir"
                )
            await tokens.revoke_instance_tokens(conn, row["id"], now)
        if row is None:
            new_id = new_instance_id()
            await conn.execute(
                sa.insert(instances).values(
                    id=new_id,
                    name=name,
                    fleet=fleet,
                    state=InstanceState.PENDING,
                    incarnation=0,
                    created_at=now,
                    join_key_hash=key_hash,
                )
            )
            row = await require_instance(conn, new_id)
        credential = await tokens.create_token(
            conn, tokens.AGENT, now, instance_id=row["id"], note=f"agent {name}"
        )
    decision = decide_register(row["state"] if row is not None else None)
    if decision.admission is Admission.EXIT or row is None:
        return Registration(decision, row)
    result = await conn.execute(
        sa.update(instances)
        .where(instances.c.id == row["id"], instances.c.state == row["state"])
        .values(
            state=decision.state_after,
            incarnation=instances.c.incarnation + 1,
            cpus=cpus,
            memory_mb=memory_mb,
            host=host,
            agent_version=agent_version,
            peer_url=peer_url,
            sandbox=sandbox,
            fleet=sa.func.coalesce(instances.c.fleet, fleet),
            join_key_hash=sa.func.coalesce(instances.c.join_key_hash, key_hash),
            registered_at=now,
            last_heartbeat_at=now,
            lease_until=None if grace is None else now + grace,
            heartbeat_interval=interval,
            lost_at=None,
        )
        .returning(*instances.c)
    )
    updated = result.mappings().first()
    if updated is None:  # the state moved under us (e.g. retired concurrently): refuse
        fresh = await get_instance(conn, row["id"])
        return Registration(decide_register(fresh["state"] if fresh else None), fresh)
    await events.record(
        conn,
        now,
        "info",
        "instance.registered",
        f"instance {updated['name']} ({updated['id']}) registered, incarnation "
        f"{updated['incarnation']}, state {updated['state']}",
        instance_id=updated["id"],
    )
    if sandbox_warnings and (row["sandbox"] != sandbox or credential is not None):
        # once per instance and sandbox: a restart with the same limits says nothing new
        for warning in sandbox_warnings:
            await events.record(
                conn,
                now,
                "warning",
                "instance.sandbox",
                f"instance {updated['name']} ({updated['id']}): {warning}",
                instance_id=updated["id"],
            )
    return Registration(decision, updated, credential)


_HEARD = (
    sa.update(instances)
    .where(
        instances.c.id == sa.bindparam("h_id"),
        instances.c.incarnation == sa.bindparam("h_incarnation"),
    )
    .values(
        last_heartbeat_at=sa.bindparam("h_now"),
        lease_until=sa.bindparam("h_lease"),
        heartbeat_interval=sa.bindparam("h_interval"),
        lost_at=None,
    )
)


async def heartbeat(
    conn: AsyncConnection,
    instance_id: str,
    incarnation: int,
    now: float,
    *,
    touch: bool = True,
    interval: float | None = None,
    grace: float | None = None,
) -> tuple[RegisterDecision, sa.RowMapping | None]:
    """Admit (or turn away) a heartbeat; with `touch`, record that the agent is alive
    and renew its lease: alive until `now + grace`, `grace` being derived from the
    `interval` the reply tells the agent (without it, the reaper's configured grace)."""
    row = await get_instance(conn, instance_id)
    decision = decide_heartbeat(
        row["state"] if row else None, row["incarnation"] if row else None, incarnation
    )
    if decision.admission is Admission.EXIT or not touch or row is None:
        return decision, row
    await conn.execute(
        _HEARD,
        {
            "h_id": instance_id,
            "h_incarnation": incarnation,
            "h_now": now,
            "h_lease": None if grace is None else now + grace,
            "h_interval": interval,
        },
    )
    if row["lost_at"] is not None:
        await events.record(
            conn,
            now,
            "info",
            "instance.back",
            f"instance {row['name']} ({instance_id}) is reachable again after "
            f"{now - row['lost_at']:.0f}s",
            instance_id=instance_id,
        )
    return decision, row


@dataclass(frozen=True)
class Renewal:
    """A lease renewal heard but not yet written (corral.server.leases)."""

    instance_id: str
    incarnation: int
    heard_at: float
    lease_until: float | None
    interval: float | None


_RENEW = (
    sa.update(instances)
    .where(
        instances.c.id == sa.bindparam("r_id"),
        instances.c.incarnation == sa.bindparam("r_incarnation"),
        # a lost instance comes back through a full exchange (it records its return)
        instances.c.lost_at.is_(None),
        # never moves a lease back (a full exchange, or another server, wrote a later one)
        sa.or_(
            instances.c.last_heartbeat_at.is_(None),
            instances.c.last_heartbeat_at < sa.bindparam("r_heard"),
        ),
    )
    .values(
        last_heartbeat_at=sa.bindparam("r_heard"),
        lease_until=sa.bindparam("r_lease"),
        heartbeat_interval=sa.bindparam("r_interval"),
    )
)


async def renew_leases(conn: AsyncConnection, renewals: list[Renewal]) -> None:
    """Write many lease renewals in one statement (executemany)."""
    if not renewals:
        return
    await conn.execute(
        _RENEW,
        [
            {
                "r_id": r.instance_id,
                "r_incarnation": r.incarnation,
                "r_heard": r.heard_at,
                "r_lease": r.lease_until,
                "r_interval": r.interval,
            }
            for r in renewals
        ],
    )


async def transition(
    conn: AsyncConnection,
    instance_id: str,
    target: InstanceState,
    now: float,
    **values,
) -> sa.RowMapping:
    """Move an instance to `target` atomically, from any state the table allows."""
    row = await get_instance(conn, instance_id)
    if row is None:
        raise KeyError(instance_id)
    check_instance_transition(row["state"], target)
    stamp = {
        InstanceState.DRAINING: {"drain_requested_at": now},
        InstanceState.RETIRED: {"retired_at": now},
        InstanceState.TERMINATED: {"terminated_at": now},
    }.get(target, {})
    result = await conn.execute(
        sa.update(instances)
        .where(
            instances.c.id == instance_id,
            instances.c.state.in_([s.value for s in instance_sources(target)]),
        )
        .values(state=target, **stamp, **values)
        .returning(*instances.c)
    )
    updated = result.mappings().first()
    if updated is None:
        fresh = await get_instance(conn, instance_id)
        raise IllegalTransition("instance", fresh["state"] if fresh else "missing", target)
    if target in (InstanceState.RETIRED, InstanceState.TERMINATED):
        await tokens.revoke_instance_tokens(conn, instance_id, now)
    return updated


async def list_instances(conn: AsyncConnection, *, include_terminated: bool = True):
    live = (
        sa.select(job_attempts.c.instance_id, sa.func.count().label("n"))
        .where(job_attempts.c.state.in_([s.value for s in LIVE_ATTEMPT_STATES]))
        .group_by(job_attempts.c.instance_id)
        .subquery()
    )
    q = (
        sa.select(instances, sa.func.coalesce(live.c.n, 0).label("running_attempts"))
        .select_from(instances.outerjoin(live, live.c.instance_id == instances.c.id))
        .order_by(instances.c.created_at, instances.c.name)
    )
    if not include_terminated:
        q = q.where(instances.c.state != InstanceState.TERMINATED)
    return (await conn.execute(q)).mappings().all()


async def find_lost(conn: AsyncConnection, db, now: float, cutoff: float):
    """Reachable-until-now instances whose lease ran out before `now`; those without
    a lease (none told yet) when their last heartbeat is older than `cutoff`."""
    q = db.claim(
        sa.select(instances).where(
            instances.c.state.in_(
                [InstanceState.RUNNING, InstanceState.DRAINING, InstanceState.PENDING]
            ),
            instances.c.lost_at.is_(None),
            instances.c.last_heartbeat_at.is_not(None),
            sa.or_(
                instances.c.lease_until < now,
                sa.and_(instances.c.lease_until.is_(None), instances.c.last_heartbeat_at < cutoff),
            ),
        )
    )
    return (await conn.execute(q)).mappings().all()


async def mark_lost(conn: AsyncConnection, instance_id: str, now: float) -> bool:
    result = await conn.execute(
        sa.update(instances)
        .where(instances.c.id == instance_id, instances.c.lost_at.is_(None))
        .values(lost_at=now)
    )
    return result.rowcount == 1


async def count_live(conn: AsyncConnection) -> int:
    """Instances whose agents heartbeat (pending, running, draining)."""
    q = (
        sa.select(sa.func.count())
        .select_from(instances)
        .where(
            instances.c.state.in_(
                [InstanceState.RUNNING, InstanceState.DRAINING, InstanceState.PENDING]
            )
        )
    )
    return int((await conn.execute(q)).scalar_one())


async def set_backend_ref(conn: AsyncConnection, instance_id: str, ref: str) -> None:
    """What the backend calls this instance's machine."""
    await conn.execute(
        sa.update(instances).where(instances.c.id == instance_id).values(backend_ref=ref)
    )
