"""The server's SQLite driver runs each statement on the event loop's own thread (no
thread hop per call), and a thread of its own writes the write-ahead log back."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import pytest
import sqlalchemy as sa

from corral.store import sqlite_inline
from corral.store.db import Database


async def create_table(conn) -> None:
    await conn.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))


async def count(conn) -> int:
    return (await conn.execute(sa.text("SELECT count(*) FROM t"))).scalar()


def test_statements_run_on_the_loop_thread_and_errors_keep_their_kind(tmp_path):
    async def main():
        db = Database(f"sqlite:///{tmp_path / 'c.db'}")
        try:
            seen: list[int] = []

            async def where(conn):
                raw = await conn.get_raw_connection()
                raw.driver_connection._connection.create_function(
                    "whose_thread", 0, lambda: seen.append(threading.get_ident()) or 1
                )
                await create_table(conn)
                await conn.execute(sa.text("INSERT INTO t (id) VALUES (1)"))
                return (await conn.execute(sa.text("SELECT whose_thread()"))).scalar()

            assert await db.transact(where) == 1
            assert seen == [threading.get_ident()]

            async def duplicate(conn):
                await conn.execute(sa.text("INSERT INTO t (id) VALUES (1)"))

            with pytest.raises(sa.exc.IntegrityError):
                await db.transact(duplicate)

            assert await db.query(count) == 1  # the refused write left nothing
        finally:
            await db.dispose()

    asyncio.run(main())


def test_a_write_transaction_that_fails_midway_leaves_nothing(tmp_path):
    async def main():
        db = Database(f"sqlite:///{tmp_path / 'c.db'}")
        try:
            await db.transact(create_table)

            async def half(conn):
                await conn.execute(sa.text("INSERT INTO t (id) VALUES (1)"))
                raise RuntimeError("midway")

            with pytest.raises(RuntimeError):
                await db.transact(half)

            assert await db.query(count) == 0
        finally:
            await db.dispose()

    asyncio.run(main())


def test_the_checkpointer_writes_the_log_back_and_the_server_connections_do_not(tmp_path):
    path = tmp_path / "c.db"

    async def main():
        db = Database(f"sqlite:///{path}")
        try:

            async def autocheckpoint(conn):
                return (await conn.execute(sa.text("PRAGMA wal_autocheckpoint"))).scalar()

            assert await db.query(autocheckpoint) == 0

            async def fill(conn):
                await conn.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"))
                for i in range(200):
                    await conn.execute(
                        sa.text("INSERT INTO t (id, v) VALUES (:i, :v)"), {"i": i, "v": "x" * 500}
                    )

            await db.transact(fill)
            # the rows reach the database file itself (not only its log) by the
            # checkpointer's thread, without another write
            deadline = time.monotonic() + 10
            while True:
                plain = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
                try:
                    rows = plain.execute("SELECT count(*) FROM t").fetchone()[0]
                except sqlite3.OperationalError:
                    rows = 0  # the table is still only in the log
                finally:
                    plain.close()
                if rows == 200:
                    break
                assert time.monotonic() < deadline, f"{rows} rows in the file after 10 s"
                await asyncio.sleep(0.05)
        finally:
            await db.dispose()

    asyncio.run(main())


def test_a_connection_used_after_close_says_so():
    async def main():
        conn = await sqlite_inline.connect(":memory:")
        await conn.close()
        with pytest.raises(ValueError, match="no active connection"):
            conn.cursor()

    asyncio.run(main())


def test_a_lock_held_by_another_process_is_waited_for_without_holding_the_loop(tmp_path):
    """An operator's `sqlite3` shell in the middle of a write transaction: the server's
    write waits for it, and meanwhile the event loop still serves reads."""
    path = tmp_path / "c.db"

    async def main():
        db = Database(f"sqlite:///{path}")
        try:
            await db.transact(create_table)
            other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            other.execute("BEGIN IMMEDIATE")
            other.execute("INSERT INTO t (id) VALUES (1)")
            try:

                async def insert(conn):
                    await conn.execute(sa.text("INSERT INTO t (id) VALUES (2)"))

                write = asyncio.create_task(db.transact(insert))

                # the loop is free: reads go on (they see neither uncommitted row)
                for _ in range(5):
                    assert await asyncio.wait_for(db.query(count), 5) == 0
                    await asyncio.sleep(0.05)
                assert not write.done()  # still waiting for the other process
            finally:
                other.execute("COMMIT")
                other.close()
            await asyncio.wait_for(write, 10)
            assert await db.query(count) == 2
        finally:
            await db.dispose()

    asyncio.run(main())


def test_a_handle_dropped_without_dispose_leaves_no_checkpoint_thread(tmp_path):
    import gc

    def threads() -> int:
        return sum(t.name == "sqlite-checkpoint" for t in threading.enumerate())

    before = threads()
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    assert threads() == before + 1
    del db
    gc.collect()
    deadline = time.monotonic() + 10
    while threads() > before:
        assert time.monotonic() < deadline, "the checkpoint thread outlived its handle"
        time.sleep(0.02)
