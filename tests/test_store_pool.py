"""How the server uses its PostgreSQL connections: a lone read (the credential lookup
every authenticated request makes) is a transaction of its own, with no BEGIN and no
ROLLBACK around it, and work done one piece after another reuses the connection used
last, whose prepared statements are warm (a pool handing out its connections in turn
made each one prepare every statement again)."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from tests.test_store import open_db
from tests.test_store_reconnect import POOLED, _warm

pytestmark = pytest.mark.postgres


async def _own_transaction(conn) -> bool:
    """Whether a statement sent on `conn` ran as a transaction of its own: the driver
    is outside any transaction block after it (no BEGIN was sent before it)."""
    await conn.execute(sa.text("SELECT 1"))
    raw = await conn.get_raw_connection()
    return not raw.driver_connection.is_in_transaction()


async def _backend(conn) -> int:
    return int((await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())


def test_a_lone_read_sends_no_begin_and_other_work_still_runs_in_a_transaction(pg_url):
    async def main():
        db = await open_db(pg_url)
        try:
            await _warm(db)
            for _ in range(POOLED + 1):  # whichever pooled connection it meets
                assert await db.query_one(_own_transaction)
                # the connection goes back to the pool as it came: the next read and
                # the next transaction on it are transactions again
                assert not await db.query(_own_transaction)
                assert not await db.transact(_own_transaction)
        finally:
            await db.dispose()

    asyncio.run(main())


def test_work_done_one_after_another_reuses_the_last_connection(pg_url):
    async def main():
        db = await open_db(pg_url)
        try:
            await _warm(db)  # POOLED connections idle in the pool
            used = set()
            for _ in range(2 * POOLED):
                used.add(await db.query_one(_backend))
                used.add(await db.query(_backend))
                used.add(await db.transact(_backend))
            assert len(used) == 1, used
        finally:
            await db.dispose()

    asyncio.run(main())
