"""Jobs, attempts and logs.

Every update a runner or agent makes is fenced: it names (job, attempt, token) and
is applied by a single conditional UPDATE on the attempt row
(`... WHERE job_id = :id AND number = :n AND token_hash = :h AND state IN (...)`),
never read-then-write. Whatever else the update writes happens after that fence in
the same transaction, so a stale token changes nothing at all.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.api import JobSubmit, LogChunkIn, OutputFile
from corral.domain.errors import IllegalTransition, StaleToken
from corral.domain.jobs import (
    ACTIVE_JOB_STATES,
    FINAL_JOB_STATES,
    LIVE_ATTEMPT_STATES,
    AttemptState,
    JobState,
    after_command_exit,
    after_lost_attempt,
    attempt_sources,
    job_sources,
)
from corral.domain.sandbox import DEFAULT_LOG_LIMIT, cut_log
from corral.domain.tokens import hash_secret, well_formed
from corral.store import events, objects
from corral.store.db import holds_sqlite_write_lock, insert_ignoring_duplicates
from corral.store.schema import job_attempts, jobs, log_chunks, submit_keys
from corral.store.sealing import sealer_of

_MEASURED = ("cpu_seconds", "peak_memory_mb", "limits_enforced", "notes")


class JobNotFound(KeyError):
    pass


class IdempotencyConflict(Exception):
    pass


class JobConflict(Exception):
    """The request is well-formed but the job's state forbids it (HTTP 409)."""


def _values(states: Iterable) -> list[str]:
    return [str(s) for s in states]


# ---- reading ---------------------------------------------------------------------------


# Statements the per-job paths run on every call are built once (bind parameters for
# what varies): building one costs more than running it on SQLite, and a built
# statement's cache key is computed once, not per execution.
_GET_JOB = sa.select(jobs).where(jobs.c.id == sa.bindparam("g_job_id"))
_GET_ATTEMPT = sa.select(job_attempts).where(
    job_attempts.c.job_id == sa.bindparam("g_job_id"),
    job_attempts.c.number == sa.bindparam("g_number"),
)


async def get_job(conn: AsyncConnection, job_id: int) -> sa.RowMapping | None:
    return (await conn.execute(_GET_JOB, {"g_job_id": job_id})).mappings().first()


async def require_job(conn: AsyncConnection, job_id: int) -> sa.RowMapping:
    row = await get_job(conn, job_id)
    if row is None:
        raise JobNotFound(job_id)
    return row


async def list_attempts(conn: AsyncConnection, job_id: int):
    q = (
        sa.select(job_attempts)
        .where(job_attempts.c.job_id == job_id)
        .order_by(job_attempts.c.number)
    )
    return (await conn.execute(q)).mappings().all()


async def get_attempt(conn: AsyncConnection, job_id: int, number: int) -> sa.RowMapping | None:
    params = {"g_job_id": job_id, "g_number": number}
    return (await conn.execute(_GET_ATTEMPT, params)).mappings().first()


async def list_jobs(
    conn: AsyncConnection,
    *,
    states: list[str] | None = None,
    limit: int = 100,
    before_id: int | None = None,
    search: str | None = None,
):
    """Newest first. `search`: case-insensitive text in the name or the command, or
    the job id itself."""
    q = sa.select(jobs).order_by(jobs.c.id.desc()).limit(limit)
    if states:
        q = q.where(jobs.c.state.in_(states))
    if search:
        needle = search.lower()
        match = sa.or_(
            sa.func.lower(jobs.c.name).contains(needle, autoescape=True),
            sa.func.lower(sa.cast(jobs.c.command, sa.Text)).contains(needle, autoescape=True),
        )
        if search.isdigit():
            match = sa.or_(match, jobs.c.id == int(search))
        q = q.where(match)
    if before_id is not None:
        q = q.where(jobs.c.id < before_id)
    return (await conn.execute(q)).mappings().all()


async def count_jobs_by_state(conn: AsyncConnection) -> dict[str, int]:
    q = sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)
    return dict((await conn.execute(q)).all())


INT32_MAX = 2**31 - 1


