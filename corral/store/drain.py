"""Draining and retiring instances without losing a byte.

running -> draining: no new jobs, not a recipient. Its live attempts finish (or are
requeued after the drain grace); every object it holds that has no present replica
on another running instance (or in durable storage) is copied to one, or, when no
instance can take it and the fleet has a durable store, uploaded there. Only when the
database shows nothing at risk does it become retired, in the same transaction that
checks it; then, after a short grace, its backend terminates it. With no recipient
it stays draining, with a WARNING naming the outputs at risk, until a person forces
it (and is told what is lost).
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.api import AtRisk
from corral.domain.drain import (
    Holder,
    ObjectInfo,
    ObjectState,
    Recipient,
    at_risk,
    lost_without,
    may_retire,
    plan_copies,
)
from corral.domain.instances import InstanceState
from corral.domain.provisioning import ProvisionState
from corral.store import dispatch, events, fleets, instances, jobs, offloads
from corral.store import objects as objs
from corral.store.db import Database
from corral.store.schema import instances as instances_t
from corral.store.schema import job_outputs, objects, replicas


@dataclass
class DrainResult:
    instance_id: str
    copies: list[tuple[str, str]]  # (sha256, recipient)
    retired: bool = False
    stranded: int = 0
    requeued: int = 0
    offloads: int = 0  # new uploads ordered to the fleet's durable store
    drain_requested_at: float | None = None


@dataclass
class Landed:
    """What an agent's report of landed copies did (`copies_landed`)."""

    present: int  # copies it made present
    # drain steps it ran at once, in its own transaction, for the draining instances
    # these copies may have made safe (they retire here, not on the drain loop's pass)
    steps: list[DrainResult]
    # a step is due that this transaction could not run (another server's drain pass
    # holds that instance): the drain loop must look
    step_due: bool = False


RETRY_FAILED_COPY_AFTER = 10.0
# how long a failed copy makes the planner prefer other recipients for that object
REMEMBER_FAILED_COPY = 300.0


async def object_infos(
    conn: AsyncConnection, instance_id: str, now: float | None = None
) -> list[ObjectInfo]:
    """Every object `instance_id` holds, with all its holders and the copies on their
    way, and the recipients whose copy of it failed lately (the planner asks others
    first, and none of them again within RETRY_FAILED_COPY_AFTER, so a dead source is
    not asked on every tick)."""
    mine = sa.select(replicas.c.sha256).where(
        replicas.c.instance_id == instance_id,
        replicas.c.state.in_([objs.PRESENT, objs.UNVERIFIED]),
    )
    rows = (
        await conn.execute(
            sa.select(
                replicas.c.sha256,
                replicas.c.instance_id,
                replicas.c.state,
                replicas.c.updated_at,
                instances_t.c.state.label("istate"),
                instances_t.c.lost_at,
                objects.c.size,
                objects.c.durable_url,
            )
            .select_from(
                replicas.join(instances_t, instances_t.c.id == replicas.c.instance_id).join(
                    objects, objects.c.sha256 == replicas.c.sha256
                )
            )
            .where(
                replicas.c.sha256.in_(mine),
                sa.or_(
                    replicas.c.state.in_([objs.PRESENT, objs.PENDING, objs.UNVERIFIED]),
                    sa.and_(  # a copy that failed (a refused claim is no copy)
                        replicas.c.state == objs.FAILED,
                        replicas.c.delivered_at.is_not(None),
                        replicas.c.updated_at > (now or 0) - REMEMBER_FAILED_COPY,
                    ),
                ),
            )
        )
    ).all()
    by_sha: dict[str, dict] = {}
    for r in rows:
        o = by_sha.setdefault(
            r.sha256,
            {
                "size": r.size,
                "durable": bool(r.durable_url),
                "holders": [],
                "pending": [],
                "failed": [],
                "claims": [],
            },
        )
        if r.state == objs.PRESENT:
            o["holders"].append(
                Holder(r.instance_id, InstanceState(r.istate), r.lost_at is not None)
            )
            continue
        if r.state == objs.FAILED:
            o["failed"].append((r.instance_id, r.updated_at))
        elif r.state == objs.UNVERIFIED:
            o["claims"].append(r.instance_id)
        elif r.istate == InstanceState.RUNNING:
            o["pending"].append(r.instance_id)
    return [
        ObjectInfo(
            sha,
            o["size"],
            tuple(o["holders"]),
            tuple(o["pending"]),
            o["durable"],
            tuple(o["failed"]),
            tuple(o["claims"]),
        )
        for sha, o in sorted(by_sha.items())
    ]


