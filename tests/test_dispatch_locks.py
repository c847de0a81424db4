"""The dispatcher on PostgreSQL and an instance a heartbeat holds locked: the instance
is not full, only busy for a moment. The dispatcher must neither conclude there is no
room (and rewrite every queued job's reason) nor leave the jobs waiting for a later
pass; reasons are written only when they change."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from corral.api import JobSubmit
from corral.store import dispatch
from corral.store import jobs as repo
from corral.store.db import Database
from corral.store.schema import instances, jobs
from tests.test_store import NOW, add_instance, open_db

pytestmark = pytest.mark.postgres


def test_an_instance_locked_by_a_heartbeat_is_not_treated_as_full(pg_url):
    async def main():
        db = await open_db(pg_url)
        other = Database(pg_url)  # the heartbeat's connection
        try:
            inst = await add_instance(db, name="busy", cpus=8)
            job = JobSubmit(command=["true"])
            ids = [await db.transact(repo.submit, job, NOW) for _ in range(5)]
            async with other.engine.connect() as hb:
                trans = await hb.begin()
                # what a heartbeat's exchange does first: touch its instance's row
                await hb.execute(
                    sa.update(instances)
                    .where(instances.c.id == inst)
                    .values(last_heartbeat_at=NOW + 1)
                )
                placing = asyncio.create_task(db.transact(dispatch.lock_jobs, db, NOW + 1))
                await asyncio.sleep(0.5)  # the dispatcher meets the lock
                await trans.commit()
                placed = await asyncio.wait_for(placing, 30)
            assert sorted(p.job_id for p in placed) == ids
            assert {p.instance_id for p in placed} == {inst}
            async with db.read() as conn:
                q = sa.select(jobs.c.id, jobs.c.reason).where(jobs.c.id.in_(ids))
                reasons = (await conn.execute(q)).all()
            assert [r.reason for r in reasons] == [None] * 5
        finally:
            await other.dispose()
            await db.dispose()

    asyncio.run(main())


def test_reasons_are_written_only_when_they_change(pg_url):
    """A job no instance can hold says so once; the next passes write nothing."""

    async def main():
        db = await open_db(pg_url)
        try:
            await add_instance(db, name="small", cpus=2)
            big = await db.transact(repo.submit, JobSubmit(command=["true"], cpus=64), NOW)
            for k in range(3):
                assert await db.transact(dispatch.lock_jobs, db, NOW + k) == []
            async with db.read() as conn:
                row = (
                    await conn.execute(
                        sa.select(jobs.c.reason, sa.text("xmin::text::bigint AS xmin")).where(
                            jobs.c.id == big
                        )
                    )
                ).one()
            assert row.reason.startswith("waiting: no running instance")
            first_xmin = row.xmin
            for k in range(3):
                await db.transact(dispatch.lock_jobs, db, NOW + 10 + k)
            async with db.read() as conn:
                again = (
                    await conn.execute(
                        sa.select(sa.text("xmin::text::bigint AS xmin")).where(jobs.c.id == big)
                    )
                ).scalar_one()
            assert again == first_xmin, "the job's row was rewritten with the same reason"
        finally:
            await db.dispose()

    asyncio.run(main())