async def read_logs(
    conn: AsyncConnection, job_id: int, attempt: int, after_seq: int, limit: int = 500
):
    if after_seq >= INT32_MAX and conn.dialect.name == "postgresql":
        # no stored seq is larger (a 32-bit integer there), and the parameter would not
        # fit: `Job.wait` asks past every chunk (2**62) to hear only of the job's end
        return []
    q = (
        sa.select(log_chunks.c.seq, log_chunks.c.stream, log_chunks.c.data)
        .where(
            log_chunks.c.job_id == job_id,
            log_chunks.c.attempt == attempt,
            log_chunks.c.seq > after_seq,
        )
        .order_by(log_chunks.c.seq)
        .limit(limit)
    )
    return (await conn.execute(q)).mappings().all()


# ---- user actions ----------------------------------------------------------------------


async def check_server_key(conn: AsyncConnection) -> None:
    """Raise SealError if the newest job's secrets do not open with this server's key."""
    sealed = (
        await conn.execute(
            sa.select(jobs.c.secret_env)
            .where(jobs.c.secret_env.is_not(None))
            .order_by(jobs.c.id.desc())
            .limit(1)
        )
    ).scalar()
    for value in list((sealed or {}).values())[:1]:
        sealer_of(conn).unseal(value)


def _job_row(conn: AsyncConnection, spec: JobSubmit, now: float) -> dict:
    return dict(
        name=spec.name,
        state=JobState.QUEUED,
        command=spec.command,
        env=spec.env,
        inputs=spec.inputs,
        fleet=spec.fleet,
        cpus=spec.cpus,
        memory_mb=spec.memory_mb,
        max_attempts=spec.max_attempts,
        workdir=spec.workdir,
        log_limit=spec.log_limit,
        current_attempt=0,
        created_at=now,
        updated_at=now,
        # omitted, not JSON null, without secrets: check_server_key finds the sealed
        **(
            {"secret_env": {k: sealer_of(conn).seal(v) for k, v in spec.secret_env.items()}}
            if spec.secret_env
            else {}
        ),
    )


async def submit_row(conn: AsyncConnection, spec: JobSubmit, now: float) -> sa.RowMapping:
    """The new job's whole row, as it went in (what a submit answers with: no read
    after the write)."""
    result = await conn.execute(
        sa.insert(jobs).values(**_job_row(conn, spec, now)).returning(*jobs.c)
    )
    return result.mappings().one()


async def submit(conn: AsyncConnection, spec: JobSubmit, now: float) -> int:
    return int((await submit_row(conn, spec, now))["id"])


