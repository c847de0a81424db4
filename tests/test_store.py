"""The store on SQLite and PostgreSQL: migrations, the job lifecycle, fencing, and
row claiming by several dispatchers at once."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from corral.api import JobSubmit, ObservedAttempt
from corral.domain.errors import StaleToken
from corral.domain.jobs import AttemptState, JobState
from corral.store import dispatch, instances, tokens
from corral.store import jobs as repo
from corral.store.db import Database
from corral.store.migrate import head_revision, migrate
from corral.store.schema import job_attempts, jobs, log_chunks, metadata
from tests.storekit import register

NOW = 1_000_000.0


def run(coro):
    return asyncio.run(coro)


async def open_db(url: str) -> Database:
    db = Database(url)
    await migrate(db)
    return db


async def add_instance(db: Database, name: str = "i1", cpus: float = 4) -> str:
    reg = await register(db, name, NOW, cpus=cpus, memory_mb=8000, host="h", agent_version="t")
    return reg.instance["id"]


async def locked_job(db: Database, **spec) -> tuple[int, int, str, str]:
    """Submit, lock and deliver one job; return (job id, attempt, instance, token)."""
    inst = await add_instance(db, name=f"i{spec.pop('n', 1)}")
    job_id = await db.transact(repo.submit, JobSubmit(command=["true"], **spec), NOW)
    placed = await db.transact(dispatch.lock_jobs, db, NOW)
    assert [(p.job_id, p.instance_id) for p in placed] == [(job_id, inst)]
    orders = await db.transact(dispatch.deliver_attempts, inst, NOW)
    assert len(orders) == 1
    return job_id, orders[0].attempt, inst, orders[0].token


async def job_row(db: Database, job_id: int):
    return await db.query(repo.get_job, job_id)


def test_migrations_reach_head_and_match_the_models(empty_db_url):
    async def main():
        db = await open_db(empty_db_url)
        assert await migrate(db) == head_revision()  # idempotent

        def diff(sync_conn):
            ctx = MigrationContext.configure(sync_conn, opts={"compare_type": False})
            return [
                d
                for d in compare_metadata(ctx, metadata)
                if not (
                    isinstance(d, tuple)
                    and d[0] == "remove_table"
                    and d[1].name == "alembic_version"
                )
            ]

        async with db.read() as conn:
            differences = await conn.run_sync(diff)
        await db.dispose()
        assert differences == []

    run(main())


def test_happy_path_records_the_result_of_the_attempt(db_url):
    async def main():
        db = await open_db(db_url)
        job_id, n, _inst, token = await locked_job(db)
        assert (await job_row(db, job_id))["state"] == JobState.LOCKED
        assert await db.transact(repo.start_attempt, job_id, n, token, NOW + 1) == "running"
        await db.transact(repo.append_logs, job_id, n, token, [(0, "out", b"hi\n")], NOW + 2)
        state, recorded = await db.transact(repo.finish_attempt, job_id, n, token, 0, None, NOW + 3)
        assert (state, recorded) == ("succeeded", True)
        row = await job_row(db, job_id)
        assert (row["state"], row["exit_code"], row["result_attempt"]) == ("succeeded", 0, 1)
        logs = await db.query(repo.read_logs, job_id, n, -1)
        assert [bytes(c["data"]) for c in logs] == [b"hi\n"]
        # a retried finish (lost reply) is answered without writing again
        assert await db.transact(repo.finish_attempt, job_id, n, token, 0, None, NOW + 9) == (
            "succeeded",
            False,
        )
        assert (await job_row(db, job_id))["finished_at"] == NOW + 3
        await db.dispose()

    run(main())


def test_stale_token_changes_nothing(db_url):
    async def main():
        db = await open_db(db_url)
        job_id, n, inst, token1 = await locked_job(db)
        await db.transact(repo.start_attempt, job_id, n, token1, NOW)
        await db.transact(repo.requeue, job_id, NOW + 1, "test")
        row = await job_row(db, job_id)
        assert row["state"] == JobState.QUEUED
        await db.transact(dispatch.lock_jobs, db, NOW + 2)
        orders = await db.transact(dispatch.deliver_attempts, inst, NOW + 2)
        assert [o.attempt for o in orders] == [2]
        token2 = orders[0].token

        for call in (
            lambda: db.transact(repo.start_attempt, job_id, 1, token1, NOW + 3),
            lambda: db.transact(repo.touch_attempt, job_id, 1, token1, NOW + 3),
            lambda: db.transact(repo.append_logs, job_id, 1, token1, [(0, "out", b"x")], NOW + 3),
            lambda: db.transact(repo.finish_attempt, job_id, 1, token1, 0, None, NOW + 3),
            lambda: db.transact(repo.lose_attempt, job_id, 1, "x", NOW + 3, token=token1),
            # the new token on the old attempt number, and the old token on the new one
            lambda: db.transact(repo.finish_attempt, job_id, 1, token2, 0, None, NOW + 3),
            lambda: db.transact(repo.finish_attempt, job_id, 2, token1, 0, None, NOW + 3),
            lambda: db.transact(repo.finish_attempt, job_id, 2, "not a token!", 0, None, NOW),
        ):
            with pytest.raises(StaleToken):
                await call()
        row = await job_row(db, job_id)
        assert (row["state"], row["current_attempt"], row["exit_code"]) == ("locked", 2, None)
        async with db.read() as conn:
            n_logs = await conn.execute(sa.select(sa.func.count()).select_from(log_chunks))
            assert n_logs.scalar_one() == 0
            attempt1 = (
                (
                    await conn.execute(
                        sa.select(job_attempts).where(
                            job_attempts.c.job_id == job_id, job_attempts.c.number == 1
                        )
                    )
                )
                .mappings()
                .one()
            )
        assert attempt1["state"] == AttemptState.REVOKED
        # the agent still reporting attempt 1 is told to kill it
        kills = await db.transact(
            dispatch.kills_for,
            inst,
            [
                ObservedAttempt(job_id=job_id, attempt=1, token=token1),
                ObservedAttempt(job_id=job_id, attempt=2, token=token2),
            ],
        )
        assert [(k.attempt, "stale" in k.reason or "revoked" in k.reason) for k in kills] == [
            (1, True)
        ]
        # attempt 2 is the one whose result is recorded
        await db.transact(repo.start_attempt, job_id, 2, token2, NOW + 4)
        await db.transact(repo.finish_attempt, job_id, 2, token2, 7, None, NOW + 5)
        row = await job_row(db, job_id)
        assert (row["state"], row["exit_code"], row["result_attempt"]) == ("failed", 7, 2)
        await db.dispose()

    run(main())


def test_store_refuses_transitions_the_table_forbids(db_url):
    async def main():
        db = await open_db(db_url)
        job_id, n, _inst, token = await locked_job(db)
        # finishing without starting: locked -> succeeded is not in the table
        with pytest.raises(StaleToken):
            await db.transact(repo.finish_attempt, job_id, n, token, 0, None, NOW)
        await db.transact(repo.start_attempt, job_id, n, token, NOW)
        await db.transact(repo.finish_attempt, job_id, n, token, 0, None, NOW)
        with pytest.raises(repo.JobConflict):
            await db.transact(repo.cancel, job_id, NOW)
        with pytest.raises(repo.JobConflict):
            await db.transact(repo.requeue, job_id, NOW, "test")
        assert (await job_row(db, job_id))["state"] == "succeeded"
        with pytest.raises(repo.JobNotFound):
            await db.transact(repo.cancel, 99999, NOW)
        await db.dispose()

    run(main())


def test_lost_attempts_requeue_until_max_attempts_then_fail(db_url):
    async def main():
        db = await open_db(db_url)
        job_id, n, inst, token = await locked_job(db, max_attempts=2)
        await db.transact(repo.start_attempt, job_id, n, token, NOW)
        assert (
            await db.transact(repo.lose_attempt, job_id, 1, "runner crashed", NOW, token=token)
            == "queued"
        )
        await db.transact(dispatch.lock_jobs, db, NOW)
        (order,) = await db.transact(dispatch.deliver_attempts, inst, NOW)
        assert order.attempt == 2
        # the reaper (no token) loses the second attempt: out of attempts
        assert await db.transact(repo.lose_attempt, job_id, 2, "instance lost", NOW) == "failed"
        row = await job_row(db, job_id)
        assert row["state"] == "failed"
        assert "gave up after 2 attempts" in row["reason"] and "instance lost" in row["reason"]
        # nothing dispatches it again
        assert await db.transact(dispatch.lock_jobs, db, NOW) == []
        await db.dispose()

    run(main())


def test_token_is_issued_once_and_stored_hashed(db_url):
    async def main():
        db = await open_db(db_url)
        _job_id, _n, inst, token = await locked_job(db)
        assert await db.transact(dispatch.deliver_attempts, inst, NOW) == []
        async with db.read() as conn:
            stored = (await conn.execute(sa.select(job_attempts.c.token_hash))).scalar_one()
        assert stored != token and len(stored) == 64 and token not in stored
        await db.dispose()

    run(main())


def test_cancel_revokes_the_running_attempt(db_url):
    async def main():
        db = await open_db(db_url)
        job_id, n, inst, token = await locked_job(db)
        await db.transact(repo.start_attempt, job_id, n, token, NOW)
        await db.transact(repo.cancel, job_id, NOW)
        with pytest.raises(StaleToken):
            await db.transact(repo.finish_attempt, job_id, n, token, 0, None, NOW)
        kills = await db.transact(
            dispatch.kills_for, inst, [ObservedAttempt(job_id=job_id, attempt=n, token=token)]
        )
        assert len(kills) == 1 and "cancelled" in kills[0].reason
        assert (await job_row(db, job_id))["state"] == "cancelled"
        await db.dispose()

    run(main())


def test_tokens_resolve_by_hash_and_revoke(db_url):
    async def main():
        db = await open_db(db_url)
        secret = await db.transact(tokens.create_token, tokens.ADMIN, NOW)
        row = await db.query(tokens.lookup, secret)
        assert row["kind"] == "admin"
        assert await db.query(tokens.lookup, secret + "x") is None
        assert await db.query(tokens.lookup, "garbage") is None
        await db.dispose()

    run(main())


def test_retired_name_can_never_register_again(db_url):
    async def main():
        db = await open_db(db_url)
        inst = await add_instance(db, name="old")
        from corral.domain.instances import InstanceState

        await db.transact(instances.transition, inst, InstanceState.DRAINING, NOW)
        await db.transact(instances.transition, inst, InstanceState.RETIRED, NOW)
        reg = await register(db, "old", NOW)
        assert reg.decision.admission.value == "exit"
        reg = await register(db, "old", NOW, instance_id=inst)
        assert reg.decision.admission.value == "exit"
        await db.dispose()

    run(main())


def test_a_submit_retried_with_its_idempotency_key_is_the_same_job(db_url):
    async def main():
        db = await open_db(db_url)
        spec = JobSubmit(command=["true"])
        first, created = await db.transact(repo.submit_once, spec, NOW, "tok1", "key-1")
        again, created_again = await db.transact(repo.submit_once, spec, NOW + 1, "tok1", "key-1")
        assert created is not None and created["id"] == first and created["state"] == "queued"
        assert (again, created_again) == (first, None)
        # the same key with another body is a conflict, and writes nothing
        with pytest.raises(repo.IdempotencyConflict, match="Idempotency-Key"):
            await db.transact(repo.submit_once, JobSubmit(command=["false"]), NOW, "tok1", "key-1")
        # keys belong to the principal that sent them
        other, created = await db.transact(repo.submit_once, spec, NOW, "tok2", "key-1")
        assert created is not None and other != first
        assert len(await db.query(repo.list_jobs)) == 2
        await db.dispose()

    run(main())


@pytest.mark.postgres
def test_racing_submits_with_one_idempotency_key_make_one_job(pg_url):
    async def main():
        db = await open_db(pg_url)
        spec = JobSubmit(command=["true"])
        results = await asyncio.gather(
            *(db.transact(repo.submit_once, spec, NOW, "tok", "same") for _ in range(8))
        )
        assert len({job_id for job_id, _ in results}) == 1
        assert sum(created is not None for _, created in results) == 1
        assert len(await db.query(repo.list_jobs)) == 1
        await db.dispose()

    run(main())


def test_a_retried_registration_with_the_same_join_key_gets_the_same_instance(db_url):
    """The server committed a registration but the agent never saw the answer (a
    client timeout): its retry, with the same name and join key, is the same instance
    with a fresh credential (the unseen one is revoked); another key is refused."""

    async def join(db, key):
        return await register(db, "w", NOW, join_key=key)

    async def main():
        db = await open_db(db_url)
        key = "k" * 43
        first = await join(db, key)
        again = await join(db, key)
        assert again.decision.admission.value == "welcome"
        assert again.instance["id"] == first.instance["id"]
        assert again.credential and again.credential != first.credential
        assert await db.query(tokens.lookup, first.credential) is None
        row = await db.query(tokens.lookup, again.credential)
        assert row is not None and row["instance_id"] == first.instance["id"]
        for other in ("x" * 43, None):
            with pytest.raises(instances.NameInUse):
                await join(db, other)
        assert len(await db.query(instances.list_instances)) == 1
        from corral.domain.instances import InstanceState

        await db.transact(instances.transition, first.instance["id"], InstanceState.DRAINING, NOW)
        await db.transact(instances.transition, first.instance["id"], InstanceState.RETIRED, NOW)
        assert (await join(db, key)).decision.admission.value == "exit"  # retired stays out
        await db.dispose()

    run(main())


@pytest.mark.postgres
@pytest.mark.slow  # seconds of racing dispatchers
def test_concurrent_dispatchers_never_lock_a_job_twice(pg_url):
    """Several dispatchers on one PostgreSQL claim with SKIP LOCKED: every job is
    locked exactly once and no instance is overcommitted."""

    async def main():
        db = await open_db(pg_url)
        for k in range(4):
            await add_instance(db, name=f"w{k}", cpus=50)
        for _ in range(300):
            await db.transact(repo.submit, JobSubmit(command=["true"]), NOW)
        dispatchers = [Database(pg_url) for _ in range(4)]

        async def drain(d: Database) -> list:
            mine = []
            for _ in range(50):
                got = await d.transact(dispatch.lock_jobs, d, NOW, batch=25)
                mine += got
                await asyncio.sleep(0)
            return mine

        results = await asyncio.gather(*(drain(d) for d in dispatchers))
        placed = [p.job_id for r in results for p in r]
        assert len(placed) == len(set(placed)) == 200  # 4 instances x 50 cpus
        assert sum(1 for r in results if r) >= 2  # really concurrent
        async with db.read() as conn:
            per_job = (
                await conn.execute(
                    sa.select(job_attempts.c.job_id, sa.func.count())
                    .group_by(job_attempts.c.job_id)
                    .having(sa.func.count() > 1)
                )
            ).all()
            locked = (
                await conn.execute(
                    sa.select(sa.func.count()).select_from(jobs).where(jobs.c.state == "locked")
                )
            ).scalar_one()
            load = (
                await conn.execute(
                    sa.select(
                        job_attempts.c.instance_id, sa.func.sum(job_attempts.c.cpus)
                    ).group_by(job_attempts.c.instance_id)
                )
            ).all()
        assert per_job == [] and locked == 200
        assert all(cpus <= 50 for _i, cpus in load)
        for d in (*dispatchers, db):
            await d.dispose()

    run(main())


def test_a_keyed_submit_is_two_statements_and_a_retry_gets_the_first_job(db_url):
    """A first request under an idempotency key sends its two inserts (the job, the
    key) and nothing else: no read before them, no SAVEPOINT around them on
    PostgreSQL (three round trips each submit paid). A retry with the key gets the
    first job, and takes its own insert back."""
    from sqlalchemy import event

    async def main():
        db = await open_db(db_url)
        seen: list[str] = []
        event.listen(
            db.engine.sync_engine,
            "before_cursor_execute",
            lambda _c, _cur, statement, *_a: seen.append(statement.split()[0].upper()),
        )
        spec = JobSubmit(command=["true"])
        first = await db.transact(repo.submit_once, spec, NOW, "tok", "k1")
        writes = [s for s in seen if s not in ("BEGIN", "COMMIT", "ROLLBACK")]
        again = await db.transact(repo.submit_once, spec, NOW, "tok", "k1")
        assert first[1] is not None and again == (first[0], None)
        assert writes == ["INSERT", "INSERT"], writes
        assert [j["id"] for j in await db.query(repo.list_jobs)] == [first[0]]
        await db.dispose()

    run(main())