async def recipients(conn: AsyncConnection, exclude: str | None = None) -> list[Recipient]:
    """Running, reachable instances (but `exclude`), with the bytes each holds or
    has on its way. A drain pass computes them once for all its draining instances
    (only running instances receive, so a draining one is never among them)."""
    load = await objs.bytes_held(conn)
    q = sa.select(instances_t.c.id).where(
        instances_t.c.state == InstanceState.RUNNING,
        instances_t.c.lost_at.is_(None),
    )
    if exclude is not None:
        q = q.where(instances_t.c.id != exclude)
    return [Recipient(i, load.get(i, 0)) for i in (await conn.execute(q)).scalars()]


async def describe_risk(conn: AsyncConnection, risky: list[ObjectInfo]) -> list[AtRisk]:
    """Each object with up to five of the job outputs it is (or the upload's name).
    Two queries for all of them: a drain request describes what it must move."""
    if not risky:
        return []
    shas = [o.sha256 for o in risky]
    names: dict[str, list[str]] = {}
    for sha, job_id, path in (
        await conn.execute(
            sa.select(job_outputs.c.sha256, job_outputs.c.job_id, job_outputs.c.path)
            .where(job_outputs.c.sha256.in_(shas))
            .order_by(job_outputs.c.sha256, job_outputs.c.job_id, job_outputs.c.path)
        )
    ).all():
        labels = names.setdefault(sha, [])
        if len(labels) < 5:
            labels.append(f"job {job_id}: {path}")
    uploads = dict(
        (
            await conn.execute(
                sa.select(objects.c.sha256, objects.c.name).where(
                    objects.c.sha256.in_([s for s in shas if s not in names])
                )
            )
        ).all()
    )
    return [
        AtRisk(
            sha256=o.sha256,
            size=o.size,
            names=names.get(o.sha256) or [f"upload {uploads.get(o.sha256) or o.sha256}"],
        )
        for o in risky
    ]


async def request_drain(conn: AsyncConnection, instance_id: str, force: bool, now: float):
    """running -> draining (or, with force, a draining instance may now retire even
    if data is at risk). Returns the instance and what it alone holds now: without
    force, what must be copied away first; with force, what its retirement loses (an
    object another draining instance still holds is not lost)."""
    inst = await instances.require_instance(conn, instance_id)
    if inst["state"] in (InstanceState.RUNNING, InstanceState.PENDING):
        inst = await instances.transition(
            conn, instance_id, InstanceState.DRAINING, now, drain_force=force
        )
        await events.record(
            conn,
            now,
            "info",
            "instance.draining",
            f"instance {inst['name']} ({instance_id}) is draining" + (" (forced)" if force else ""),
            instance_id=instance_id,
        )
    elif inst["state"] == InstanceState.DRAINING and force and not inst["drain_force"]:
        await conn.execute(
            sa.update(instances_t).where(instances_t.c.id == instance_id).values(drain_force=True)
        )
        inst = await instances.require_instance(conn, instance_id)
    infos = await object_infos(conn, instance_id)
    risky = lost_without(infos, instance_id) if force else at_risk(infos, instance_id)
    return inst, await describe_risk(conn, risky)


async def drain_step(
    conn: AsyncConnection,
    inst,
    now: float,
    *,
    drain_grace: float,
    max_in_flight: int = 8,
    targets: list[Recipient] | None = None,
) -> DrainResult:
    """One step of `inst`'s drain: requeue its attempts past the grace, order copies
    of what only it holds (or uploads), retire it when the database shows nothing at
    risk. `targets`: the recipients (`recipients()`), shared by the steps of one pass
    (the copies a step plans count towards each one's load); computed here if None."""
    iid = inst["id"]
    result = DrainResult(iid, [], drain_requested_at=inst["drain_requested_at"])
    live = await dispatch.live_attempts_on(conn, iid)
    if live and now - (inst["drain_requested_at"] or now) > drain_grace:
        for a in live:
            await jobs.lose_attempt(
                conn,
                a["job_id"],
                a["number"],
                f"instance {inst['name']} is draining (grace {drain_grace:g}s passed)",
                now,
                instance_id=iid,
            )
            result.requeued += 1
        live = await dispatch.live_attempts_on(conn, iid)
    risky = at_risk(await object_infos(conn, iid, now), iid)
    if targets is None and risky:
        targets = await recipients(conn, iid)
    copies, stranded = plan_copies(
        risky,
        targets or [],
        max_in_flight,
        now=now,
        retry_after=RETRY_FAILED_COPY_AFTER,
    )
    await order_copies(conn, [(c.sha256, c.recipient) for c in copies], now)
    result.copies.extend((c.sha256, c.recipient) for c in copies)
    result.stranded = len(stranded)
    durable_fleet = await _durable_fleet(conn, inst) if stranded else None
    if stranded and durable_fleet:
        result.offloads = await offloads.order(
            conn, [o.sha256 for o in stranded], durable_fleet, iid, now
        )
        message = (
            f"uploading {len(stranded)} object(s) only it holds to fleet "
            f"{durable_fleet}'s durable store; retires once they are confirmed there"
        )
        if inst["message"] != message:
            await conn.execute(
                sa.update(instances_t).where(instances_t.c.id == iid).values(message=message)
            )
    elif stranded and not inst["drain_force"]:
        described = await describe_risk(conn, stranded)
        message = (
            f"instance {inst['name']} ({iid}) cannot retire: no running instance can "
            f"take {len(stranded)} output(s) only it holds: "
            + "; ".join(", ".join(a.names) for a in described[:10])
            + (" ..." if len(described) > 10 else "")
            + ". It stays draining; add capacity, or `corral drain --force` to lose them"
        )
        if inst["message"] != message:
            await conn.execute(
                sa.update(instances_t).where(instances_t.c.id == iid).values(message=message)
            )
            await events.record(
                conn,
                now,
                "warning",
                "instance.at_risk",
                message,
                instance_id=iid,
                data={"at_risk": [o.sha256 for o in stranded]},
            )
    if may_retire(len(live), risky, inst["drain_force"]):
        await retire(conn, inst, risky, now)
        result.retired = True
    return result


