"""Two servers on one PostgreSQL, in process (no loops): a long-poll held on server B
is woken by a change made on server A through LISTEN/NOTIFY, and B does not re-run
the heartbeat exchange on a timer while it holds it. (A hold whose report is the one
B answered just before begins with a batched lease renewal instead of an exchange,
corral.server.leases; the wake-up still runs the exchange.)

Exchanges on B are counted by the statement each one runs (deliver_attempts' select
of attempts not yet handed out) on B's own engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import event

from corral.server.app import close_context, open_context, start_wake_bus
from corral.server.config import ServerConfig
from corral.server.loops.dispatcher import dispatch_once
from corral.store.wakebus import decode, encode
from tests import appkit

pytestmark = [pytest.mark.postgres]

EXCHANGE_MARK = "job_attempts.token_hash IS NULL AND jobs.current_attempt"


def test_keys_survive_the_wire_and_long_batches_split() -> None:
    keys = [("instance", "i-1"), ("job", "7"), "events"]
    assert [k for p in encode(keys) for k in decode(p)] == keys
    many = [("instance", f"i-{n:06d}") for n in range(2000)]
    payloads = encode(many)
    assert len(payloads) > 1 and all(len(p) < 8000 for p in payloads)
    assert [k for p in payloads for k in decode(p)] == many
    assert decode("not json") == [] and decode('{"a": 1}') == []


class Exchanges:
    def __init__(self, engine) -> None:
        self.n = 0
        event.listen(engine.sync_engine, "before_cursor_execute", self._hook)

    def _hook(self, _conn, _cursor, statement, *_args) -> None:
        if EXCHANGE_MARK in statement:
            self.n += 1


async def _two_servers(tmp_path: Path, pg_url: str) -> None:
    def config(name: str) -> ServerConfig:
        # a long told interval, so the hold is the agent's `wait`, not the interval
        return ServerConfig(data_dir=tmp_path / name, db_url=pg_url, heartbeat_base=60)

    a = await open_context(config("a"))
    b = await open_context(config("b"))
    buses = [start_wake_bus(a), start_wake_bus(b)]
    exchanges = Exchanges(b.db.engine)
    try:
        await asyncio.wait_for(
            _until(lambda: a.notifier.cross_server and b.notifier.cross_server), 20
        )
        async with appkit.client(a, "a") as http_a, appkit.client(b, "b") as http_b:
            joined = await appkit.join(http_b, b, "far", cpus=2, memory_mb=512)
            reg, agent, beat = joined.reg, joined.headers, joined.beat

            # an idle hold of 3 s on B: one exchange, not one every half second
            before = exchanges.n
            r = await http_b.post(
                "/api/v1/agents/heartbeat", json={**beat, "wait": 3}, headers=agent
            )
            assert r.status_code == 200 and r.json()["start"] == [], r.text
            assert exchanges.n - before == 1

            # a job placed by A wakes the hold on B at once
            before = exchanges.n
            held = asyncio.create_task(
                http_b.post("/api/v1/agents/heartbeat", json={**beat, "wait": 50}, headers=agent)
            )
            # the hold has begun: with its first look (an exchange), or, as the report is
            # the one B answered just before, with only its lease renewed (no exchange)
            iid = reg["instance_id"]
            await asyncio.wait_for(
                _until(lambda: exchanges.n - before == 1 or b.leases.is_pending(iid)), 20
            )
            looked = exchanges.n - before
            r = await http_a.post(
                "/api/v1/jobs",
                json={"command": ["true"]},
                headers={"Authorization": f"Bearer {a.admin_token}"},
            )
            assert r.status_code == 201, r.text
            assert await dispatch_once(a) is False  # placed by A, which wakes the instance
            r = await asyncio.wait_for(held, 20)  # well before the 50 s hold ends
            assert r.status_code == 200, r.text
            assert len(r.json()["start"]) == 1, r.text
            # the first look (unless only the lease was renewed), and the one it was woken for
            assert exchanges.n - before == looked + 1
    finally:
        for t in buses:
            assert t is not None
            t.cancel()
        await asyncio.gather(*buses, return_exceptions=True)
        await close_context(a)
        await close_context(b)


async def _until(predicate) -> None:
    """Poll `predicate`; callers bound it with asyncio.wait_for (the deadline)."""
    while not predicate():  # noqa: ASYNC110 - a plain predicate, no event to wait on
        await asyncio.sleep(0.02)


@pytest.mark.slow  # two servers' contexts and a held exchange: seconds
def test_a_hold_on_one_server_is_woken_by_another(tmp_path: Path, pg_url: str) -> None:
    asyncio.run(_two_servers(tmp_path, pg_url))
