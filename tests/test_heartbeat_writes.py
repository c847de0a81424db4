"""A full exchange on a heartbeat that reports what the last one reported writes
nothing but the lease.

In process (no loops, no real agent): an agent registers, reports components and a
running attempt, and then sends the same heartbeat again. Every statement the second
exchange sends to the database is counted (a SQLAlchemy cursor hook): the only write
allowed is the one UPDATE of `instances` that renews the lease.

Such a heartbeat usually skips the exchange altogether (its renewal is batched:
tests/test_lease_batching.py); the full exchange still runs on it at least every
`heartbeat_full_every` seconds and after a wake-up, which is what this test pins
(`heartbeat_full_every=0`: every heartbeat runs it)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from sqlalchemy import event

from corral.server.app import close_context, open_context
from corral.server.config import ServerConfig
from corral.server.loops.dispatcher import dispatch_once
from tests import appkit

WRITE = re.compile(r"^\s*(INSERT|UPDATE|DELETE)\s+(?:INTO\s+)?\"?(\w+)", re.I)

COMPONENTS = [
    {"name": "runner", "version": "1.0.0", "sha256": "a" * 64},
    {"name": "agent", "version": "0.9.0", "sha256": "b" * 64},
    {"name": "tools", "version": None, "sha256": None},
]


class Statements:
    """Every statement sent while counting is on."""

    def __init__(self, engine) -> None:
        self.on = False
        self.seen: list[str] = []
        event.listen(engine.sync_engine, "before_cursor_execute", self._hook)

    def _hook(self, _conn, _cursor, statement, _params, _context, _many) -> None:
        if self.on:
            self.seen.append(statement)

    def writes(self) -> list[tuple[str, str]]:
        out = []
        for s in self.seen:
            m = WRITE.match(s)
            if m:
                out.append((m.group(1).upper(), m.group(2).lower()))
        return out


async def _exchange(tmp_path: Path, db_url: str) -> tuple[list[tuple[str, str]], list[str]]:
    config = ServerConfig(data_dir=tmp_path / "srv", db_url=db_url, heartbeat_full_every=0.0)
    ctx = await open_context(config)
    counter = Statements(ctx.db.engine)
    try:
        async with appkit.client(ctx) as http:  # no lifespan: no background loops
            joined = await appkit.join(http, ctx, "quiet")
            agent = joined.headers
            admin = {"Authorization": f"Bearer {ctx.admin_token}"}
            r = await http.post("/api/v1/jobs", json={"command": ["true"]}, headers=admin)
            assert r.status_code in (200, 201), r.text
            await dispatch_once(ctx)

            beat = {
                **joined.beat,
                "components": COMPONENTS,
                "objects": [],
            }
            r = await http.post("/api/v1/agents/heartbeat", json=beat, headers=agent)
            assert r.status_code == 200, r.text
            starts = r.json()["start"]
            assert len(starts) == 1, r.json()
            beat["attempts"] = [
                {"job_id": s["job_id"], "attempt": s["attempt"], "token": s["token"]}
                for s in starts
            ]
            beat["objects"] = None  # unchanged, as the agent sends it after the first
            r = await http.post("/api/v1/agents/heartbeat", json=beat, headers=agent)
            assert r.status_code == 200, r.text

            counter.on = True
            r = await http.post("/api/v1/agents/heartbeat", json=beat, headers=agent)
            counter.on = False
            assert r.status_code == 200, r.text
            reply = r.json()
            assert not (reply["start"] or reply["kill"] or reply["install"]), reply
    finally:
        await close_context(ctx)
    return counter.writes(), counter.seen


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_an_unchanged_heartbeat_writes_only_the_lease(db: str, tmp_path: Path, request) -> None:
    db_url = str(tmp_path / "corral.db") if db == "sqlite" else request.getfixturevalue("pg_url")
    writes, seen = asyncio.run(_exchange(tmp_path, db_url))
    assert writes == [("UPDATE", "instances")], "\n".join(seen)