async def order_copies(conn: AsyncConnection, copies: list[tuple[str, str]], now: float) -> None:
    """A pending replica for each (sha256, recipient): a new order, delivered afresh
    (as `objects.set_replica(..., PENDING)`, in two statements for all of them)."""
    if not copies:
        return
    pairs = set(copies)
    existing = {
        (r.sha256, r.instance_id)
        for r in (
            await conn.execute(
                sa.select(replicas.c.sha256, replicas.c.instance_id).where(
                    replicas.c.sha256.in_({s for s, _ in pairs}),
                    replicas.c.instance_id.in_({i for _, i in pairs}),
                )
            )
        ).all()
    }
    new = [
        {
            "sha256": s,
            "instance_id": i,
            "state": objs.PENDING,
            "created_at": now,
            "updated_at": now,
            "reason": None,
            "reported_at": None,
        }
        for s, i in copies
        if (s, i) not in existing
    ]
    if new:
        await conn.execute(sa.insert(replicas), new)
    for s, i in copies:
        if (s, i) in existing:  # an earlier copy there failed (or went missing)
            await objs.set_replica(conn, s, i, objs.PENDING, now)


async def _durable_fleet(conn: AsyncConnection, inst) -> str | None:
    """The instance's fleet, if that fleet has a durable store."""
    return inst["fleet"] if await fleets.durable_store(conn, inst["fleet"]) else None


async def retire(conn: AsyncConnection, inst, risky: list[ObjectInfo], now: float) -> None:
    """Retire `inst`; with force, an object nothing else holds a present replica of
    (nor durable storage) is lost for good. One another draining (or unreachable)
    instance still holds stays live: it is copied away when that one drains."""
    iid = inst["id"]
    gone = lost_without(risky, iid)
    lost = await describe_risk(conn, gone)
    await instances.transition(conn, iid, InstanceState.RETIRED, now, message=None)
    await conn.execute(
        sa.update(replicas)
        .where(
            replicas.c.instance_id == iid,
            replicas.c.state.in_([objs.PRESENT, objs.PENDING, objs.UNVERIFIED]),
        )
        .values(state=objs.DROPPED, updated_at=now, reason="instance retired")
    )
    if lost:
        await conn.execute(
            sa.update(objects)
            .where(objects.c.sha256.in_([o.sha256 for o in gone]), objects.c.durable_url.is_(None))
            .values(state=ObjectState.LOST, updated_at=now)
        )
        await events.record(
            conn,
            now,
            "warning",
            "instance.retired_forced",
            f"instance {inst['name']} ({iid}) retired by force; {len(lost)} output(s) lost: "
            + "; ".join(", ".join(a.names) for a in lost[:20]),
            instance_id=iid,
        )
    else:
        where = (
            f"{len(risky)} object(s) it held remain only on other draining instance(s)"
            if risky
            else "every object it held has a copy on a running instance"
        )
        await events.record(
            conn,
            now,
            "info",
            "instance.retired",
            f"instance {inst['name']} ({iid}) retired: {where}",
            instance_id=iid,
        )


async def copies_landed(
    conn: AsyncConnection,
    db: Database,
    instance_id: str,
    incarnation: int,
    shas: list[str],
    now: float,
    *,
    drain_grace: float,
) -> Landed:
    """An agent's report of copies that landed on it (`objects.copies_landed`), and
    the drain step of each draining instance those copies may have made safe, run
    here, in the same transaction: the last copy confirmed, its source retires now
    (the step decides it from the database, as the drain loop's would), not on the
    drain loop's next pass."""
    present = await objs.copies_landed(conn, instance_id, incarnation, shas, now)
    landed = Landed(present, [])
    if not present:
        return landed
    due = await step_due_after_copies(conn, shas)
    if not due:
        return landed
    claimed = await claim_draining(conn, db, due)
    targets = None
    for inst in claimed:
        if targets is None:
            targets = await recipients(conn)
        landed.steps.append(
            await drain_step(conn, inst, now, drain_grace=drain_grace, targets=targets)
        )
    landed.step_due = len(claimed) < len(due)
    return landed


