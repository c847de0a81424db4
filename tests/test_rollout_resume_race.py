"""Issue 10 item 8: `--resume` is not lost to a heartbeat that read the old state.

On PostgreSQL a heartbeat's transaction reads the instance's component row
(install_failed), a `corral rollout NAME --resume ID` commits in between (pending,
attempts 0), and the heartbeat then writes back what it computed from its read. The
interleaving is reproduced deterministically: the heartbeat's connection runs the
resume in another session right after its first read."""

from __future__ import annotations

import asyncio
import random

import pytest
from test_reconciler import T0, sha

from corral.api import ComponentPublish, ObservedComponent, RolloutRequest
from corral.domain.backoff import Backoff
from corral.domain.reconcile import ComponentState, InstallPolicy
from corral.store import components
from corral.store.db import Database
from corral.store.migrate import migrate
from tests.storekit import register

pytestmark = [pytest.mark.postgres]
POLICY = InstallPolicy(backoff=Backoff(base=30, factor=2, maximum=60, jitter=0.0), cap=1)


class AfterFirstRead:
    """A connection that runs `hook` (in another session) right after its first
    statement, as if that session committed between this one's read and write."""

    def __init__(self, conn, hook):
        self._conn = conn
        self._hook = hook
        self._fired = False

    async def execute(self, *args, **kwargs):
        result = await self._conn.execute(*args, **kwargs)
        if not self._fired:
            self._fired = True
            await self._hook()
        return result

    def __getattr__(self, name):
        return getattr(self._conn, name)


def test_resume_between_a_heartbeats_read_and_write_is_kept(pg_url):
    async def main():
        db = Database(pg_url)
        await migrate(db)
        inst = (await register(db, "w0", T0)).instance
        for v in ("1.0.0", "1.1.0"):
            await db.transact(
                components.publish,
                ComponentPublish(
                    name="runner", version=v, url=f"http://127.0.0.1:1/{v}", sha256=sha(v)
                ),
                T0,
            )
        observed = [ObservedComponent(name="runner", version="1.0.0", sha256=sha("1.0.0"))]

        async def heartbeat(now, conn_wrapper=None):
            async def go(conn):
                c = conn_wrapper(conn) if conn_wrapper else conn
                return await components.sync(c, inst, observed, now, POLICY, random.Random(1))

            return await db.transact(go)

        rollout = await db.transact(
            components.start_rollout,
            RolloutRequest(component="runner", version="1.1.0", failure_threshold=0),
            T0,
        )
        await db.transact(components.advance, db, T0)
        assert len(await heartbeat(T0)) == 1  # the one order the cap allows
        assert await heartbeat(T0 + 100) == []  # it did not land: gave up
        await db.transact(components.advance, db, T0 + 100)
        assert (await db.query(components.get_rollout, rollout["id"]))["state"] == "paused"

        async def resume():
            await db.transact(components.resume, rollout["id"], T0 + 101)

        orders = await heartbeat(T0 + 102, lambda conn: AfterFirstRead(conn, resume))
        (row,) = await db.query(components.instance_status)
        # the resume stands: it is not written back as failed. The heartbeat that read
        # the old row decided nothing changed and writes nothing (no write when nothing
        # changed), so the order comes with the next heartbeat.
        assert row["state"] != ComponentState.INSTALL_FAILED, row
        assert orders == []
        orders = await heartbeat(T0 + 103)
        (row,) = await db.query(components.instance_status)
        assert [o.version for o in orders] == ["1.1.0"]
        assert row["state"] == ComponentState.INSTALLING and row["attempts"] == 1
        await db.dispose()

    asyncio.run(main())