def request_sha256(spec: JobSubmit) -> str:
    """What identifies a submit's request: its canonical JSON (sorted keys)."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def submit_once(
    conn: AsyncConnection, spec: JobSubmit, now: float, principal: str, key: str
) -> tuple[int, sa.RowMapping | None]:
    """Submit under an idempotency key: the first request with (principal, key) creates
    the job (its row is returned with its id), a retry of it gets that job's id again
    (and no row), and another request
    under the same key is refused. The job goes in, then its key unless the key is
    taken (ON CONFLICT DO NOTHING: of two racing first requests the second waits for
    the first to commit, then finds the key taken); a request that finds its key taken
    takes its job out again and answers with the first request's job. Two statements
    for a first request (there was a read first, and a savepoint around the inserts on
    PostgreSQL: three round trips more); retries, which are rare, pay the difference."""
    digest = request_sha256(spec)
    created = await submit_row(conn, spec, now)
    job_id = int(created["id"])
    stored = (
        await conn.execute(
            insert_ignoring_duplicates(conn, submit_keys)
            .values(
                principal=principal, key=key, request_sha256=digest, job_id=job_id, created_at=now
            )
            .on_conflict_do_nothing(index_elements=[submit_keys.c.principal, submit_keys.c.key])
            .returning(submit_keys.c.job_id)
        )
    ).first()
    if stored is not None:
        return job_id, created
    await conn.execute(sa.delete(jobs).where(jobs.c.id == job_id))
    row = (
        (
            await conn.execute(
                sa.select(submit_keys).where(
                    submit_keys.c.principal == principal, submit_keys.c.key == key
                )
            )
        )
        .mappings()
        .first()
    )
    if row is None:  # taken, then gone again: cannot be, short of a hand in the database
        raise RuntimeError(f"Idempotency-Key {key!r} was taken and is gone")
    if row["request_sha256"] != digest:
        raise IdempotencyConflict(
            f"Idempotency-Key {key!r} was used for another request (job {row['job_id']}); "
            "use a new key for a new job"
        )
    return int(row["job_id"]), None


_TOP_JOB_ID = sa.select(sa.func.max(jobs.c.id))
_NEW_JOB = sa.insert(jobs)
TOP_ROWID = 2**63 - 1


async def submit_many(conn: AsyncConnection, specs: list[JobSubmit], now: float) -> list[int]:
    """Insert many jobs at once (multi-row INSERTs); their ids in the order given."""
    if not specs:
        return []  # an INSERT of no rows would insert one of defaults
    rows = [_job_row(conn, spec, now) for spec in specs]
    if len({frozenset(r) for r in rows}) > 1:  # some with secrets: their rows differ in keys
        return [await submit(conn, spec, now) for spec in specs]
    if holds_sqlite_write_lock(conn):
        # SQLite gives a new row the largest id + 1, and this transaction has held the
        # one write lock since its first statement: the ids the rows would get one by
        # one are known, so they go in one executemany (the RETURNING below, in the
        # order given, is one INSERT per row on SQLite)
        top = (await conn.execute(_TOP_JOB_ID)).scalar() or 0
        if top + len(rows) < TOP_ROWID:  # past it SQLite picks ids at random
            ids = list(range(top + 1, top + 1 + len(rows)))
            await conn.execute(_NEW_JOB, [{**r, "id": i} for r, i in zip(rows, ids, strict=True)])
            return ids
    result = await conn.execute(
        sa.insert(jobs).returning(jobs.c.id, sort_by_parameter_order=True), rows
    )
    return list(result.scalars().all())


async def _end_live_attempt(
    conn: AsyncConnection,
    job_id: int,
    number: int,
    target: AttemptState,
    reason: str,
    now: float,
) -> bool:
    result = await conn.execute(
        sa.update(job_attempts)
        .where(
            job_attempts.c.job_id == job_id,
            job_attempts.c.number == number,
            job_attempts.c.state.in_(_values(attempt_sources(target))),
        )
        .values(state=target, reason=reason, finished_at=now, updated_at=now)
    )
    return result.rowcount == 1


async def cancel(conn: AsyncConnection, job_id: int, now: float) -> sa.RowMapping:
    job = await require_job(conn, job_id)
    if job["state"] in FINAL_JOB_STATES:
        raise JobConflict(f"job {job_id} has already ended ({job['state']}): nothing to cancel")
    result = await conn.execute(
        sa.update(jobs)
        .where(jobs.c.id == job_id, jobs.c.state.in_(_values(job_sources(JobState.CANCELLED))))
        .values(
            state=JobState.CANCELLED, reason="cancelled by user", finished_at=now, updated_at=now
        )
        .returning(*jobs.c)
    )
    row = result.mappings().first()
    if row is None:
        fresh = await require_job(conn, job_id)
        raise JobConflict(f"job {job_id} has already ended ({fresh['state']}): nothing to cancel")
    if row["current_attempt"]:
        await _end_live_attempt(
            conn, job_id, row["current_attempt"], AttemptState.REVOKED, "job cancelled", now
        )
    await events.record(
        conn,
        now,
        "info",
        "job.cancelled",
        f"job {job_id} cancelled (was {job['state']})",
        job_id=job_id,
        instance_id=job["instance_id"],
    )
    return row


async def requeue(conn: AsyncConnection, job_id: int, now: float, why: str) -> sa.RowMapping:
    """Revoke the current attempt's token at once and queue the job for a new attempt."""
    job = await require_job(conn, job_id)
    if job["state"] not in ACTIVE_JOB_STATES:
        raise JobConflict(f"job {job_id} is {job['state']}; only locked or running jobs requeue")
    if job["current_attempt"] >= job["max_attempts"]:
        raise JobConflict(
            f"job {job_id} has used {job['current_attempt']} of max_attempts="
            f"{job['max_attempts']}; a requeue would exceed it"
        )
    n = job["current_attempt"]
    row = await _move_job(conn, job_id, n, JobState.QUEUED, now, reason=None, instance_id=None)
    if row is None:
        raise JobConflict(f"job {job_id} changed state; try again")
    await _end_live_attempt(conn, job_id, n, AttemptState.REVOKED, f"requeued: {why}", now)
    await events.record(
        conn,
        now,
        "info",
        "job.requeued",
        f"job {job_id} attempt {n} revoked and requeued: {why}",
        job_id=job_id,
        instance_id=job["instance_id"],
    )
    return row


