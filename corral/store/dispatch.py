"""Placing queued jobs, handing attempts to agents, and reaping the ones that died.

Rows are claimed with FOR UPDATE SKIP LOCKED on PostgreSQL (Database.claim), so
several servers' dispatchers and reapers never process one job or instance at once.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.api import KillOrder, ObservedAttempt, StartOrder
from corral.domain.instances import InstanceState
from corral.domain.jobs import LIVE_ATTEMPT_STATES, AttemptState, JobState
from corral.domain.placement import (
    Capacity,
    JobDemand,
    first_page,
    fits_anywhere,
    has_room,
    place,
    waiting_reason,
)
from corral.domain.sandbox import DEFAULT_LOG_LIMIT
from corral.domain.tokens import hash_secret, same_hash
from corral.store import jobs as jobs_repo
from corral.store import objects
from corral.store.db import Database, holds_sqlite_write_lock
from corral.store.schema import instances, job_attempts, jobs
from corral.store.sealing import sealer_of

_LIVE = sorted(s.value for s in LIVE_ATTEMPT_STATES)

# Statements run per dispatcher pass and per agent exchange, built once (bind
# parameters for what varies; an `expanding` one for a list).
FIRST_LOOK = 8  # queued jobs a pass reads before it reads the instances' room
_QUEUED = (
    sa.select(jobs.c.id, jobs.c.cpus, jobs.c.memory_mb, jobs.c.fleet, jobs.c.reason)
    .where(jobs.c.state == JobState.QUEUED, jobs.c.id > sa.bindparam("q_after"))
    .order_by(jobs.c.id)
    .limit(sa.bindparam("q_batch"))
)
# running instances with what their live attempts use: one statement, one snapshot
_LIVE_ON = sa.and_(job_attempts.c.instance_id == instances.c.id, job_attempts.c.state.in_(_LIVE))
_ROOM = (
    sa.select(
        instances.c.id,
        instances.c.fleet,
        instances.c.cpus,
        instances.c.memory_mb,
        sa.func.sum(job_attempts.c.cpus).label("used_cpus"),
        sa.func.sum(job_attempts.c.memory_mb).label("used_memory_mb"),
        sa.func.count(job_attempts.c.job_id).label("n"),
    )
    .select_from(instances.outerjoin(job_attempts, _LIVE_ON))
    .where(instances.c.state == InstanceState.RUNNING, instances.c.lost_at.is_(None))
    .group_by(
        instances.c.id,
        instances.c.fleet,
        instances.c.cpus,
        instances.c.memory_mb,
        instances.c.created_at,
    )
    .order_by(instances.c.created_at, instances.c.id)
)
# those with cpu left: all a placement can use (every job asks for some cpu), and in a
# busy fleet few of its instances, not all of them turned into objects each pass
_ROOM_LEFT = _ROOM.having(
    instances.c.cpus - sa.func.coalesce(sa.func.sum(job_attempts.c.cpus), 0) > 0
)
_ROOM_OF = _ROOM.where(instances.c.id.in_(sa.bindparam("c_ids", expanding=True)))
_UNDELIVERED = (
    sa.select(
        job_attempts.c.job_id,
        job_attempts.c.number,
        jobs.c.command,
        jobs.c.env,
        jobs.c.secret_env,
        jobs.c.cpus,
        jobs.c.memory_mb,
        jobs.c.inputs,
        jobs.c.workdir,
        jobs.c.log_limit,
    )
    .select_from(job_attempts.join(jobs, jobs.c.id == job_attempts.c.job_id))
    .where(
        job_attempts.c.instance_id == sa.bindparam("d_instance_id"),
        job_attempts.c.state == AttemptState.ISSUED,
        job_attempts.c.token_hash.is_(None),
        jobs.c.current_attempt == job_attempts.c.number,
        jobs.c.state == JobState.LOCKED,
    )
    .order_by(job_attempts.c.job_id)
)
_OBSERVED = (
    sa.select(
        job_attempts.c.job_id,
        job_attempts.c.number,
        job_attempts.c.state,
        job_attempts.c.token_hash,
        job_attempts.c.instance_id,
        jobs.c.current_attempt,
        jobs.c.state.label("job_state"),
    )
    .select_from(job_attempts.join(jobs, jobs.c.id == job_attempts.c.job_id))
    .where(
        sa.tuple_(job_attempts.c.job_id, job_attempts.c.number).in_(
            sa.bindparam("k_keys", expanding=True)
        )
    )
)


@dataclass(frozen=True)
class Placement:
    job_id: int
    attempt: int
    instance_id: str


async def lock_jobs(
    conn: AsyncConnection, db: Database, now: float, *, batch: int = 200, explain: bool = True
) -> list[Placement]:
    """Lock up to `batch` queued jobs onto instances with room for them.

    Each lock bumps the job's attempt number and creates the attempt row; its token
    is issued later, when the instance's agent collects it (see deliver_attempts).

    `explain`: also read the first `batch` queued jobs whatever the room, and give a
    job no instance could ever hold its reason (the dispatcher does it once a second;
    in between a pass reads only as much of the queue as the room can take)."""
    # Plan on every running instance, read without locks: an instance a heartbeat
    # holds for a moment is busy, not full. Then lock only the instances the plan
    # uses (waiting for them, in id order), re-read their room and plan again on
    # those: another server's dispatcher may have filled them meanwhile, and a drain
    # or retirement waits for this transaction, so no job lands on a leaving instance.
    # The queue first: passes run on every wake, and an empty queue then costs one
    # indexed read, no instance's room. An explaining pass reads the first `batch`
    # and every instance (could a job run were they idle?); the others read a first
    # look, then only instances with cpu left (all a placement can use), then more of
    # the queue while the room lasts.
    look = batch if explain else min(FIRST_LOOK, batch)
    queued = await _queue_page(conn, db, 0, look)
    if not queued:
        return []
    everyone = await _capacities(conn, None, room_left_only=not explain)
    if len(queued) == look < batch:  # more may wait
        queued = await _queue_more(conn, db, everyone, batch, queued)
    demands = _demands(queued)
    # one writer at a time on SQLite, and this transaction has been it since its first
    # read: the room read above cannot change before it commits (no lock to take,
    # nothing to read again; `place` updates what it is given, so keep a copy). The
    # plan is made on `everyone` itself: after it, only the explanation reads it, and
    # that asks what each instance could hold when idle
    unchanged = [c.copy() for c in everyone] if holds_sqlite_write_lock(conn) else None
    chosen = sorted({i for _j, i in place(demands, everyone)})
    capacities = []
    if chosen and unchanged is not None:
        capacities = [c for c in unchanged if c.instance_id in chosen]
    elif chosen:
        locked = (
            await conn.execute(
                db.lock(
                    sa.select(instances.c.id)
                    .where(instances.c.id.in_(chosen))
                    .order_by(instances.c.id)
                )
            )
        ).all()
        capacities = await _capacities(conn, [r.id for r in locked])
    placements = await _lock_planned(conn, place(demands, capacities), now)
    if explain:
        await _explain_waiting(conn, demands, everyone, {p.job_id for p in placements}, queued)
    return placements


def _demands(rows: Sequence) -> list[JobDemand]:
    return [JobDemand(q["id"], q["cpus"], q["memory_mb"], q["fleet"]) for q in rows]


async def _queue_page(conn: AsyncConnection, db: Database, after: int, size: int) -> list:
    """Up to `size` queued jobs after id `after`, in queue order (claimed on PostgreSQL)."""
    return list(
        (await conn.execute(db.claim(_QUEUED), {"q_after": after, "q_batch": size}))
        .mappings()
        .all()
    )


async def _queue_more(
    conn: AsyncConnection, db: Database, room: list[Capacity], batch: int, rows: list
) -> list:
    """The first look at the queue (`rows`) and, while a plan on a copy of `room`
    leaves room, further pages (about as many one-cpu jobs as there is room for, then
    each twice the last), up to `batch` in all. A pass places what the one read of
    `batch` jobs would place: a job read past the point where no room is left could
    not have been placed either."""
    rows = list(rows)
    scratch = [c.copy() for c in room]
    place(_demands(rows), scratch)
    size = max(len(rows), first_page(room, batch) - len(rows))
    while len(rows) < batch and has_room(scratch):
        want = min(size, batch - len(rows))
        page = await _queue_page(conn, db, rows[-1]["id"], want)
        rows.extend(page)
        place(_demands(page), scratch)
        if len(page) < want:
            break  # the queue ends here
        size *= 2
    return rows


async def _lock_planned(
    conn: AsyncConnection, plan: list[tuple[int, str]], now: float
) -> list[Placement]:
    """Lock the planned (job, instance) pairs with two statements whatever their number:
    one UPDATE of the jobs (each gets its planned instance; a job no longer queued is
    left alone and not returned) and one INSERT of their attempts."""
    if not plan:
        return []
    where = dict(plan)
    if len(set(where.values())) == 1:
        instance_id: sa.ColumnElement = sa.literal(plan[0][1])
    else:
        instance_id = sa.case(where, value=jobs.c.id)
    locked = {
        row.id: row
        for row in await conn.execute(
            sa.update(jobs)
            .where(jobs.c.id.in_(list(where)), jobs.c.state == JobState.QUEUED)
            .values(
                state=JobState.LOCKED,
                current_attempt=jobs.c.current_attempt + 1,
                instance_id=instance_id,
                updated_at=now,
                reason=None,
            )
            .returning(jobs.c.id, jobs.c.current_attempt, jobs.c.cpus, jobs.c.memory_mb)
        )
    }
    placements = [
        Placement(job_id, locked[job_id].current_attempt, instance)
        for job_id, instance in plan
        if job_id in locked
    ]
    if placements:
        # parameters as a list (executemany), not a multi-row VALUES: a statement of
        # one shape, compiled once, whatever the number of rows
        await conn.execute(
            sa.insert(job_attempts),
            [
                {
                    "job_id": p.job_id,
                    "number": p.attempt,
                    "instance_id": p.instance_id,
                    "state": AttemptState.ISSUED,
                    "cpus": locked[p.job_id].cpus,
                    "memory_mb": locked[p.job_id].memory_mb,
                    "created_at": now,
                    "updated_at": now,
                }
                for p in placements
            ],
        )
    return placements


async def _capacities(
    conn: AsyncConnection, ids: list[str] | None, *, room_left_only: bool = False
) -> list[Capacity]:
    """Running instances (all, those with cpu left, or those of `ids`) with the room
    their live attempts leave."""
    if ids is None:
        result = await conn.execute(_ROOM_LEFT if room_left_only else _ROOM)
    else:
        result = await conn.execute(_ROOM_OF, {"c_ids": ids})
    out = []
    for i, row in enumerate(result.all()):
        out.append(
            Capacity(
                instance_id=row.id,
                fleet=row.fleet,
                cpus=row.cpus,
                memory_mb=row.memory_mb,
                used_cpus=float(row.used_cpus or 0),
                used_memory_mb=int(row.used_memory_mb or 0),
                running=int(row.n),
                order=(i,),
            )
        )
    return out


async def _explain_waiting(conn, demands, capacities, placed, queued) -> None:
    """A job no instance could ever hold says so in its reason, instead of waiting mutely."""
    reasons = {q["id"]: q["reason"] for q in queued}
    changes: dict[str | None, list[int]] = {}
    fits: dict[tuple, bool] = {}  # per shape: queued jobs are mostly of a few
    for d in demands:
        if d.job_id in placed:
            continue
        shape = (d.fleet, d.cpus, d.memory_mb)
        if shape not in fits:
            fits[shape] = fits_anywhere(d, capacities)
        why = None if fits[shape] else waiting_reason(d)
        if why != reasons.get(d.job_id) and (
            why or reasons.get(d.job_id, "").startswith("waiting")
        ):
            changes.setdefault(why, []).append(d.job_id)
    # one UPDATE per distinct reason (jobs of one shape share theirs), not per job
    for why, ids in changes.items():
        await conn.execute(sa.update(jobs).where(jobs.c.id.in_(ids)).values(reason=why))


def _environment(
    conn: AsyncConnection, env: dict[str, str], secret_env: dict[str, str] | None
) -> dict[str, str]:
    """The job's environment with its secret values unsealed: only ever for the start
    order of the agent that runs the attempt."""
    if not secret_env:
        return env
    sealer = sealer_of(conn)
    return {**env, **{k: sealer.unseal(v) for k, v in secret_env.items()}}


def new_attempt_secret() -> str:
    return secrets.token_urlsafe(24)


async def deliver_attempts(
    conn: AsyncConnection, instance_id: str, now: float, server_url: str = ""
) -> list[StartOrder]:
    """Issue tokens for the attempts placed on this instance and not yet handed out.

    A token is issued exactly once (`WHERE token_hash IS NULL`) and only its hash is
    kept. If the reply carrying it is lost, the attempt never starts and the reaper
    requeues it after the start timeout, with a new attempt and a new token."""
    rows = (await conn.execute(_UNDELIVERED, {"d_instance_id": instance_id})).mappings().all()
    if not rows:
        return []
    secrets_of = {r["job_id"]: new_attempt_secret() for r in rows}
    hashes = {job_id: hash_secret(secret) for job_id, secret in secrets_of.items()}
    # one UPDATE for all of them (one row per job: its current attempt); a token is
    # issued only where none was, and RETURNING says which
    issued = {
        (row.job_id, row.number)
        for row in (
            await conn.execute(
                sa.update(job_attempts)
                .where(
                    sa.tuple_(job_attempts.c.job_id, job_attempts.c.number).in_(
                        [(r["job_id"], r["number"]) for r in rows]
                    ),
                    job_attempts.c.state == AttemptState.ISSUED,
                    job_attempts.c.token_hash.is_(None),
                )
                .values(
                    token_hash=sa.case(hashes, value=job_attempts.c.job_id),
                    delivered_at=now,
                    updated_at=now,
                )
                .returning(job_attempts.c.job_id, job_attempts.c.number)
            )
        ).all()
    }
    orders = []
    for r in rows:
        secret = secrets_of[r["job_id"]]
        if (r["job_id"], r["number"]) in issued:
            inputs = (
                await objects.fetches_for(conn, instance_id, r["inputs"], now, server_url)
                if r["inputs"]
                else []
            )
            workdir = (
                await objects.fetches_for(conn, instance_id, [r["workdir"]], now, server_url)
                if r["workdir"]
                else []
            )
            orders.append(
                StartOrder(
                    job_id=r["job_id"],
                    attempt=r["number"],
                    token=secret,
                    command=r["command"],
                    env=_environment(conn, r["env"], r["secret_env"]),
                    cpus=r["cpus"],
                    memory_mb=r["memory_mb"],
                    inputs=inputs,
                    workdir=workdir[0] if workdir else None,
                    log_limit=r["log_limit"] or DEFAULT_LOG_LIMIT,
                )
            )
    return orders


async def kills_for(
    conn: AsyncConnection, instance_id: str, observed: list[ObservedAttempt]
) -> list[KillOrder]:
    """Which of the attempts an agent says it runs must die: any whose token is no
    longer the job's current one, or that is not this instance's to run."""
    if not observed:
        return []
    keys = [(o.job_id, o.attempt) for o in observed]
    rows = (await conn.execute(_OBSERVED, {"k_keys": keys})).mappings().all()
    by_key = {(r["job_id"], r["number"]): r for r in rows}
    kills = []
    for o in observed:
        r = by_key.get((o.job_id, o.attempt))
        if r is None:
            why = "no such attempt"
        elif r["instance_id"] != instance_id:
            why = f"attempt belongs to instance {r['instance_id']}"
        elif not same_hash(r["token_hash"], hash_secret(o.token)):
            why = "token does not match"
        elif r["current_attempt"] != o.attempt:
            why = f"stale: job is on attempt {r['current_attempt']}"
        elif r["state"] in (AttemptState.SUCCEEDED, AttemptState.FAILED):
            continue  # its result is recorded; the runner is on its way out
        elif r["state"] not in _LIVE:
            why = f"attempt is {r['state']}" + (
                " (job cancelled)" if r["job_state"] == JobState.CANCELLED else ""
            )
        else:
            continue
        kills.append(KillOrder(job_id=o.job_id, attempt=o.attempt, reason=why))
    return kills


async def live_attempts_on(conn: AsyncConnection, instance_id: str):
    q = sa.select(job_attempts).where(
        job_attempts.c.instance_id == instance_id, job_attempts.c.state.in_(_LIVE)
    )
    return (await conn.execute(q)).mappings().all()


async def claim_unstarted(conn: AsyncConnection, db: Database, cutoff: float):
    """Attempts handed out (or placed) before `cutoff` whose runner never started."""
    q = db.claim(
        sa.select(
            job_attempts.c.job_id,
            job_attempts.c.number,
            job_attempts.c.instance_id,
            sa.func.coalesce(job_attempts.c.delivered_at, job_attempts.c.created_at).label(
                "handed_out_at"
            ),
            job_attempts.c.updated_at,
        )
        .where(
            job_attempts.c.state == AttemptState.ISSUED,
            sa.func.coalesce(job_attempts.c.delivered_at, job_attempts.c.created_at) < cutoff,
        )
        .limit(500)
    )
    return (await conn.execute(q)).mappings().all()


async def claim_silent(conn: AsyncConnection, db: Database, cutoff: float):
    """Running attempts whose runner has not been heard from since `cutoff`."""
    q = db.claim(
        sa.select(
            job_attempts.c.job_id,
            job_attempts.c.number,
            job_attempts.c.instance_id,
            sa.func.coalesce(job_attempts.c.delivered_at, job_attempts.c.created_at).label(
                "handed_out_at"
            ),
            job_attempts.c.updated_at,
        )
        .where(
            job_attempts.c.state == AttemptState.RUNNING,
            job_attempts.c.updated_at < cutoff,
        )
        .limit(500)
    )
    return (await conn.execute(q)).mappings().all()


async def lose_all_on(
    conn: AsyncConnection, instance_id: str, why: str, now: float
) -> list[tuple[int, int, str | None]]:
    out = []
    for a in await live_attempts_on(conn, instance_id):
        state = await jobs_repo.lose_attempt(
            conn, a["job_id"], a["number"], why, now, instance_id=instance_id
        )
        out.append((a["job_id"], a["number"], state))
    return out
