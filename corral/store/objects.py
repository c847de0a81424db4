"""Objects (job outputs and uploads), where their replicas live, and one-time
transfer grants.

An agent serves an object to a peer (or to a server) only for a token the server
issued for exactly that object, and the server honours the token only while its
recipient is `running`: a draining or retired instance can never receive data,
whatever any agent believes.

A replica is `present` (what drains and retirement count) only on an agent's own
report of bytes it holds and hashed: a runner's finish (which anything holding the
attempt token could send) records the job's outputs and an `unverified` claim; the
agent's next object list confirms it. A report of an object that already has a
present replica elsewhere stays `unverified` until a server has fetched the bytes
from the claimant and hashed them (`claims_to_prove`, `proved`, `disproved`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.api import Fetch, ObjectError, OutputFile
from corral.domain.drain import ObjectState, ReplicaState
from corral.domain.instances import InstanceState
from corral.domain.tokens import hash_secret, well_formed
from corral.store import events, fleets
from corral.store.db import insert_ignoring_duplicates
from corral.store.schema import grants, instances, job_outputs, objects, replicas

PENDING, PRESENT, UNVERIFIED, FAILED, MISSING, DROPPED = (
    ReplicaState.PENDING,
    ReplicaState.PRESENT,
    ReplicaState.UNVERIFIED,
    ReplicaState.FAILED,
    ReplicaState.MISSING,
    ReplicaState.DROPPED,
)
LIVE_HOLDER_STATES = [InstanceState.PENDING, InstanceState.RUNNING, InstanceState.DRAINING]
GRANT_TTL = 600.0
# a runner's claim its agent has not listed for this long is dropped (agents send their
# full object list at least every 30 s, and again after every attempt ends)
CLAIM_GRACE = 90.0
# a report whose proof failed is not tried again for this long
PROOF_RETRY = 600.0


async def _ensure_object(
    conn: AsyncConnection,
    sha256: str,
    size: int,
    origin: str,
    name: str | None,
    now: float,
    staged_on: str | None = None,
) -> None:
    stmt = insert_ignoring_duplicates(conn, objects).values(
        sha256=sha256,
        size=size,
        origin=origin,
        name=name,
        state=ObjectState.LIVE,
        staged_on=staged_on,
        created_at=now,
        updated_at=now,
    )
    await conn.execute(stmt.on_conflict_do_nothing())


async def set_replica(
    conn: AsyncConnection,
    sha256: str,
    instance_id: str,
    state: str,
    now: float,
    reason: str | None = None,
    reported_at: float | None = None,
) -> None:
    existing = (
        await conn.execute(
            sa.select(replicas.c.state).where(
                replicas.c.sha256 == sha256, replicas.c.instance_id == instance_id
            )
        )
    ).first()
    if existing is None:
        await conn.execute(
            sa.insert(replicas).values(
                sha256=sha256,
                instance_id=instance_id,
                state=state,
                created_at=now,
                updated_at=now,
                reason=reason,
                reported_at=reported_at,
            )
        )
    else:
        values = dict(state=state, updated_at=now, reason=reason, reported_at=reported_at)
        if state == PENDING:  # a new order: a new placement, delivered afresh
            values.update(created_at=now, delivered_at=None)
        await conn.execute(
            sa.update(replicas)
            .where(replicas.c.sha256 == sha256, replicas.c.instance_id == instance_id)
            .values(**values)
        )


async def record_outputs(
    conn: AsyncConnection,
    job_id: int,
    attempt: int,
    instance_id: str,
    outputs: list[OutputFile],
    now: float,
) -> None:
    """Called inside the fenced finish: the outputs of the attempt whose result is
    recorded, and an unverified claim that the instance that ran it holds them (its
    agent's own report makes that a replica)."""
    for out in outputs:
        await _ensure_object(conn, out.sha256, out.size, "output", out.path.rsplit("/", 1)[-1], now)
        state = await replica_state(conn, out.sha256, instance_id)
        if state not in (PRESENT, PENDING, UNVERIFIED):
            await set_replica(
                conn,
                out.sha256,
                instance_id,
                UNVERIFIED,
                now,
                f"claimed by attempt {attempt} of job {job_id}",
            )
        await conn.execute(
            sa.insert(job_outputs).values(
                job_id=job_id, path=out.path, sha256=out.sha256, size=out.size, attempt=attempt
            )
        )


# ---- grants ---------------------------------------------------------------------------------


async def grant(
    conn: AsyncConnection, sha256: str, recipient_id: str | None, now: float, ttl: float = GRANT_TTL
) -> str:
    token = secrets.token_urlsafe(24)
    await grant_many(conn, [(sha256, token)], recipient_id, now, ttl)
    return token


async def grant_many(
    conn: AsyncConnection,
    tokens: list[tuple[str, str]],
    recipient_id: str | None,
    now: float,
    ttl: float = GRANT_TTL,
) -> None:
    """Record one-time grants: (sha256, token) each, for `recipient_id`."""
    if not tokens:
        return
    await conn.execute(
        sa.insert(grants),
        [
            dict(
                token_hash=hash_secret(token),
                sha256=sha,
                recipient_id=recipient_id,
                created_at=now,
                expires_at=now + ttl,
            )
            for sha, token in tokens
        ],
    )
    await conn.execute(sa.delete(grants).where(grants.c.expires_at < now - 3600))


async def verify_grant(
    conn: AsyncConnection, sha256: str, token: str, now: float, *, recipient: str | None
) -> str | None:
    """None if the token lets `recipient` (an instance id; None for a server) fetch
    `sha256` now, and the token is used up by this answer; else why not. A token is
    single-use and bound to the recipient it was issued for: presented on behalf of
    anyone else it is refused (and not used up)."""
    if not well_formed(token):
        return "malformed token"
    row = (
        (await conn.execute(sa.select(grants).where(grants.c.token_hash == hash_secret(token))))
        .mappings()
        .first()
    )
    if row is None:
        return "no such grant (or it was used already)"
    if row["sha256"] != sha256:
        return "no such grant for this object"
    if row["expires_at"] < now:
        return "grant expired"
    if (row["recipient_id"] or None) != (recipient or None):
        return "this token was issued to another recipient"
    if row["recipient_id"] is not None:
        inst = (
            await conn.execute(
                sa.select(instances.c.state, instances.c.name).where(
                    instances.c.id == row["recipient_id"]
                )
            )
        ).first()
        if inst is None or inst.state != InstanceState.RUNNING:
            return (
                f"recipient {inst.name if inst else row['recipient_id']} is "
                f"{inst.state if inst else 'gone'}; only running instances receive data"
            )
    used = await conn.execute(sa.delete(grants).where(grants.c.token_hash == row["token_hash"]))
    if used.rowcount != 1:  # a concurrent redemption won
        return "no such grant (or it was used already)"
    return None


# ---- where objects are ----------------------------------------------------------------------


async def sources(conn: AsyncConnection, sha256: str, exclude: str | None = None) -> list[str]:
    """Peer URLs of live instances holding `sha256`: verified replicas first, then
    unverified claims (every transfer checks the sha256, so a claim can serve bytes;
    it only never counts as a copy), reachable ones first."""
    return [url for _id, url in await holders(conn, sha256, exclude)]


async def holders(
    conn: AsyncConnection, sha256: str, exclude: str | None = None
) -> list[tuple[str, str]]:
    """(instance id, peer URL) of every registered live instance holding `sha256`, in
    the order of `sources`: the only places a server fetches an object from."""
    return (await holders_of(conn, [sha256], exclude)).get(sha256, [])


async def holders_of(
    conn: AsyncConnection, shas: list[str], exclude: str | None = None
) -> dict[str, list[tuple[str, str]]]:
    """`holders` of each of `shas`, in one query."""
    q = (
        sa.select(
            instances.c.id,
            instances.c.peer_url,
            instances.c.lost_at,
            instances.c.state,
            replicas.c.state.label("rstate"),
            replicas.c.sha256,
        )
        .select_from(replicas.join(instances, instances.c.id == replicas.c.instance_id))
        .where(
            replicas.c.sha256.in_(shas),
            replicas.c.state.in_([PRESENT, UNVERIFIED]),
            instances.c.state.in_(LIVE_HOLDER_STATES),
            instances.c.peer_url.is_not(None),
        )
    )
    rows = [r for r in (await conn.execute(q)).all() if r.id != exclude]
    rows.sort(
        key=lambda r: (
            r.rstate != PRESENT,
            r.lost_at is not None,
            r.state != InstanceState.RUNNING,
            r.id,
        )
    )
    out: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        out.setdefault(r.sha256, []).append((r.id, f"{r.peer_url}/objects/{r.sha256}"))
    return out


async def replica_bad(
    conn: AsyncConnection, sha256: str, instance_id: str, why: str, now: float
) -> None:
    """A server fetched this replica and its bytes were wrong: it is no copy."""
    result = await conn.execute(
        sa.update(replicas)
        .where(
            replicas.c.sha256 == sha256,
            replicas.c.instance_id == instance_id,
            replicas.c.state.in_([PRESENT, UNVERIFIED]),
        )
        .values(state=FAILED, updated_at=now, reason=f"served wrong bytes: {why}"[:1000])
    )
    if result.rowcount:
        await events.record(
            conn,
            now,
            "warning",
            "object.replica_bad",
            f"instance {instance_id} served object {sha256[:12]}… with wrong bytes ({why}); "
            f"its replica no longer counts",
            instance_id=instance_id,
        )


async def durable_source(conn: AsyncConnection, obj, now: float) -> str | None:
    """A signed, short-lived GET URL of the object's durable copy, if it has one."""
    store = await fleets.durable_store(conn, obj["durable_fleet"])
    return store.get_url(obj["sha256"], now) if store else None


async def replica_state(conn: AsyncConnection, sha256: str, instance_id: str) -> str | None:
    return (
        await conn.execute(
            sa.select(replicas.c.state).where(
                replicas.c.sha256 == sha256, replicas.c.instance_id == instance_id
            )
        )
    ).scalar()


async def verified_elsewhere(conn: AsyncConnection, sha256: str, instance_id: str) -> bool:
    """Does another instance hold a verified replica of `sha256`?"""
    return (
        await conn.execute(
            sa.select(replicas.c.instance_id)
            .where(
                replicas.c.sha256 == sha256,
                replicas.c.instance_id != instance_id,
                replicas.c.state == PRESENT,
            )
            .limit(1)
        )
    ).first() is not None


async def holds(conn: AsyncConnection, instance_id: str, sha256: str) -> bool:
    return (
        await conn.execute(
            sa.select(replicas.c.state).where(
                replicas.c.sha256 == sha256,
                replicas.c.instance_id == instance_id,
                replicas.c.state == PRESENT,
            )
        )
    ).first() is not None


async def fetches_for(
    conn: AsyncConnection, instance_id: str, shas: list[str], now: float, server_url: str
) -> list[Fetch]:
    """How `instance_id` gets each object: nothing if it holds it, else sources and
    a grant naming it as the recipient. (A handful of queries for all of `shas`: a
    drain orders many copies onto one recipient at once.)"""
    if not shas:
        return []
    objs = {
        o["sha256"]: o
        for o in (
            await conn.execute(sa.select(objects).where(objects.c.sha256.in_(set(shas))))
        ).mappings()
    }
    held = set(
        (
            await conn.execute(
                sa.select(replicas.c.sha256).where(
                    replicas.c.instance_id == instance_id,
                    replicas.c.state == PRESENT,
                    replicas.c.sha256.in_(list(objs)),
                )
            )
        ).scalars()
    )
    where = await holders_of(conn, [s for s in objs if s not in held], exclude=instance_id)
    out = []
    tokens: list[tuple[str, str]] = []
    for sha in shas:
        obj = objs.get(sha)
        if obj is None:
            continue
        name = obj["name"] or sha
        if sha in held:
            out.append(Fetch(sha256=sha, size=obj["size"], name=name))
            continue
        urls = [url for _id, url in where.get(sha, [])]
        if obj["staged_on"]:
            urls.append(f"{server_url}/api/v1/objects/{sha}/staged")
        if durable := await durable_source(conn, obj, now):
            urls.append(durable)
        token = secrets.token_urlsafe(24)
        tokens.append((sha, token))
        out.append(Fetch(sha256=sha, size=obj["size"], name=name, sources=urls, token=token))
    await grant_many(conn, tokens, instance_id, now)
    return out


# ---- the heartbeat's share ------------------------------------------------------------------


# the read of every agent exchange, built once
_HELD_OR_ORDERED = sa.select(replicas).where(
    replicas.c.instance_id == sa.bindparam("r_instance_id"),
    replicas.c.state.in_([PENDING, PRESENT, UNVERIFIED]),
)


async def sync(
    conn: AsyncConnection,
    instance,
    reported: list[str] | None,
    errors: list[ObjectError],
    now: float,
    server_url: str,
    listed_before: float | None = None,
) -> list[Fetch]:
    """Reconcile what the agent reports holding with the replica table, and hand out
    the replication orders placed on it (only while it is running).

    The report is the agent's own: an ordered copy it lists is present; an object
    nobody else holds verified (its own outputs) is present; an object another
    instance already holds verified stays unverified until a server proves it.
    `listed_before`: when the server received the list (it was composed before then):
    a present replica it omits is missing, unless the agent reported that copy on its
    own (`copies_landed`) after that moment."""
    iid = instance["id"]
    rows = {
        r["sha256"]: r
        for r in (await conn.execute(_HELD_OR_ORDERED, {"r_instance_id": iid})).mappings()
    }
    for err in errors:
        row = rows.get(err.sha256)
        if row is not None and row["state"] == PENDING:
            await set_replica(conn, err.sha256, iid, FAILED, now, err.error[:1000])
            rows.pop(err.sha256)
    if reported is not None:
        held = set(reported)
        for sha, row in rows.items():
            if sha in held:
                if row["state"] == PENDING:
                    await set_replica(conn, sha, iid, PRESENT, now, reported_at=now)
                elif row["state"] == UNVERIFIED and row["reported_at"] is None:
                    await _reported(conn, instance, sha, now)
            elif row["state"] == PRESENT and not (
                listed_before is not None and (row["reported_at"] or 0.0) > listed_before
            ):
                # (a copy the agent reported on its own after this list was sent, i.e.
                # after `listed_before`, stays: the newer report wins)
                await set_replica(conn, sha, iid, MISSING, now, "the agent no longer has it")
                await events.record(
                    conn,
                    now,
                    "warning",
                    "object.missing",
                    f"instance {instance['name']} ({iid}) no longer holds object {sha[:12]}…",
                    instance_id=iid,
                )
            elif row["state"] == UNVERIFIED and row["created_at"] < now - CLAIM_GRACE:
                why = f"{row['reason'] or 'claimed'}, but its agent does not hold it"
                await set_replica(conn, sha, iid, FAILED, now, why)
                await events.record(
                    conn,
                    now,
                    "warning",
                    "object.claim_refused",
                    f"instance {instance['name']} ({iid}): object {sha[:12]}… was {why}",
                    instance_id=iid,
                )
        new = list(held - rows.keys())
        if new:  # e.g. an input it fetched for a job
            known = (
                (await conn.execute(sa.select(objects.c.sha256).where(objects.c.sha256.in_(new))))
                .scalars()
                .all()
            )
            for sha in known:
                await _reported(conn, instance, sha, now)
    if instance["state"] != InstanceState.RUNNING:
        return []
    # the orders not yet handed out: the pending rows read above that this report left
    # pending (an error made one failed, a listing made one present; nothing here makes
    # one pending), no second read
    listed = set(reported) if reported is not None else set()
    due = [
        sha
        for sha, row in rows.items()
        if row["state"] == PENDING and row["delivered_at"] is None and sha not in listed
    ]
    if not due:
        return []
    await conn.execute(
        sa.update(replicas)
        .where(replicas.c.sha256.in_(due), replicas.c.instance_id == iid)
        .values(delivered_at=now)
    )
    return [o for o in await fetches_for(conn, iid, due, now, server_url) if o.token]


async def copies_landed(
    conn: AsyncConnection, instance_id: str, incarnation: int, shas: list[str], now: float
) -> int:
    """The agent of `instance_id` reports, before its next heartbeat, ordered copies it
    now holds (fetched and hashed by its own code): each one ordered onto it (pending)
    is present, as the same report in a heartbeat's object list makes it. Anything else
    (no order, or a report from an older incarnation or an instance that is not live)
    is left for the heartbeat. Returns how many copies this made present."""
    inst = (
        await conn.execute(
            sa.select(instances.c.state, instances.c.incarnation).where(
                instances.c.id == instance_id
            )
        )
    ).first()
    if inst is None or inst.incarnation != incarnation or inst.state not in LIVE_HOLDER_STATES:
        return 0
    result = await conn.execute(
        sa.update(replicas)
        .where(
            replicas.c.instance_id == instance_id,
            replicas.c.sha256.in_(shas),
            replicas.c.state == PENDING,
        )
        .values(state=PRESENT, updated_at=now, reason=None, reported_at=now)
    )
    return result.rowcount


async def _reported(conn: AsyncConnection, instance, sha256: str, now: float) -> None:
    """The agent reports holding `sha256`, with no order for it."""
    iid = instance["id"]
    if not await verified_elsewhere(conn, sha256, iid):
        await set_replica(conn, sha256, iid, PRESENT, now, reported_at=now)
        return
    row = (
        await conn.execute(
            sa.select(replicas.c.state, replicas.c.updated_at, replicas.c.reason).where(
                replicas.c.sha256 == sha256, replicas.c.instance_id == iid
            )
        )
    ).first()
    if (
        row is not None
        and row.state == FAILED
        and (row.reason or "").startswith("proof failed")
        and row.updated_at > now - PROOF_RETRY
    ):
        return  # it failed a proof of this object lately: not again yet
    await set_replica(
        conn,
        sha256,
        iid,
        UNVERIFIED,
        now,
        "reported while another instance holds it: to be proven",
        reported_at=now,
    )


# ---- proving claims ------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    sha256: str
    size: int
    instance_id: str
    instance_name: str
    peer_url: str


async def claims_to_prove(conn: AsyncConnection, limit: int = 8) -> list[Claim]:
    """Reports of objects another instance already holds verified, from live
    instances that can be asked for the bytes."""
    q = (
        sa.select(
            replicas.c.sha256,
            objects.c.size,
            replicas.c.instance_id,
            instances.c.name,
            instances.c.peer_url,
        )
        .select_from(
            replicas.join(instances, instances.c.id == replicas.c.instance_id).join(
                objects, objects.c.sha256 == replicas.c.sha256
            )
        )
        .where(
            replicas.c.state == UNVERIFIED,
            replicas.c.reported_at.is_not(None),
            instances.c.state.in_(LIVE_HOLDER_STATES),
            instances.c.lost_at.is_(None),
            instances.c.peer_url.is_not(None),
        )
        .order_by(replicas.c.reported_at)
        .limit(limit)
    )
    return [Claim(*r) for r in (await conn.execute(q)).all()]


async def proved(conn: AsyncConnection, claim: Claim, now: float) -> bool:
    """A server fetched the claimed bytes from the claimant and they hash right."""
    result = await conn.execute(
        sa.update(replicas)
        .where(
            replicas.c.sha256 == claim.sha256,
            replicas.c.instance_id == claim.instance_id,
            replicas.c.state == UNVERIFIED,
        )
        .values(state=PRESENT, updated_at=now, reason="proven: a server hashed its bytes")
    )
    return result.rowcount == 1


async def disproved(conn: AsyncConnection, claim: Claim, why: str, now: float) -> None:
    result = await conn.execute(
        sa.update(replicas)
        .where(
            replicas.c.sha256 == claim.sha256,
            replicas.c.instance_id == claim.instance_id,
            replicas.c.state == UNVERIFIED,
        )
        .values(state=FAILED, updated_at=now, reason=f"proof failed: {why}"[:1000])
    )
    if result.rowcount == 1:
        await events.record(
            conn,
            now,
            "warning",
            "object.claim_refused",
            f"instance {claim.instance_name} ({claim.instance_id}) reported object "
            f"{claim.sha256[:12]}…, held verified elsewhere, but could not prove it: {why}",
            instance_id=claim.instance_id,
        )


# ---- reading --------------------------------------------------------------------------------


async def list_outputs(conn: AsyncConnection, job_id: int):
    copies = (
        sa.select(replicas.c.sha256, sa.func.count().label("n"))
        .select_from(replicas.join(instances, instances.c.id == replicas.c.instance_id))
        .where(replicas.c.state == PRESENT, instances.c.state.in_(LIVE_HOLDER_STATES))
        .group_by(replicas.c.sha256)
        .subquery()
    )
    q = (
        sa.select(
            job_outputs,
            objects.c.state,
            objects.c.durable_url,
            sa.func.coalesce(copies.c.n, 0).label("copies"),
        )
        .select_from(
            job_outputs.join(objects, objects.c.sha256 == job_outputs.c.sha256).outerjoin(
                copies, copies.c.sha256 == job_outputs.c.sha256
            )
        )
        .where(job_outputs.c.job_id == job_id)
        .order_by(job_outputs.c.path)
    )
    return (await conn.execute(q)).mappings().all()


async def get_object(conn: AsyncConnection, sha256: str):
    return (
        (await conn.execute(sa.select(objects).where(objects.c.sha256 == sha256)))
        .mappings()
        .first()
    )


async def object_replicas(conn: AsyncConnection, sha256: str):
    q = (
        sa.select(
            replicas,
            instances.c.name.label("instance_name"),
            instances.c.state.label("instance_state"),
            instances.c.peer_url,
            instances.c.lost_at,
        )
        .select_from(replicas.join(instances, instances.c.id == replicas.c.instance_id))
        .where(replicas.c.sha256 == sha256)
        .order_by(instances.c.name)
    )
    return (await conn.execute(q)).mappings().all()


async def stage_upload(
    conn: AsyncConnection, sha256: str, size: int, name: str | None, server_id: str, now: float
) -> str | None:
    """Record an upload staged on this server and order it onto the running instance
    holding the fewest bytes. Returns that instance, or None if there is none yet."""
    await _ensure_object(conn, sha256, size, "upload", name, now, staged_on=server_id)
    await conn.execute(
        sa.update(objects)
        .where(objects.c.sha256 == sha256, objects.c.state == ObjectState.LOST)
        .values(state=ObjectState.LIVE, staged_on=server_id, updated_at=now)
    )
    if (
        await conn.execute(
            sa.select(replicas.c.instance_id).where(
                replicas.c.sha256 == sha256, replicas.c.state.in_([PRESENT, PENDING])
            )
        )
    ).first():
        return None
    target = await emptiest_running(conn, exclude=set())
    if target is not None:
        await set_replica(conn, sha256, target, PENDING, now)
    return target


async def emptiest_running(conn: AsyncConnection, exclude: set[str]) -> str | None:
    load = await bytes_held(conn)
    q = sa.select(instances.c.id).where(
        instances.c.state == InstanceState.RUNNING, instances.c.lost_at.is_(None)
    )
    ids = [i for i in (await conn.execute(q)).scalars() if i not in exclude]
    return min(ids, key=lambda i: (load.get(i, 0), i)) if ids else None


async def bytes_held(conn: AsyncConnection) -> dict[str, int]:
    q = (
        sa.select(replicas.c.instance_id, sa.func.sum(objects.c.size))
        .select_from(replicas.join(objects, objects.c.sha256 == replicas.c.sha256))
        .where(replicas.c.state.in_([PRESENT, PENDING]))
        .group_by(replicas.c.instance_id)
    )
    return {i: int(n or 0) for i, n in (await conn.execute(q)).all()}


async def unavailable(conn: AsyncConnection, shas: list[str]) -> list[str]:
    """Which of these objects are unknown or lost (a job cannot take them as inputs)."""
    live = set(
        (
            await conn.execute(
                sa.select(objects.c.sha256).where(
                    objects.c.sha256.in_(shas), objects.c.state == ObjectState.LIVE
                )
            )
        ).scalars()
    )
    return [s for s in shas if s not in live]


async def unstage_placed(conn: AsyncConnection, server_id: str) -> list[str]:
    """Uploads staged on `server_id` that an instance now holds: no longer staged.
    Returns their sha256 (the server deletes its staged copies)."""
    q = (
        sa.select(objects.c.sha256)
        .where(objects.c.staged_on == server_id)
        .where(
            objects.c.sha256.in_(sa.select(replicas.c.sha256).where(replicas.c.state == PRESENT))
        )
    )
    shas = list((await conn.execute(q)).scalars().all())
    if shas:
        await conn.execute(
            sa.update(objects).where(objects.c.sha256.in_(shas)).values(staged_on=None)
        )
    return shas