# what the fenced moves of a job return to their callers (its JSON columns, command
# and environment, are not decoded for nothing)
_MOVED = (
    jobs.c.id,
    jobs.c.state,
    jobs.c.instance_id,
    jobs.c.current_attempt,
    jobs.c.max_attempts,
    jobs.c.created_at,
    jobs.c.started_at,
    jobs.c.finished_at,
)


@functools.cache
def _move_statement(target: JobState, keys: tuple[str, ...], whole: bool) -> sa.Update:
    """_move_job's UPDATE for this target and these columns (built once each)."""
    return (
        sa.update(jobs)
        .where(
            jobs.c.id == sa.bindparam("m_job_id"),
            jobs.c.current_attempt == sa.bindparam("m_attempt"),
            jobs.c.state.in_(sorted(_values(job_sources(target) & ACTIVE_JOB_STATES))),
        )
        .values(
            state=target,
            updated_at=sa.bindparam("m_now"),
            **{k: sa.bindparam(f"m_{k}") for k in keys},
        )
        .returning(*(jobs.c if whole else _MOVED))
    )


# the first start of a job stamps started_at; a later attempt's start keeps it
_START_JOB = (
    sa.update(jobs)
    .where(
        jobs.c.id == sa.bindparam("m_job_id"),
        jobs.c.current_attempt == sa.bindparam("m_attempt"),
        jobs.c.state.in_(sorted(_values(job_sources(JobState.RUNNING) & ACTIVE_JOB_STATES))),
    )
    .values(
        state=JobState.RUNNING,
        updated_at=sa.bindparam("m_now"),
        started_at=sa.func.coalesce(jobs.c.started_at, sa.bindparam("m_now")),
    )
    .returning(*_MOVED)
)


async def _move_job(
    conn: AsyncConnection,
    job_id: int,
    attempt: int,
    target: JobState,
    now: float,
    *,
    whole: bool = True,
    **values,
) -> sa.RowMapping | None:
    """Move the job to `target` only if `attempt` is still its current one and the
    transition table allows it from the state it is in — one statement. Returns the
    job's row (`whole=False`: only the _MOVED columns), None if it did not move."""
    if target in FINAL_JOB_STATES:
        values.setdefault("finished_at", now)
    keys = tuple(sorted(values))
    params = {f"m_{k}": v for k, v in values.items()}
    params.update(m_job_id=job_id, m_attempt=attempt, m_now=now)
    result = await conn.execute(_move_statement(target, keys, whole), params)
    return result.mappings().first()


# ---- fenced updates from runners and agents ---------------------------------------------


async def _stale(conn: AsyncConnection, job_id: int, number: int) -> StaleToken:
    """Explain why a fence did not pass (read only for the message)."""
    job = await get_job(conn, job_id)
    if job is None:
        return StaleToken(f"job {job_id} does not exist")
    attempt = await get_attempt(conn, job_id, number)
    if attempt is None:
        return StaleToken(f"job {job_id} has no attempt {number}")
    if job["current_attempt"] != number:
        return StaleToken(
            f"attempt {number} of job {job_id} is stale: the current attempt is "
            f"{job['current_attempt']} (this one is {attempt['state']})"
        )
    return StaleToken(
        f"attempt {number} of job {job_id} does not accept this update "
        f"(attempt {attempt['state']}, job {job['state']}, or the token does not match)"
    )


