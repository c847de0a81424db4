"""A throwaway PostgreSQL database for one benchmark run."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Iterator


async def _admin(url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def throwaway_database(server_url: str) -> Iterator[str]:
    """The URL of a new, empty database on the server of `server_url`; dropped after."""
    name = f"corral_bench_{secrets.token_hex(4)}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    try:
        yield f"{server_url.rsplit('/', 1)[0]}/{name}"
    finally:
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
