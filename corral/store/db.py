"""The database handle: one way to read, one way to write, one way to claim rows.

SQLite (the embedded default) gets WAL, and write transactions that start with BEGIN
IMMEDIATE behind an in-process lock, so a single server never sees "database is
locked"; when another process holds the file's lock, a transaction waits for it here,
asynchronously (its statements run on the event loop's thread: `sqlite_inline`).
PostgreSQL gets row claims with FOR UPDATE SKIP LOCKED so
several servers never process one row at once, and deadlock retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_dbapi
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from corral.store import sqlite_inline

log = logging.getLogger(__name__)

T = TypeVar("T")

_RETRYABLE_PG_CODES = {"40P01", "40001"}  # deadlock_detected, serialization_failure
DEAD_ON_ARRIVAL_TRIES = 3  # the first dead one invalidates the pool: a second try gets a new one
# How long a SQLite transaction waits for another process's lock on the file (an
# operator's open `sqlite3` transaction, a VACUUM): asynchronously, in steps, so the
# event loop serves reads meanwhile (SQLite's own busy timeout would hold the loop)
SQLITE_BUSY_WAIT = 30.0
SQLITE_BUSY = 5  # SQLite's primary result code for "database is locked"


DatabaseError = sa.exc.SQLAlchemyError  # what the outer layers catch of the store's failures
DatabaseConflict = sa.exc.IntegrityError  # a constraint refused a write (a DatabaseError too)
Connection = AsyncConnection  # what store functions take, for callers' annotations


class DatabaseUrlError(ValueError):
    pass


def normalize_url(url: str) -> str:
    """Accept `sqlite:///path`, a bare file path, or `postgresql://...`; return the
    async-driver URL SQLAlchemy needs."""
    if not url:
        raise DatabaseUrlError("database URL is empty")
    if url.startswith(("postgresql+asyncpg://",)):
        return url
    for prefix in (
        "postgresql://",
        "postgres://",
        "postgresql+psycopg://",
        "postgresql+psycopg2://",
    ):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    if url.startswith("sqlite+aiosqlite://"):
        return url
    if url.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + url[len("sqlite://") :]
    if "://" in url:
        raise DatabaseUrlError(
            f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://USER@HOST/DB"
        )
    return "sqlite+aiosqlite:///" + str(Path(url).expanduser().resolve())


def _sqlite_busy(exc: DBAPIError) -> bool:
    code = getattr(exc.orig, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == SQLITE_BUSY
    return "database is locked" in str(exc.orig)


def _pg_code(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    for candidate in (orig, getattr(orig, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if code:
            return code
    return None


class Database:
    def __init__(self, url: str, *, echo: bool = False, sealer: Any = None):
        """`sealer` (a `corral.store.sealing.Sealer`) seals and unseals the secrets the
        store keeps (job secret env, durable store keys); store functions reach it
        through their connection."""
        self.url = normalize_url(url)
        self.sealer = sealer
        options = {"corral_sealer": sealer} if sealer is not None else {}
        self.is_postgres = self.url.startswith("postgresql")
        self.is_sqlite = not self.is_postgres
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        # a lone statement is a transaction of its own: on SQLite no BEGIN is sent (a
        # hook below), on PostgreSQL no BEGIN and no ROLLBACK (two round trips)
        self._lone_options: dict[str, Any] = (
            {"corral_lone": True} if self.is_sqlite else {"isolation_level": "AUTOCOMMIT"}
        )
        self.pool_size = 8 if self.is_sqlite else 10  # connections kept (more may overflow)
        self._checkpointer: sqlite_inline.Checkpointer | None = None
        if self.is_sqlite:
            path = self.sqlite_path
            if path is not None:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                _private_file(path)
            self.engine: AsyncEngine = create_async_engine(
                self.url,
                echo=echo,
                pool_size=self.pool_size,
                max_overflow=8,
                pool_timeout=60,
                execution_options=options,
                module=AsyncAdapt_aiosqlite_dbapi(sqlite_inline, sqlite3),
            )
            _install_sqlite_hooks(self.engine)
            if path is not None:
                self._checkpointer = sqlite_inline.Checkpointer(path)
                self._checkpointer.start()
                # a handle dropped without dispose() does not leave its thread behind
                weakref.finalize(self, self._checkpointer.stop)
        else:
            self.engine = create_async_engine(
                self.url,
                echo=echo,
                pool_size=self.pool_size,
                max_overflow=10,
                pool_timeout=60,
                pool_use_lifo=True,
                execution_options=options,
            )

        # every statement this process sent (a cursor hook; the /metrics counter)
        self.statements = 0
        event.listen(self.engine.sync_engine, "before_cursor_execute", self._count_statement)
        # the connections (one per transaction or read) the database has answered on
        self._answered: weakref.WeakSet[sa.engine.Connection] = weakref.WeakSet()
        if self.is_postgres:
            event.listen(self.engine.sync_engine, "after_cursor_execute", self._note_answered)

    def _count_statement(self, *_args: Any) -> None:
        self.statements += 1

    def _note_answered(self, conn: sa.engine.Connection, *_args: Any) -> None:
        self._answered.add(conn)

    @property
    def sqlite_path(self) -> str | None:
        if not self.is_sqlite:
            return None
        path = self.url.split(":///", 1)[1] if ":///" in self.url else ""
        if not path or path == ":memory:":
            return None
        return os.path.abspath(path)

    def display_url(self) -> str:
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _write_once(self) -> AsyncIterator[AsyncConnection]:
        if self._write_lock is not None:
            async with self._write_lock, self.engine.connect() as conn:
                conn = await conn.execution_options(corral_write=True)
                async with conn.begin():
                    yield conn
        else:
            async with self.engine.begin() as conn:
                yield conn

    async def transact(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run `fn(conn, *args, **kwargs)` in one write transaction; retry on deadlock,
        and on a pooled connection found dead before anything of this transaction
        reached the database (see `_dead_on_arrival`)."""
        return await self._run(True, False, fn, *args, **kwargs)

    async def query(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run `fn(conn, ...)` on a read connection."""
        return await self._run(False, False, fn, *args, **kwargs)

    async def query_one(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run `fn(conn, ...)` that sends at most one statement (a lone read, such as the
        credential lookup of every request) on a read connection, as a transaction of
        its own: no BEGIN (on SQLite one statement and one trip to the database's
        thread less per request; on PostgreSQL neither BEGIN nor ROLLBACK, two round
        trips less)."""
        return await self._run(False, True, fn, *args, **kwargs)

    async def _run(
        self, write: bool, lone: bool, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
    ) -> T:
        """`fn(conn, ...)` on a write transaction or a read connection (`lone`: without
        BEGIN), run again on a connection found dead on arrival, and (writes) after a
        deadlock or serialization failure on PostgreSQL."""
        attempt = 0
        busy_since: float | None = None
        while True:
            sync: sa.engine.Connection | None = None
            began = False
            try:
                async with self._write_once() if write else self.read() as conn:
                    sync = conn.sync_connection
                    if lone:
                        conn = await conn.execution_options(**self._lone_options)
                    began = True
                    return await fn(conn, *args, **kwargs)
            except DBAPIError as exc:
                attempt += 1
                # another process holds the SQLite file's lock: a write that could not
                # begin (nothing of it ran) or a read waits for it, without the loop
                if self.is_sqlite and _sqlite_busy(exc) and not (write and began):
                    now = time.monotonic()
                    busy_since = now if busy_since is None else busy_since
                    if now - busy_since < SQLITE_BUSY_WAIT:
                        await asyncio.sleep(min(0.25, 0.005 * 2 ** min(attempt, 6)))
                        continue
                if self._dead_on_arrival(exc, sync) and attempt < DEAD_ON_ARRIVAL_TRIES:
                    continue
                code = _pg_code(exc) if write and self.is_postgres else None
                if code in _RETRYABLE_PG_CODES and attempt < 8:
                    log.debug("retrying transaction after %s", code)
                    await asyncio.sleep(0.01 * 2**attempt)
                    continue
                raise

    def _dead_on_arrival(self, exc: DBAPIError, sync: sa.engine.Connection | None) -> bool:
        """The error is a dead connection (PostgreSQL restarted, or ended it while it
        sat in the pool) and no statement of this transaction was answered on it: the
        database saw nothing of the transaction, so it may run again on a new
        connection (SQLAlchemy has by then invalidated every connection pooled before
        the error). This replaces a ping before every use (a BEGIN and a ROLLBACK:
        two round trips per transaction). A transaction that was answered even once
        is never run again here: a COMMIT lost with its connection may have landed."""
        return (
            self.is_postgres
            and exc.connection_invalidated
            and sync is not None
            and sync not in self._answered
        )

    def claim(self, stmt: sa.Select) -> sa.Select:
        """Make a select claim its rows: on PostgreSQL skip rows another server holds."""
        if self.is_postgres:
            return stmt.with_for_update(skip_locked=True)
        return stmt

    def lock(self, stmt: sa.Select) -> sa.Select:
        """Make a select wait for and hold its rows until the transaction ends."""
        if self.is_postgres:
            return stmt.with_for_update()
        return stmt

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._checkpointer is not None:
            self._checkpointer.stop()


def _private_file(path: str) -> None:
    """The SQLite file holds sealed secrets and credential hashes: owner-only (0600).
    SQLite gives its -wal and -shm files the database file's mode."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            os.chmod(path + suffix, 0o600)
        except FileNotFoundError:
            pass


def holds_sqlite_write_lock(conn: AsyncConnection) -> bool:
    """Inside a SQLite write transaction (`Database.transact`: BEGIN IMMEDIATE): the
    database's one write lock is held from its first statement, so nothing another
    request or process writes can appear between this transaction's reads and writes."""
    sync = conn.sync_connection
    return (
        conn.dialect.name == "sqlite"
        and sync is not None
        and bool(sync.get_execution_options().get("corral_write"))
    )


def insert_ignoring_duplicates(conn: AsyncConnection, table: sa.Table):
    """An INSERT for this connection's dialect; add .on_conflict_do_nothing()."""
    from sqlalchemy.dialects import postgresql, sqlite

    return (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(table)


def _install_sqlite_hooks(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # take over transaction control from the driver so BEGIN can be IMMEDIATE
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA wal_autocheckpoint=0")  # the Checkpointer's thread does it
        cur.execute("PRAGMA busy_timeout=0")  # waits happen in Database._run, not here
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn):
        options = conn.get_execution_options()
        if options.get("corral_lone"):
            return  # Database.query_one: its one statement is its own transaction
        if options.get("corral_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")