async def attempt_token_issued(conn: AsyncConnection, job_id: int, number: int, token: str) -> bool:
    """Whether `token` was issued for this attempt (current or since revoked): the body
    guard's check before it reads a runner's body. Fencing stays with `fence`."""
    if not token or not well_formed(token):
        return False
    row = await conn.execute(
        sa.select(job_attempts.c.number).where(
            job_attempts.c.job_id == job_id,
            job_attempts.c.number == number,
            job_attempts.c.token_hash == hash_secret(token),
        )
    )
    return row.first() is not None


@functools.cache
def _fence_statement(states: tuple[str, ...], keys: tuple[str, ...]) -> sa.Update:
    """fence's UPDATE for these allowed states and these columns (built once each)."""
    return (
        sa.update(job_attempts)
        .where(
            job_attempts.c.job_id == sa.bindparam("f_job_id"),
            job_attempts.c.number == sa.bindparam("f_number"),
            job_attempts.c.token_hash == sa.bindparam("f_hash"),
            job_attempts.c.state.in_(list(states)),
        )
        .values(updated_at=sa.bindparam("f_now"), **{k: sa.bindparam(f"f_{k}") for k in keys})
        .returning(*job_attempts.c)
    )


async def fence(
    conn: AsyncConnection,
    job_id: int,
    number: int,
    token: str | None,
    now: float,
    states: Iterable[AttemptState],
    **values,
) -> sa.RowMapping:
    """The one fencing primitive: a conditional UPDATE of the attempt row that passes
    only for the current token in an allowed state. Raises StaleToken otherwise."""
    if not token or not well_formed(token):
        raise StaleToken(f"attempt {number} of job {job_id}: malformed attempt token")
    statement = _fence_statement(tuple(sorted(_values(states))), tuple(sorted(values)))
    params = {f"f_{k}": v for k, v in values.items()}
    params.update(f_job_id=job_id, f_number=number, f_hash=hash_secret(token), f_now=now)
    row = (await conn.execute(statement, params)).mappings().first()
    if row is None:
        raise await _stale(conn, job_id, number)
    return row


@dataclass(frozen=True)
class Started:
    job_state: str
    recorded: bool  # False: a retried start of an attempt that already runs
    submit_to_start: float | None  # the job's first start: seconds since its submit


async def start_attempt(
    conn: AsyncConnection, job_id: int, number: int, token: str, now: float
) -> str:
    return (await record_start(conn, job_id, number, token, now)).job_state


async def record_start(
    conn: AsyncConnection, job_id: int, number: int, token: str, now: float
) -> Started:
    """The runner started the command: the attempt and its job are running."""
    try:
        await fence(
            conn,
            job_id,
            number,
            token,
            now,
            [AttemptState.ISSUED],
            state=AttemptState.RUNNING,
            started_at=now,
        )
    except StaleToken:
        # a retried start (the reply was lost) is fine if this token already runs
        await fence(conn, job_id, number, token, now, [AttemptState.RUNNING])
        return Started(JobState.RUNNING, False, None)
    params = {"m_job_id": job_id, "m_attempt": number, "m_now": now}
    row = (await conn.execute(_START_JOB, params)).mappings().first()
    if row is None:
        raise await _stale(conn, job_id, number)
    first = row["started_at"] == now
    return Started(row["state"], True, max(0.0, now - row["created_at"]) if first else None)


async def touch_attempt(
    conn: AsyncConnection, job_id: int, number: int, token: str, now: float
) -> None:
    await fence(conn, job_id, number, token, now, LIVE_ATTEMPT_STATES)


def decode_chunks(chunks: list[LogChunkIn]) -> list[tuple[int, str, bytes]]:
    out: list[tuple[int, str, bytes]] = []
    for c in chunks:
        try:
            out.append((c.seq, c.stream, base64.b64decode(c.data, validate=True)))
        except (binascii.Error, ValueError):
            raise ValueError(f"chunks[seq={c.seq}].data is not valid base64") from None
    return out