async def step_due_after_copies(conn: AsyncConnection, shas: list[str]) -> list[str]:
    """Copies of `shas` just landed: for which draining instances holding one of them
    may a drain step now do something? Those with no copy of their objects on its way
    any more (they may retire), or with an object that has none on its way nor a copy
    on a running instance (a copy to order, or an upload). Not one that other copies
    are still on their way for: a step then would find nothing to do."""
    held_states = [objs.PRESENT, objs.UNVERIFIED]
    sources = (
        (
            await conn.execute(
                sa.select(replicas.c.instance_id)
                .distinct()
                .select_from(replicas.join(instances_t, instances_t.c.id == replicas.c.instance_id))
                .where(
                    replicas.c.sha256.in_(shas),
                    replicas.c.state.in_(held_states),
                    instances_t.c.state == InstanceState.DRAINING,
                )
            )
        )
        .scalars()
        .all()
    )
    due = []
    for source in sources:
        held = sa.select(replicas.c.sha256).where(
            replicas.c.instance_id == source, replicas.c.state.in_(held_states)
        )
        covered = (
            await conn.execute(
                sa.select(replicas.c.sha256, replicas.c.state)
                .select_from(replicas.join(instances_t, instances_t.c.id == replicas.c.instance_id))
                .where(
                    replicas.c.sha256.in_(held),
                    replicas.c.instance_id != source,
                    replicas.c.state.in_([objs.PENDING, objs.PRESENT]),
                    instances_t.c.state == InstanceState.RUNNING,
                )
            )
        ).all()
        if not any(state == objs.PENDING for _, state in covered):
            due.append(source)
            continue
        mine = set((await conn.execute(held)).scalars())
        if mine - {sha for sha, _ in covered}:
            due.append(source)
    return due


async def claim_draining(conn: AsyncConnection, db: Database, ids: list[str] | None = None):
    """Draining instances (of `ids`, if given) this transaction may step: on
    PostgreSQL, those no other server's transaction holds."""
    q = sa.select(instances_t).where(instances_t.c.state == InstanceState.DRAINING)
    if ids is not None:
        q = q.where(instances_t.c.id.in_(ids))
    q = db.claim(q.order_by(instances_t.c.drain_requested_at, instances_t.c.id))
    return (await conn.execute(q)).mappings().all()


async def cancel_doomed_copies(conn: AsyncConnection, now: float, transfer_timeout: float) -> int:
    """Pending copies to instances that stopped being running, or that took too long,
    fail (the next drain step plans them again elsewhere)."""
    doomed = sa.select(instances_t.c.id).where(
        sa.or_(instances_t.c.state != InstanceState.RUNNING, instances_t.c.lost_at.is_not(None))
    )
    r1 = await conn.execute(
        sa.update(replicas)
        .where(replicas.c.state == objs.PENDING, replicas.c.instance_id.in_(doomed))
        .values(state=objs.FAILED, updated_at=now, reason="recipient is no longer running")
    )
    r2 = await conn.execute(
        sa.update(replicas)
        .where(
            replicas.c.state == objs.PENDING,
            replicas.c.delivered_at.is_not(None),
            replicas.c.delivered_at < now - transfer_timeout,
        )
        .values(state=objs.FAILED, updated_at=now, reason="copy took too long")
    )
    return r1.rowcount + r2.rowcount


async def claim_terminable(
    conn: AsyncConnection, db: Database, before: float, now: float | None = None
):
    """Retired before `before`, and not backing off after a failed stop."""
    q = db.claim(
        sa.select(instances_t).where(
            instances_t.c.state == InstanceState.RETIRED,
            instances_t.c.retired_at < before,
            sa.or_(
                instances_t.c.provision_state.is_(None),
                instances_t.c.provision_state != ProvisionState.STOP_FAILED,
                instances_t.c.provision_next_at <= (before if now is None else now),
            ),
        )
    )
    return (await conn.execute(q)).mappings().all()


async def unique_bytes(conn: AsyncConnection, instance_ids: list[str]) -> dict[str, int]:
    """Per instance, the bytes it alone holds (what a scale-down would have to move)."""
    out = {}
    for iid in instance_ids:
        risky = at_risk(await object_infos(conn, iid), iid)
        out[iid] = sum(o.size for o in risky)
    return out
