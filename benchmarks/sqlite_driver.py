"""CPU per statement of the server's SQLite driver (`corral.store.sqlite_inline`: each
call at once on the event loop's thread) next to, in the same run and on the same
file: aiosqlite (each call on a thread of the connection's own, the driver SQLAlchemy's
async SQLite dialect uses by default; `pip install -e '.[bench]'`, skipped with the
reason when it is missing), SQLAlchemy's synchronous engine, and the standard library's
`sqlite3` alone (the floor). Two shapes: a read by primary key, and a write
transaction as the server sends it (BEGIN IMMEDIATE, an UPDATE ... RETURNING by key,
COMMIT). Prints JSON.

    python benchmarks/sqlite_driver.py [--statements 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_dbapi
from sqlalchemy.ext.asyncio import create_async_engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import describe
from corral.store import sqlite_inline

ROWS = 10_000
T = sa.table("t", sa.column("id"), sa.column("v"), sa.column("n"))
READ = sa.select(T.c.v).where(T.c.id == sa.bindparam("i"))
WRITE = sa.update(T).where(T.c.id == sa.bindparam("i")).values(n=T.c.n + 1).returning(T.c.n)


def make_file(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, n INTEGER)")
    conn.executemany("INSERT INTO t VALUES (?, ?, 0)", [(i, f"v{i}") for i in range(ROWS)])
    conn.commit()
    conn.close()


def per_statement_us(started_cpu: float, n: int) -> float:
    return round((time.process_time() - started_cpu) / n * 1e6, 1)


async def measure_async(url: str, module, n: int) -> dict:
    engine = create_async_engine(url, module=module) if module else create_async_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text("PRAGMA synchronous=NORMAL"))
            await conn.commit()
            for i in range(200):  # warm the statement cache
                await conn.execute(READ, {"i": i})
            await conn.rollback()
            cpu = time.process_time()
            for i in range(n):
                (await conn.execute(READ, {"i": i % ROWS})).first()
            read = per_statement_us(cpu, n)
            await conn.rollback()
            cpu = time.process_time()
            for i in range(n // 3):
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
                (await conn.execute(WRITE, {"i": i % ROWS})).first()
                await conn.commit()
            write = per_statement_us(cpu, n // 3 * 3)
    finally:
        await engine.dispose()
    return {"read_us": read, "write_transaction_us_per_statement": write}


def measure_sync_sqlalchemy(path: Path, n: int) -> dict:
    engine = sa.create_engine(f"sqlite:///{path}", isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA synchronous=NORMAL")
            for i in range(200):
                conn.execute(READ, {"i": i})
            cpu = time.process_time()
            for i in range(n):
                conn.execute(READ, {"i": i % ROWS}).first()
            read = per_statement_us(cpu, n)
            cpu = time.process_time()
            for i in range(n // 3):
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                conn.execute(WRITE, {"i": i % ROWS}).first()
                conn.exec_driver_sql("COMMIT")
            write = per_statement_us(cpu, n // 3 * 3)
    finally:
        engine.dispose()
    return {"read_us": read, "write_transaction_us_per_statement": write}


def measure_sqlite3(path: Path, n: int) -> dict:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=NORMAL")
        cpu = time.process_time()
        for i in range(n):
            conn.execute("SELECT v FROM t WHERE id = ?", (i % ROWS,)).fetchone()
        read = per_statement_us(cpu, n)
        cpu = time.process_time()
        for i in range(n // 3):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE t SET n = n + 1 WHERE id = ? RETURNING n", (i % ROWS,)).fetchone()
            conn.execute("COMMIT")
        write = per_statement_us(cpu, n // 3 * 3)
    finally:
        conn.close()
    return {"read_us": read, "write_transaction_us_per_statement": write}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--statements", type=int, default=3000)
    args = parser.parse_args()
    n = args.statements
    with tempfile.TemporaryDirectory(prefix="corral-sqlite-bench-") as tmp:
        path = Path(tmp) / "bench.db"
        make_file(path)
        url = f"sqlite+aiosqlite:///{path}"
        out: dict = {"benchmark": "sqlite_driver", "statements": n}
        out["corral_inline"] = asyncio.run(
            measure_async(url, AsyncAdapt_aiosqlite_dbapi(sqlite_inline, sqlite3), n)
        )
        try:
            import aiosqlite  # noqa: F401
        except ImportError:
            out["aiosqlite"] = {"skipped": "aiosqlite is not installed: pip install -e '.[bench]'"}
        else:
            out["aiosqlite"] = asyncio.run(measure_async(url, None, n))
        out["sqlalchemy_sync"] = measure_sync_sqlalchemy(path, n)
        out["sqlite3_alone"] = measure_sqlite3(path, n)
    peer = out["aiosqlite"]
    if "read_us" in peer:
        out["aiosqlite_over_inline"] = {
            k: round(peer[k] / out["corral_inline"][k], 1) for k in peer
        }
    out["inline_over_sqlite3"] = {
        k: round(out["corral_inline"][k] / out["sqlite3_alone"][k], 1) for k in out["sqlite3_alone"]
    }
    out["machine"] = describe()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