async def append_logs(
    conn: AsyncConnection,
    job_id: int,
    number: int,
    token: str,
    chunks: list[tuple[int, str, bytes]],
    now: float,
) -> None:
    """Store log chunks (a retried chunk is stored once), up to the job's log limit:
    the chunk that crosses it is cut and ends with the marker, later ones are dropped.
    The runner cuts the same way; this holds whatever a runner sends."""
    attempt = await fence(conn, job_id, number, token, now, LIVE_ATTEMPT_STATES)
    if not chunks:
        return
    limit = (
        await conn.execute(sa.select(jobs.c.log_limit).where(jobs.c.id == job_id))
    ).scalar_one() or DEFAULT_LOG_LIMIT
    used, rows, sizes = attempt["log_bytes"] or 0, [], {}
    for seq, stream, data in sorted(chunks):
        kept, _cut = cut_log(used, limit, data)
        if not kept:
            break
        sizes[seq] = len(kept)
        rows.append(
            {
                "job_id": job_id,
                "attempt": number,
                "seq": seq,
                "stream": stream,
                "data": kept,
                "created_at": now,
            }
        )
        used += len(kept)
    if not rows:
        return
    stmt = insert_ignoring_duplicates(conn, log_chunks).values(rows)
    inserted = (
        (await conn.execute(stmt.on_conflict_do_nothing().returning(log_chunks.c.seq)))
        .scalars()
        .all()
    )
    added = sum(sizes[seq] for seq in inserted)
    if added:
        await conn.execute(
            sa.update(job_attempts)
            .where(job_attempts.c.job_id == job_id, job_attempts.c.number == number)
            .values(log_bytes=job_attempts.c.log_bytes + added)
        )


async def finish_attempt(
    conn: AsyncConnection,
    job_id: int,
    number: int,
    token: str,
    exit_code: int | None,
    reason: str | None,
    now: float,
    outputs: list[OutputFile] | None = None,
    measured: dict | None = None,
    chunks: list[tuple[int, str, bytes]] | None = None,
) -> tuple[str, bool]:
    """Record the command's result and its outputs, together. Returns (job state,
    recorded now?). A retry of the same finish (its reply was lost) is answered
    without writing anything again. `measured`: what the sandbox measured and noted
    (cpu_seconds, peak_memory_mb, limits_enforced, notes). `chunks`: the attempt's
    last log chunks, stored first (as append_logs does, fenced and within the log
    limit), so the output and the result arrive together."""
    if chunks:
        try:
            await append_logs(conn, job_id, number, token, chunks, now)
        except StaleToken:
            pass  # a retried finish (stored the first time) or a stale token: see below
    target_attempt = AttemptState.SUCCEEDED if exit_code == 0 else AttemptState.FAILED
    target_job = after_command_exit(exit_code) if exit_code is not None else JobState.FAILED
    if exit_code is None and not reason:
        reason = "the command did not run"
    elif exit_code not in (None, 0) and not reason:
        reason = f"exited with code {exit_code}"
    try:
        attempt_row = await fence(
            conn,
            job_id,
            number,
            token,
            now,
            [AttemptState.RUNNING],
            state=target_attempt,
            exit_code=exit_code,
            reason=reason,
            finished_at=now,
            **{k: v for k, v in (measured or {}).items() if k in _MEASURED},
        )
    except StaleToken:
        attempt = await get_attempt(conn, job_id, number)
        job = await get_job(conn, job_id)
        if (
            attempt is not None
            and job is not None
            and attempt["token_hash"] == hash_secret(token or "")
            and attempt["state"] == target_attempt
            and attempt["exit_code"] == exit_code
            and job["result_attempt"] == number
        ):
            return job["state"], False
        raise
    row = await _move_job(
        conn,
        job_id,
        number,
        target_job,
        now,
        whole=False,
        exit_code=exit_code,
        reason=reason,
        result_attempt=number,
    )
    if row is None:
        raise await _stale(conn, job_id, number)
    if outputs:
        await objects.record_outputs(conn, job_id, number, attempt_row["instance_id"], outputs, now)
    if target_job is JobState.FAILED:
        await events.record(
            conn,
            now,
            "info",
            "job.failed",
            f"job {job_id} failed: {reason}",
            job_id=job_id,
            instance_id=row["instance_id"],
        )
    return row["state"], True


