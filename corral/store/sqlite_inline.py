"""SQLite for the asyncio server, run on the event loop's own thread.

SQLAlchemy's async SQLite dialect drives aiosqlite, which runs every call on a thread
of its own connection and hands each result back to the event loop: two thread
switches, a queue and a wake-up of the loop per call, several calls per statement.
Measured on the two-core machine of the benchmarks (`benchmarks/sqlite_driver.py`),
that hop costs about 1.5 ms of CPU for a statement whose own work is 60 µs in
SQLAlchemy and 13 µs in SQLite, and it was nearly all of the server's CPU per job.

This module has the few names of aiosqlite that SQLAlchemy's dialect uses, and runs
each call at once on the calling thread (the event loop's: SQLAlchemy's async engine
calls its driver from there). A statement of corral's takes microseconds (every
query reads by an index; the listing routes page); what could hold the loop longer
is kept off it:

- the write-ahead log is written back to the database file (a checkpoint, with its
  fsync) by `Checkpointer` on a thread of its own, not by the committing connection;
- waiting for a lock on the file: the server's own writers queue on an asyncio lock
  before BEGIN IMMEDIATE, and SQLite's busy timeout is 0, so a transaction that finds
  another process's lock (an operator's open `sqlite3` transaction) fails at once and
  `corral.store.db` waits and tries again asynchronously, the loop serving meanwhile.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Generator
from sqlite3 import (  # noqa: F401  (the names SQLAlchemy's dialect copies from its driver)
    DatabaseError,
    Error,
    IntegrityError,
    NotSupportedError,
    OperationalError,
    ProgrammingError,
    sqlite_version,
    sqlite_version_info,
)
from types import SimpleNamespace
from typing import Any

__version__ = "1"


class Cursor:
    """An aiosqlite-shaped cursor over a sqlite3 cursor; every call completes at once."""

    __slots__ = ("_cur",)

    def __init__(self, cur: sqlite3.Cursor):
        self._cur = cur

    async def __aenter__(self) -> Cursor:
        return self

    async def __aexit__(self, *_exc: Any) -> None:
        self._cur.close()

    @property
    def description(self) -> Any:
        return self._cur.description

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cur.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cur.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cur.arraysize = value

    async def execute(self, sql: str, parameters: Any = ()) -> Cursor:
        self._cur.execute(sql, parameters)
        return self

    async def executemany(self, sql: str, seq_of_parameters: Any) -> Cursor:
        self._cur.executemany(sql, seq_of_parameters)
        return self

    async def fetchone(self) -> Any:
        return self._cur.fetchone()

    async def fetchmany(self, size: int | None = None) -> list:
        return self._cur.fetchmany(size if size is not None else self._cur.arraysize)

    async def fetchall(self) -> list:
        return self._cur.fetchall()

    async def close(self) -> None:
        self._cur.close()

    async def setinputsizes(self, *_sizes: Any) -> None:
        return None

    async def nextset(self) -> None:
        return None


class _Immediate:
    """What the dialect's isolation-level setter puts on aiosqlite's queue: run it now."""

    @staticmethod
    def put_nowait(item: tuple) -> None:
        future, function = item
        try:
            result = function()
        except BaseException as exc:  # handed to the waiting caller
            future.set_exception(exc)
        else:
            future.set_result(result)


class Connection:
    """An aiosqlite-shaped connection over a sqlite3 connection, used on one thread.
    Like aiosqlite's, it is awaited once to open it."""

    def __init__(self, database: str, kwargs: dict[str, Any]):
        self._database = database
        self._kwargs = kwargs
        self._conn: sqlite3.Connection | None = None
        self._tx = _Immediate()
        self._thread = SimpleNamespace(daemon=True)  # the dialect sets it; there is none

    def __await__(self) -> Generator[Any, None, Connection]:
        if self._conn is None:
            self._conn = sqlite3.connect(self._database, **self._kwargs)
        return self
        yield  # a generator: awaiting it completes at once

    @property
    def _connection(self) -> sqlite3.Connection | None:
        return self._conn

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError("no active connection")
        return self._conn

    @property
    def isolation_level(self) -> str | None:
        return self._live().isolation_level

    def cursor(self) -> Cursor:
        return Cursor(self._live().cursor())

    async def execute(self, sql: str, parameters: Any = ()) -> Cursor:
        return await self.cursor().execute(sql, parameters)

    async def commit(self) -> None:
        self._live().commit()

    async def rollback(self) -> None:
        self._live().rollback()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._live().create_function(*args, **kwargs)

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        """Close at once (SQLAlchemy's forced close, outside the event loop too)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def connect(database: str, **kwargs: Any) -> Connection:
    # SQLAlchemy's pool may close a connection from a thread other than the loop's
    # (garbage collection); sqlite3's same-thread check would refuse that
    kwargs["check_same_thread"] = False
    return Connection(database, kwargs)


class Checkpointer:
    """Writes the write-ahead log back into the database file every `every` seconds,
    on a thread of its own (its fsync included), so no committing connection on the
    event loop does it: the server's connections turn automatic checkpoints off
    (`wal_autocheckpoint=0`). A PASSIVE checkpoint never waits for readers or writers;
    what it cannot write back yet, the next one does."""

    def __init__(self, path: str, every: float = 1.0):
        self.path = path
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout=30000")
            while not self._stop.wait(self.every):
                self.checkpoint(conn)
            self.checkpoint(conn)
        finally:
            conn.close()

    def checkpoint(self, conn: sqlite3.Connection) -> tuple[int, int, int] | None:
        """(busy, log pages, pages written back) of one PASSIVE checkpoint, or None."""
        try:
            row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            return None
        return tuple(row) if row else None
