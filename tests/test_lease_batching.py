"""A heartbeat that reports nothing new only renews its lease, in memory; the
renewals are written in one statement per flush; the reaper never judges a renewal
still in that buffer; a report that changed (or a wake-up for the instance, or time)
still runs the full exchange at once.

In process (httpx ASGITransport, no lifespan: no background loops), with the server's
clock under the test's control. Statements are counted with a SQLAlchemy cursor hook."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import event

from corral.domain.heartbeat import LastExchange, Look, look_needed
from corral.domain.instances import InstanceState
from corral.server.app import close_context, open_context
from corral.server.config import ServerConfig
from corral.server.leases import flush_leases, instance_key
from corral.server.loops import reaper
from corral.server.loops.dispatcher import dispatch_once
from corral.server.loops.drainer import drain_once
from corral.store import drain
from corral.store.schema import instances
from tests import appkit

WRITE = re.compile(r"^\s*(INSERT|UPDATE|DELETE)\s+(?:INTO\s+)?\"?(\w+)", re.I)
BEGIN_WRITE = re.compile(r"^\s*BEGIN\s+IMMEDIATE", re.I)

COMPONENTS = [
    {"name": "runner", "version": "1.0.0", "sha256": "a" * 64},
    {"name": "agent", "version": "1.0.0", "sha256": "b" * 64},
]


class Statements:
    def __init__(self, engine) -> None:
        self.on = False
        self.seen: list[tuple[str, bool]] = []  # (statement, executemany)
        event.listen(engine.sync_engine, "before_cursor_execute", self._hook)

    def _hook(self, _conn, _cursor, statement, _params, _context, many) -> None:
        if self.on:
            self.seen.append((statement, bool(many)))

    def writes(self) -> list[tuple[str, str, bool]]:
        out = []
        for s, many in self.seen:
            if m := WRITE.match(s):
                out.append((m.group(1).upper(), m.group(2).lower(), many))
        return out

    def write_transactions(self) -> int:
        return sum(1 for s, _ in self.seen if BEGIN_WRITE.match(s)) + len(self.writes())

    def clear(self) -> None:
        self.seen.clear()


class Harness:
    """One server context with a settable clock, an in-process client, counted
    statements and counted write transactions."""

    def __init__(self, ctx, http: httpx.AsyncClient) -> None:
        self.ctx, self.http = ctx, http
        self.t = 1_000_000.0
        ctx.clock = lambda: self.t
        ctx.started_at = self.t - 3600  # past the reaper's start-up grace
        ctx.notifier.cross_server = True  # PostgreSQL: as with the wake bus up
        self.counter = Statements(ctx.db.engine)
        self.transactions = 0
        self.last_registration: dict = {}  # the register route's last reply
        inner = ctx.db.transact

        async def counting(fn, *a, **kw):
            self.transactions += 1
            return await inner(fn, *a, **kw)

        ctx.db.transact = counting

    async def register(self, name: str) -> tuple[dict, dict]:
        joined = await appkit.join(self.http, self.ctx, name)
        self.last_registration = joined.reg
        return joined.headers, {**joined.beat, "components": COMPONENTS, "objects": []}

    async def beat(self, cred: dict, beat: dict) -> dict:
        r = await self.http.post("/api/v1/agents/heartbeat", json=beat, headers=cred)
        assert r.status_code == 200, r.text
        return r.json()

    async def settle(self, cred: dict, beat: dict) -> None:
        """The first report (objects listed) and the next (objects unchanged: None)
        both run the full exchange; from then on the report is the same."""
        await self.beat(cred, beat)
        beat["objects"] = None
        await self.beat(cred, beat)

    async def row(self, instance_id: str):
        async with self.ctx.db.engine.connect() as conn:
            q = sa.select(instances).where(instances.c.id == instance_id)
            return (await conn.execute(q)).mappings().one()


async def _with_server(tmp_path: Path, db_url: str, body) -> None:
    ctx = await open_context(ServerConfig(data_dir=tmp_path / "srv", db_url=db_url))
    try:
        async with appkit.client(ctx) as http:
            await body(Harness(ctx, http))
    finally:
        await close_context(ctx)


def _db_url(db: str, tmp_path: Path, request) -> str:
    return str(tmp_path / "corral.db") if db == "sqlite" else request.getfixturevalue("pg_url")


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_unchanged_heartbeats_write_nothing_until_one_flush(
    db: str, tmp_path: Path, request
) -> None:
    async def body(h: Harness) -> None:
        agents = [await h.register(f"quiet{k}") for k in range(3)]
        for cred, beat in agents:
            await h.settle(cred, beat)
            await h.beat(cred, beat)  # the credential's first use is recorded; then not
        h.counter.clear()
        h.counter.on = True
        h.transactions = 0
        for _ in range(4):
            h.t += 2.0
            for cred, beat in agents:
                reply = await h.beat(cred, beat)
                assert reply["action"] == "continue" and reply["state"] == "running", reply
                assert not (reply["start"] or reply["kill"] or reply["install"]), reply
        assert h.transactions == 0
        assert h.counter.write_transactions() == 0, "\n".join(s for s, _ in h.counter.seen)
        heard = h.t

        h.counter.clear()
        await flush_leases(h.ctx)
        h.counter.on = False
        assert h.transactions == 1
        assert h.counter.writes() == [("UPDATE", "instances", True)], h.counter.seen
        for _cred, beat in agents:
            row = await h.row(beat["instance_id"])
            assert row["last_heartbeat_at"] == heard
            assert row["lease_until"] > heard
        # nothing pending: the next flush sends nothing
        h.counter.clear()
        h.counter.on = True
        await flush_leases(h.ctx)
        assert h.counter.seen == []

    asyncio.run(_with_server(tmp_path, _db_url(db, tmp_path, request), body))


@pytest.mark.parametrize("flush_in_reaper", [True, False])
def test_reaper_never_loses_an_agent_whose_renewal_is_only_buffered(
    flush_in_reaper: bool, tmp_path: Path, monkeypatch
) -> None:
    """With the reaper's own flush (the renewal is written before it judges) and
    without it (a renewal heard after that flush, still pending): not lost. A silent
    agent next to it is lost, so the reaper did judge."""
    if not flush_in_reaper:

        async def no_flush(ctx) -> bool:
            return False

        monkeypatch.setattr(reaper, "flush_leases", no_flush)

    async def body(h: Harness) -> None:
        # a cheap renewal just before the written lease runs out: only if the last full
        # exchange may be that old
        h.ctx.config.heartbeat_full_every = 3600.0
        cred, beat = await h.register("alive")
        _, silent_beat = await h.register("silent")
        await h.settle(cred, beat)
        lease = (await h.row(beat["instance_id"]))["lease_until"]
        h.t = lease - 1.0
        await h.beat(cred, beat)  # a cheap renewal, in the buffer only
        assert h.ctx.leases.is_pending(beat["instance_id"])
        assert (await h.row(beat["instance_id"]))["lease_until"] == lease
        h.t = lease + 5.0  # the written lease ran out; the buffered one has not
        await reaper.reap_once(h.ctx)
        assert (await h.row(beat["instance_id"]))["lost_at"] is None
        assert (await h.row(silent_beat["instance_id"]))["lost_at"] is not None
        if flush_in_reaper:
            assert (await h.row(beat["instance_id"]))["lease_until"] > h.t

    asyncio.run(_with_server(tmp_path, str(tmp_path / "corral.db"), body))


@pytest.mark.parametrize("change", ["object", "attempt", "wake", "placement", "time"])
def test_a_change_runs_the_full_exchange_at_once(change: str, tmp_path: Path) -> None:
    """A report that differs (a new object held, an attempt ended), a wake-up for
    the instance (as a cancel wakes it) or the time since the last full exchange: the
    heartbeat runs the exchange (a write transaction), not a buffered renewal. A job
    placed on it, and nothing else: a look for that job (a transaction that hands it
    out), its lease renewal buffered (tests/test_held_exchange.py)."""

    async def body(h: Harness) -> None:
        cred, beat = await h.register("busy")
        await h.settle(cred, beat)
        h.t += 1.0
        await h.beat(cred, beat)
        assert h.ctx.leases.is_pending(beat["instance_id"])  # cheap, so far
        await flush_leases(h.ctx)
        h.transactions = 0
        expect_start = False
        if change == "object":
            beat["objects"] = ["c" * 64]
        elif change == "wake":
            h.ctx.notifier.wake(instance_key(beat["instance_id"]))
        elif change == "attempt" or change == "placement":
            admin = {"Authorization": f"Bearer {h.ctx.admin_token}"}
            r = await h.http.post("/api/v1/jobs", json={"command": ["true"]}, headers=admin)
            assert r.status_code in (200, 201), r.text
            await dispatch_once(h.ctx)  # wakes the instance
            h.transactions = 0
            if change == "attempt":
                reply = await h.beat(cred, beat)
                (start,) = reply["start"]
                beat["attempts"] = [
                    {
                        "job_id": start["job_id"],
                        "attempt": start["attempt"],
                        "token": start["token"],
                    }
                ]
                # taking what it was handed is no change (tests/test_held_exchange.py);
                # the attempt's end is
                await h.beat(cred, beat)
                beat["attempts"] = []
                h.transactions = 0
            else:
                expect_start = True
        else:
            h.t += h.ctx.config.heartbeat_full_every
        h.t += 1.0
        reply = await h.beat(cred, beat)
        assert h.transactions >= 1, "the exchange did not run"
        assert bool(reply["start"]) is expect_start, reply
        if change == "placement":
            assert h.ctx.leases.is_pending(beat["instance_id"])
            return
        assert not h.ctx.leases.is_pending(beat["instance_id"])
        assert (await h.row(beat["instance_id"]))["last_heartbeat_at"] == h.t

    asyncio.run(_with_server(tmp_path, str(tmp_path / "corral.db"), body))


def test_the_look_needed_is_conservative() -> None:
    last = LastExchange(b"d", 3, 7, 100.0, InstanceState.RUNNING)
    full = Look.FULL
    assert look_needed(last, b"d", 3, 7, 105.0, 10.0) is Look.NONE
    assert look_needed(None, b"d", 3, 7, 105.0, 10.0) is full  # never answered here
    assert look_needed(last, b"e", 3, 7, 105.0, 10.0) is full  # a different report
    assert look_needed(last, b"d", 4, 7, 105.0, 10.0) is full  # woken since, not by a placement
    assert look_needed(last, b"d", 3, 7, 110.0, 10.0) is full  # too long ago
    assert look_needed(last, b"d", 3, 7, 99.0, 10.0) is full  # the clock went back
    assert look_needed(last, b"d", 3, 7, 105.0, 10.0, wakes_trusted=False) is full
    # woken since only by placements (each wakes both): those are all there is to see
    assert look_needed(last, b"d", 5, 9, 105.0, 10.0) is Look.PLACEMENTS
    # by placements and something else: everything
    assert look_needed(last, b"d", 6, 9, 105.0, 10.0) is full
    # placements, but the report differs, or the full look is due, or it lists objects
    assert look_needed(last, b"e", 5, 9, 105.0, 10.0) is full
    assert look_needed(last, b"d", 5, 9, 110.0, 10.0) is full
    assert look_needed(last, b"d", 5, 9, 105.0, 10.0, lists_objects=True) is full
    assert look_needed(last, b"d", 5, 9, 105.0, 10.0, wakes_trusted=False) is full


def test_a_credentials_later_uses_are_recorded_by_the_flush(tmp_path: Path) -> None:
    """Its first use is written at once; a use a minute later goes with the next
    flush, not in a transaction of its own."""

    async def body(h: Harness) -> None:
        cred, beat = await h.register("user")
        await h.settle(cred, beat)
        await flush_leases(h.ctx)
        async with h.ctx.db.engine.connect() as conn:
            q = sa.text("SELECT last_used_at FROM tokens WHERE instance_id = :i")
            first = (await conn.execute(q, {"i": beat["instance_id"]})).scalar_one()
        assert first is not None
        h.t += 61.0
        h.counter.clear()
        h.counter.on = True
        await h.beat(cred, beat)
        assert not [w for w in h.counter.writes() if w[1] == "tokens"], h.counter.seen
        h.counter.clear()
        await flush_leases(h.ctx)
        assert [w[:2] for w in h.counter.writes()] == [("UPDATE", "tokens")], h.counter.seen
        async with h.ctx.db.engine.connect() as conn:
            used = (await conn.execute(q, {"i": beat["instance_id"]})).scalar_one()
        assert used == h.t

    asyncio.run(_with_server(tmp_path, str(tmp_path / "corral.db"), body))


def test_a_drain_begun_without_a_wake_up_is_seen_at_the_next_heartbeat(tmp_path: Path) -> None:
    """A fleet's scale-in drains an instance in the store without waking it; the
    drainer's next pass wakes it, so its next (unchanged) report runs the exchange
    and is told `draining` at once, not after heartbeat_full_every."""

    async def body(h: Harness) -> None:
        cred, beat = await h.register("shrunk")
        admin = {"Authorization": f"Bearer {h.ctx.admin_token}"}
        r = await h.http.post("/api/v1/jobs", json={"command": ["true"]}, headers=admin)
        assert r.status_code in (200, 201), r.text
        await dispatch_once(h.ctx)
        (start,) = (await h.beat(cred, beat))["start"]  # a running attempt: no retirement
        beat["attempts"] = [
            {"job_id": start["job_id"], "attempt": start["attempt"], "token": start["token"]}
        ]
        beat["objects"] = None
        await h.beat(cred, beat)
        h.t += 1.0
        assert (await h.beat(cred, beat))["state"] == "running"
        assert h.ctx.leases.is_pending(beat["instance_id"])  # the cheap path, so far
        await h.ctx.db.transact(drain.request_drain, beat["instance_id"], False, h.t)
        await drain_once(h.ctx)
        h.t += 1.0
        assert (await h.beat(cred, beat))["state"] == "draining"

    asyncio.run(_with_server(tmp_path, str(tmp_path / "corral.db"), body))
