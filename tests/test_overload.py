"""A server whose agent exchanges are saturated answers 503 with Retry-After at once
(instead of letting registrations and heartbeats wait for the pool until they time
out), and the agent's HTTP layer waits at least what the server asked."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from corral.agent.upstream import RETRY, SyncServer, Upstream, retry_after
from corral.domain.backoff import RETRY_AFTER_SPREAD
from corral.server.app import close_context, create_app, open_context
from corral.server.config import ServerConfig
from corral.server.loadgate import LoadGate, Overloaded
from corral.server.loadgate import retry_after as advised


def test_advice_grows_with_the_backlog_and_stays_bounded() -> None:
    assert advised(1, 4, 0.02, 0.0) == 1
    assert advised(400, 4, 0.05, 0.0) == 5
    assert advised(400, 4, 0.05, 0.99) == 6  # stretched by at most STRETCH (20%)
    assert advised(10**9, 1, 1.0, 0.5) == 30


def test_exchanges_refused_together_are_told_to_come_back_one_after_another() -> None:
    """A refused exchange is told when the backlog it saw should be gone; those refused
    just before it will come back too, so each is told a later time than the last (as
    if they queued for the gate's capacity, without holding anything meanwhile). Told
    all the same short wait, hundreds of refused agents came back together, were
    refused again, and the server spent itself answering 503s (1,000 agents: 21,704
    refusals, registration took 180 s)."""
    gate = LoadGate(slots=1, queue=0, max_wait=0.1)
    now = [100.0]
    gate.clock = lambda: now[0]
    gate.busy, gate.mean_s = 1, 0.02  # one slot, busy; 50 exchanges a second
    told = []
    for _ in range(500):
        with pytest.raises(Overloaded) as refused:
            gate.check()
        told.append(refused.value.retry_after)
    assert told[0] == 1
    assert min(told[-50:]) >= 500 * 0.02  # the 500th comes back after the 499 before it
    assert max(told[:50]) <= 3, "the first few are told the short wait they always were"
    now[0] += 60.0  # a minute later the crowd is served: the advice is short again
    with pytest.raises(Overloaded) as refused:
        gate.check()
    assert refused.value.retry_after == 1


def test_a_full_gate_refuses_and_an_admitted_exchange_waits() -> None:
    async def main() -> None:
        gate = LoadGate(slots=1, queue=1)
        async with gate.enter():
            waiter = asyncio.create_task(_enter_and_leave(gate))
            await asyncio.sleep(0)  # the waiter takes the one queue place
            assert gate.waiting == 1
            with pytest.raises(Overloaded) as refused:
                async with gate.enter():
                    pass
            assert refused.value.retry_after >= 1
            held = asyncio.create_task(_enter_and_leave(gate, refuse=False))
            await asyncio.sleep(0)
            assert gate.waiting == 2  # a long-poll looking again is never refused
        await asyncio.wait_for(asyncio.gather(waiter, held), 10)
        assert (gate.busy, gate.waiting, gate.refused) == (0, 0, 1)

    asyncio.run(main())


def test_a_gate_refuses_an_exchange_that_already_queued_too_long() -> None:
    gate = LoadGate(slots=4, queue=100, max_wait=2.0)
    gate.check(age=1.9)
    with pytest.raises(Overloaded) as refused:
        gate.check(age=2.5)
    assert refused.value.retry_after >= 3


def test_a_short_expected_wait_does_not_refuse_what_the_event_loop_delayed() -> None:
    """The expected wait in the gate is kept short (an answer soon or a 503 at once);
    how long a request already waited in the server before the gate (a slow loop, a
    credential check) has its own, longer limit."""
    cfg = ServerConfig()
    assert cfg.agent_max_wait <= 0.1 < cfg.agent_max_age
    gate = LoadGate(
        slots=4,
        queue=1000,
        max_wait=cfg.agent_max_wait,
        max_age=cfg.agent_max_age,
        urgent_max_wait=cfg.agent_register_max_wait,
    )
    gate.check(age=cfg.agent_max_age - 0.1)
    with pytest.raises(Overloaded):
        gate.check(age=cfg.agent_max_age + 0.1)
    gate.mean_s, gate.busy, gate.waiting = 0.02, 4, 19  # 20 ahead x 20 ms / 4 slots = 0.1 s
    gate.check()
    gate.waiting = 20
    with pytest.raises(Overloaded):
        gate.check()
    # a registration may expect to wait longer (a storm of them is served from a queue)
    assert cfg.agent_register_max_wait > cfg.agent_max_wait
    gate.waiting_urgent = 20
    gate.check(urgent=True)
    gate.waiting_urgent = int(cfg.agent_register_max_wait * 4 / 0.02)
    with pytest.raises(Overloaded):
        gate.check(urgent=True)


def test_a_gate_refuses_a_wait_it_expects_too_long() -> None:
    async def main() -> None:
        gate = LoadGate(slots=1, queue=100, max_wait=1.0)
        gate.mean_s = 0.4  # each exchange takes 0.4 s: a third in line would wait 1.2 s
        async with gate.enter():
            waiters = [asyncio.create_task(_enter_and_leave(gate)) for _ in range(2)]
            await asyncio.sleep(0)
            assert gate.waiting == 2
            with pytest.raises(Overloaded):
                gate.check()
        await asyncio.wait_for(asyncio.gather(*waiters), 10)

    asyncio.run(main())


async def _enter_and_leave(
    gate: LoadGate, refuse: bool = True, urgent: bool = False, order: list | None = None
) -> None:
    async with gate.enter(refuse=refuse, urgent=urgent):
        if order is not None:
            order.append("registration" if urgent else "heartbeat")


def test_registrations_go_ahead_of_waiting_heartbeats() -> None:
    """A slot freed goes to a waiting registration before heartbeats that came first,
    and a registration is refused only for the registrations ahead of it."""

    async def main() -> None:
        gate = LoadGate(slots=1, queue=2)
        order: list[str] = []
        async with gate.enter():
            beats = [asyncio.create_task(_enter_and_leave(gate, order=order)) for _ in range(2)]
            await asyncio.sleep(0)
            assert gate.waiting == 2
            with pytest.raises(Overloaded):
                gate.check()  # a third heartbeat: the queue is full
            reg = asyncio.create_task(_enter_and_leave(gate, urgent=True, order=order))
            await asyncio.sleep(0)
            assert gate.waiting_urgent == 1
        await asyncio.wait_for(asyncio.gather(*beats, reg), 10)
        assert order == ["registration", "heartbeat", "heartbeat"]
        assert (gate.busy, gate.waiting, gate.waiting_urgent) == (0, 0, 0)

    asyncio.run(main())


def test_a_waiter_cancelled_as_it_is_handed_a_slot_passes_it_on() -> None:
    async def main() -> None:
        gate = LoadGate(slots=1, queue=5)
        async with gate.enter():
            first = asyncio.create_task(_enter_and_leave(gate))
            second = asyncio.create_task(_enter_and_leave(gate))
            await asyncio.sleep(0)
        first.cancel()  # the slot was handed to it; it gives it up
        await asyncio.wait_for(second, 10)
        with pytest.raises(asyncio.CancelledError):
            await first
        async with gate.enter():  # no slot lost
            assert gate.busy == 1

    asyncio.run(main())


def test_a_saturated_server_answers_503_with_retry_after(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = ServerConfig(data_dir=tmp_path / "srv", agent_slots=1, agent_queue=0)
        ctx = await open_context(cfg)
        try:
            transport = httpx.ASGITransport(app=create_app(ctx))
            async with httpx.AsyncClient(transport=transport, base_url="http://srv") as http:
                join = {"Authorization": f"Bearer {ctx.join_token}"}
                r = await http.post(
                    "/api/v1/agents/register",
                    json={"name": "w0", "cpus": 1, "memory_mb": 64},
                    headers=join,
                )
                assert r.status_code == 200, r.text
                reg = r.json()
                agent = {"Authorization": f"Bearer {reg['credential']}"}
                beat = {"instance_id": reg["instance_id"], "incarnation": reg["incarnation"]}
                body = {"name": "w1", "cpus": 1, "memory_mb": 64}
                async with ctx.gate().enter():  # every slot busy, no queue
                    r = await http.post("/api/v1/agents/register", json=body, headers=join)
                    assert r.status_code == 503, r.text
                    assert r.json()["error"]["code"] == "overloaded"
                    assert int(r.headers["retry-after"]) >= 1
                    r = await http.post("/api/v1/agents/heartbeat", json=beat, headers=agent)
                    assert r.status_code == 503, r.text
                    assert int(r.headers["retry-after"]) >= 1
                    # a heartbeat's credential is read before it is refused (a refusal
                    # renews the agent's lease: tests/test_heartbeat_pacing.py)
                    bogus = {"Authorization": "Bearer cra_not_looked_up"}
                    r = await http.post("/api/v1/agents/heartbeat", json=beat, headers=bogus)
                    assert r.status_code == 401, r.text
                r = await http.post("/api/v1/agents/register", json=body, headers=join)
                assert r.status_code == 200, r.text
                r = await http.post("/api/v1/agents/heartbeat", json=beat, headers=agent)
                assert r.status_code == 200, r.text
        finally:
            await close_context(ctx)

    asyncio.run(main())


def test_retry_after_is_read_as_seconds() -> None:
    assert retry_after("3") == 3.0
    assert retry_after(" 1.5 ") == 1.5
    assert retry_after("100000") == 300.0
    assert retry_after(None) is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert retry_after("-1") is None and retry_after("nan") is None


def test_the_retry_waits_at_least_what_the_server_asked() -> None:
    retry = Upstream(["http://a", "http://b"]).retry(None)
    assert 7.0 <= retry.failed("HTTP 503", 7.0) <= 7.0 * (1 + RETRY_AFTER_SPREAD)
    assert retry.failed("HTTP 503") <= RETRY.maximum * (1 + RETRY.jitter)


def test_clients_told_the_same_retry_after_do_not_come_back_together() -> None:
    """A Retry-After is whole seconds: every agent refused in one burst is told the same
    few, and coming back exactly then re-forms the burst (a benchmark at 200 agents saw
    waves of 20-100 heartbeats queued 0.3-0.7 s behind each other). Each waits what it
    was told plus a random part of it, so a burst spreads over that span."""
    waits = sorted(Upstream(["http://a"]).retry(None).failed("HTTP 503", 2.0) for _ in range(200))
    assert waits[0] >= 2.0 and waits[-1] <= 2.0 * (1 + RETRY_AFTER_SPREAD)
    assert waits[-1] - waits[0] >= 0.5, "they come back within half a second of each other"
    # no tenth of a second holds more than a quarter of them
    crowd = max(sum(1 for w in waits if t <= w < t + 0.1) for t in waits)
    assert crowd <= 50, f"{crowd} of 200 came back within 0.1 s of each other"


class _Busy(http.server.BaseHTTPRequestHandler):
    """503 with Retry-After: 1 the first time, then 200."""

    calls: ClassVar[list[float]] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Busy.calls.append(time.monotonic())
        busy = len(_Busy.calls) == 1
        self.send_response(503 if busy else 200)
        if busy:
            self.send_header("Retry-After", "1")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")


def test_the_sync_client_honours_retry_after() -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        client = SyncServer([f"http://127.0.0.1:{srv.server_address[1]}"], {})
        resp = client.request("POST", "/x", json={}, deadline=time.monotonic() + 30)
        assert resp.status_code == 200
        first, second = _Busy.calls
        assert second - first >= 1.0  # not the 0.2 s first back-off
        client.close()
    finally:
        srv.shutdown()