async def lose_attempt(
    conn: AsyncConnection,
    job_id: int,
    number: int,
    why: str,
    now: float,
    *,
    token: str | None = None,
    instance_id: str | None = None,
) -> str | None:
    """The attempt ended without its command finishing (runner crash, instance lost,
    never started). The job is requeued while attempts remain, else fails saying why.

    With `token` (runner or agent reporting) the update is fenced by it; without
    (the reaper) it applies only while the attempt is live and still the job's
    current one. Returns the job's new state, or None if nothing changed."""
    if token is not None:
        await fence(
            conn,
            job_id,
            number,
            token,
            now,
            LIVE_ATTEMPT_STATES,
            state=AttemptState.LOST,
            reason=why,
            finished_at=now,
        )
    else:
        result = await conn.execute(
            sa.update(job_attempts)
            .where(
                job_attempts.c.job_id == job_id,
                job_attempts.c.number == number,
                job_attempts.c.state.in_(_values(LIVE_ATTEMPT_STATES)),
            )
            .values(state=AttemptState.LOST, reason=why, finished_at=now, updated_at=now)
        )
        if result.rowcount != 1:
            return None
    job = await require_job(conn, job_id)
    outcome = after_lost_attempt(number, job["max_attempts"], why)
    if outcome.job_state is JobState.QUEUED:
        row = await _move_job(
            conn,
            job_id,
            number,
            JobState.QUEUED,
            now,
            whole=False,
            instance_id=None,
            reason=f"requeued after attempt {number}: {why}",
        )
    else:
        row = await _move_job(
            conn,
            job_id,
            number,
            JobState.FAILED,
            now,
            whole=False,
            reason=outcome.reason,
            result_attempt=number,
        )
    if row is None:
        if token is not None:
            raise await _stale(conn, job_id, number)
        return None
    if outcome.job_state is JobState.QUEUED:
        await events.record(
            conn,
            now,
            "warning",
            "job.requeued",
            f"job {job_id} attempt {number} lost ({why}); requeued, "
            f"{job['max_attempts'] - number} attempt(s) left",
            job_id=job_id,
            instance_id=instance_id or job["instance_id"],
        )
    else:
        await events.record(
            conn,
            now,
            "warning",
            "job.failed",
            f"job {job_id} failed: {outcome.reason}",
            job_id=job_id,
            instance_id=instance_id or job["instance_id"],
        )
    return row["state"]


# -- a runner's reports, one or many in a transaction ------------------------------------------


@dataclass
class Report:
    """One report of a runner about its attempt, checked and decoded."""

    action: str  # start, heartbeat, logs, finish, lost
    job_id: int
    number: int
    token: str
    body: Any = None  # the route's body: LogBatch, AttemptFinish, AttemptLost or None
    chunks: list[tuple[int, str, bytes]] | None = None  # decoded log chunks (logs, finish)


async def apply_report(conn: AsyncConnection, r: Report, now: float) -> Any:
    """The report's writes, fenced by its token, in the caller's transaction."""
    if r.action == "start":
        return await record_start(conn, r.job_id, r.number, r.token, now)
    if r.action == "heartbeat":
        return await touch_attempt(conn, r.job_id, r.number, r.token, now)
    if r.action == "logs":
        return await append_logs(conn, r.job_id, r.number, r.token, r.chunks or [], now)
    if r.action == "finish":
        b = r.body
        measured = b.model_dump(
            include={"cpu_seconds", "peak_memory_mb", "limits_enforced", "notes"}
        )
        return await finish_attempt(
            conn,
            r.job_id,
            r.number,
            r.token,
            b.exit_code,
            b.reason,
            now,
            b.outputs,
            measured,
            r.chunks,
        )
    if r.action == "lost":
        return await lose_attempt(conn, r.job_id, r.number, r.body.reason, now, token=r.token)
    raise ValueError(f"unknown report {r.action!r}")


# what refuses one report (its route answers 4xx) without failing the others
REFUSED = (StaleToken, JobNotFound, JobConflict, IllegalTransition, sa.exc.IntegrityError)


async def apply_reports(conn: AsyncConnection, reports: list[Report], now: float) -> list[Any]:
    """Every report's writes in this transaction, in order; the first refused report
    (REFUSED) raises, so the caller's transaction writes nothing and the caller can
    apply them one by one instead."""
    return [await apply_report(conn, r, now) for r in reports]
