"""Pooled PostgreSQL connections that died while idle (the database restarted, an
administrator or a proxy ended them): the next transaction and the next read must not
fail because of them. corral sends no ping before each use (a BEGIN and a ROLLBACK,
two round trips per transaction); a statement that finds its connection dead before
anything of its transaction reached the database is run again on a new one. A
transaction that had already sent statements is never run again on its own."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from corral.api import JobSubmit
from corral.store import jobs as repo
from corral.store.db import Database
from corral.store.schema import jobs
from tests.test_store import NOW, open_db

pytestmark = pytest.mark.postgres

POOLED = 4  # connections the test warms into the pool


async def _warm(db: Database) -> None:
    """POOLED connections checked out at once, then back in the pool."""

    async def hold(ready: asyncio.Barrier) -> None:
        async with db.read() as conn:
            await conn.execute(sa.text("SELECT 1"))
            await ready.wait()

    barrier = asyncio.Barrier(POOLED)
    await asyncio.gather(*(hold(barrier) for _ in range(POOLED)))


async def _end_pooled_connections(db: Database, admin: Database) -> int:
    """pg_terminate_backend on every connection of `db`'s database but the admin's."""
    async with admin.engine.connect() as conn:
        ended = (
            await conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        ).scalar_one()
    return int(ended)


async def _count_jobs(conn) -> int:
    return int((await conn.execute(sa.select(sa.func.count()).select_from(jobs))).scalar_one())


def test_transactions_and_reads_survive_connections_ended_while_pooled(pg_url):
    async def main():
        db = await open_db(pg_url)
        admin = Database(pg_url)
        try:
            await _warm(db)
            assert await _end_pooled_connections(db, admin) >= POOLED
            # every pooled connection is dead: each call below meets one first
            job_id = await db.transact(repo.submit, JobSubmit(command=["true"]), NOW)
            async with db.read() as conn:
                count = await _count_jobs(conn)
            assert count == 1
            await _end_pooled_connections(db, admin)
            got = await db.query(repo.get_job, job_id)
            assert got is not None and got["id"] == job_id
            await _end_pooled_connections(db, admin)
            many = await asyncio.gather(
                *(db.transact(repo.submit, JobSubmit(command=["true"]), NOW) for _ in range(6))
            )
            assert len(set(many)) == 6
            async with db.read() as conn:
                count = await _count_jobs(conn)
            assert count == 7  # each submit written once
            await _end_pooled_connections(db, admin)
            # a lone read (the credential lookup of every request: no BEGIN) too
            assert await db.query_one(_count_jobs) == 7
        finally:
            await admin.dispose()
            await db.dispose()

    asyncio.run(main())


def test_a_transaction_that_already_wrote_is_not_run_again(pg_url):
    """The connection dies in the middle of a transaction (after its first statement
    reached the database): the caller gets the error, and the function ran once."""

    async def main():
        db = await open_db(pg_url)
        admin = Database(pg_url)
        runs = 0

        async def write_then_die(conn):
            nonlocal runs
            runs += 1
            await conn.execute(sa.select(sa.literal(1)))
            await _end_pooled_connections(db, admin)
            await conn.execute(sa.select(sa.literal(2)))

        try:
            with pytest.raises(DBAPIError):
                await db.transact(write_then_die)
            assert runs == 1
        finally:
            await admin.dispose()
            await db.dispose()

    asyncio.run(main())
