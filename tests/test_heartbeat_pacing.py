"""Exchange pacing at scale, decoupled from liveness: once agents renew their lease
between exchanges, the exchange interval keeps growing with the fleet (past the 30 s
that bounded it when exchanges were all the liveness there was), and an exchange that
reports nothing new stays cheap (no transaction) for a few of those intervals; the
agent's object-list refresh stretches with them. How soon a silent agent is found
still follows the renewal interval (test_lease_renewal, test_liveness)."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from corral.agent import state as S
from corral.api import HeartbeatReply
from corral.domain.heartbeat import (
    EXCHANGE_CEILING_WITHOUT_LEASES,
    FULL_EVERY_INTERVALS,
    INTERVAL_SPREAD,
    LastExchange,
    Look,
    full_exchange_every,
    grace_period,
    look_needed,
    objects_refresh,
    renewal_interval,
    told_interval,
)
from corral.domain.instances import InstanceState
from corral.server.config import ServerConfig
from corral.server.leases import configured_pacing, flush_leases
from corral.server.loops import reaper
from tests.test_lease_batching import Harness, _with_server

FLEETS = [1, 10, 100, 101, 500, 1_000, 1_500, 2_000, 5_000, 10_000]  # per server


def _pace(agents: int, cfg: ServerConfig | None = None):
    return configured_pacing(cfg or ServerConfig(), agents)


@pytest.mark.parametrize("agents", FLEETS)
def test_exchanges_stay_within_the_fleet_rate_past_the_old_30_s_ceiling(agents: int) -> None:
    """With renewals, 10,000 agents exchange every 200 s (50 a second), not every 30 s
    (333 a second); the silent-agent deadline follows the renewals, not that."""
    cfg = ServerConfig()
    pace = _pace(agents, cfg)
    assert agents / pace.interval <= cfg.heartbeat_max_rate + 1e-9
    assert pace.interval <= cfg.heartbeat_ceiling
    grace = grace_period(renewal_interval(pace.interval, pace.lease), cfg.agent_grace)
    assert grace + cfg.reaper_interval + cfg.lease_flush_interval <= 15.0
    if pace.lease is None:  # exchanges are the liveness: the old ceiling holds
        assert pace.interval <= EXCHANGE_CEILING_WITHOUT_LEASES


def test_the_interval_passes_30_s_only_with_renewals() -> None:
    assert _pace(10_000).interval == 200.0
    assert _pace(100_000).interval == ServerConfig().heartbeat_ceiling
    # a server that tells no renewals (its lease ceiling as long as any interval)
    # keeps the exchanges as its liveness, at most 30 s apart
    no_leases = ServerConfig(lease_base=300.0, lease_ceiling=300.0)
    pace = _pace(10_000, no_leases)
    assert pace.lease is None and pace.interval == EXCHANGE_CEILING_WITHOUT_LEASES


@pytest.mark.parametrize("agents", FLEETS)
def test_most_unchanged_exchanges_are_cheap_at_scale(agents: int) -> None:
    """The full-exchange period is never shorter than a few intervals (with a 10 s
    period and a 20 s interval every exchange was a full one), nor than configured."""
    cfg = ServerConfig()
    pace = _pace(agents, cfg)
    every = full_exchange_every(pace.interval, cfg.heartbeat_full_every)
    assert every >= cfg.heartbeat_full_every
    assert every >= FULL_EVERY_INTERVALS * pace.interval
    # fleet-wide, full exchanges of idle agents come at most a third of the rate
    assert agents / every <= cfg.heartbeat_max_rate / FULL_EVERY_INTERVALS + 1e-9
    # the object refresh (which forces a full exchange) is rarer still
    assert objects_refresh(pace.interval) >= every


def test_a_zero_full_exchange_period_turns_the_skipping_off() -> None:
    assert full_exchange_every(200.0, 0.0) == 0.0


def test_a_listed_object_report_always_runs_the_exchange() -> None:
    last = LastExchange(b"d", 3, 0, 100.0, InstanceState.RUNNING)
    assert look_needed(last, b"d", 3, 0, 105.0, 10.0) is Look.NONE
    assert look_needed(last, b"d", 3, 0, 105.0, 10.0, lists_objects=True) is Look.FULL


def _replied(interval: float) -> S.HeartbeatReplied:
    return S.HeartbeatReplied(HeartbeatReply(action="continue", interval=interval))


def _heartbeat(out: list) -> S.SendHeartbeat:
    (hb,) = [i for i in out if isinstance(i, S.SendHeartbeat)]
    return hb


@pytest.mark.parametrize("interval", [2.0, 20.0, 200.0])
def test_the_agent_refreshes_its_object_list_as_often_as_its_interval_allows(
    interval: float,
) -> None:
    st = S.AgentState()
    st.handle(S.Tick(), 0.0)
    hb = _heartbeat(st.handle(S.Registered("i-1", 1, interval), 0.0))
    assert hb.objects == ()  # the first report lists them
    t = 0.0
    listed = [0.0]
    while t < 3 * objects_refresh(interval):
        t += interval
        hb = _heartbeat(st.handle(_replied(interval), t))
        if hb.objects is not None:
            listed.append(t)
    gaps = [b - a for a, b in itertools.pairwise(listed)]
    assert gaps, "never refreshed"
    assert all(objects_refresh(interval) <= g <= objects_refresh(interval) + interval for g in gaps)


def test_unchanged_objects_after_a_listing_skip_the_exchange(tmp_path: Path) -> None:
    """The report after one that listed the objects says they are unchanged (None):
    it reports what the last exchange got, so it only renews the lease (it ran a
    second full exchange before)."""

    async def body(h: Harness) -> None:
        cred, beat = await h.register("lister")
        await h.beat(cred, beat)  # lists its objects: the full exchange
        h.transactions = 0
        h.t += 1.0
        beat["objects"] = None
        await h.beat(cred, beat)
        assert h.transactions == 0, "an unchanged report ran the exchange"
        assert h.ctx.leases.is_pending(beat["instance_id"])
        await flush_leases(h.ctx)
        # a refresh (the same list again) runs it, as any listing does
        h.transactions = 0
        h.t += 1.0
        beat["objects"] = []
        await h.beat(cred, beat)
        assert h.transactions >= 1

    asyncio.run(_with_server(tmp_path, str(tmp_path / "corral.db"), body))


# ---- under load: refused heartbeats still prove their agent alive ---------------------------


def _fill(gate) -> None:
    """Every slot busy and the queue full: the next exchange is refused."""
    gate.busy, gate.waiting = gate.slots, gate.queue


def test_an_agent_refused_for_load_is_not_declared_lost(tmp_path: Path) -> None:
    """A freshly registered agent (no renewals admitted yet) whose first exchange is
    refused with 503 and a Retry-After longer than its lease: the refusal renews its
    lease past that Retry-After, so waiting as told does not get it declared lost
    (with a 10 s grace and a 30 s Retry-After, it was). A silent one beside it is."""

    async def body(h: Harness) -> None:
        cred, beat = await h.register("refused")
        _, silent = await h.register("silent")
        registered_lease = (await h.row(beat["instance_id"]))["lease_until"]
        gate = h.ctx.gate()
        _fill(gate)
        h.t += 1.0
        r = await h.http.post("/api/v1/agents/heartbeat", json=beat, headers=cred)
        assert r.status_code == 503, r.text
        retry = float(r.headers["retry-after"])
        assert h.ctx.leases.is_pending(beat["instance_id"])
        gate.busy = gate.waiting = 0
        # it waits as told; meanwhile its registration's lease has run out
        h.t = max(h.t + retry, registered_lease + 1.0)
        await reaper.reap_once(h.ctx)
        assert (await h.row(beat["instance_id"]))["lost_at"] is None
        assert (await h.row(silent["instance_id"]))["lost_at"] is not None
        await h.beat(cred, beat)  # comes back as told: served

    asyncio.run(_with_server(tmp_path, str(tmp_path / "corral.db"), body))


def test_a_heartbeat_that_changes_nothing_is_served_while_the_gate_is_full(
    tmp_path: Path,
) -> None:
    """It needs no database work (a buffered renewal): refusing it would only send
    its agent back later with the same report."""

    async def body(h: Harness) -> None:
        cred, beat = await h.register("steady")
        await h.settle(cred, beat)
        await flush_leases(h.ctx)
        _fill(h.ctx.gate())
        h.t += 1.0
        await h.beat(cred, beat)  # 200, asserted by beat()
        assert h.ctx.leases.is_pending(beat["instance_id"])

    asyncio.run(_with_server(tmp_path, str(tmp_path / "corral.db"), body))


# ---- agents that came together drift apart ---------------------------------------------------


def test_agents_answered_together_are_told_intervals_that_spread_them() -> None:
    """Agents whose replies left together (a registration storm, or a burst a busy
    server served from one queue) would come back together for ever if each were told
    the fleet's interval: every burst re-forms the next (a benchmark at 200 agents saw
    waves of 50-120 exchanges every few seconds, p99 seconds at 30% server CPU). Each
    reply tells an interval shortened by a random share, never longer than the fleet's
    (the rate the server is paced for holds), the same for the same agent at the same
    time (the simulator replays)."""
    told = [told_interval(8.0, f"i-{k}", 1000.0) for k in range(200)]
    assert all(8.0 * (1 - INTERVAL_SPREAD) <= t <= 8.0 for t in told)
    assert max(told) - min(told) >= 0.5 * 8.0 * INTERVAL_SPREAD
    crowd = max(sum(1 for u in told if t <= u < t + 0.05) for t in told)
    assert crowd <= 40, f"{crowd} of 200 told intervals within 50 ms of each other"
    assert told_interval(8.0, "i-1", 1000.0) == told_interval(8.0, "i-1", 1000.0)
    assert told_interval(8.0, "i-1", 1000.0) != told_interval(8.0, "i-1", 1008.0)


def test_heartbeat_replies_tell_the_spread_interval(tmp_path: Path) -> None:
    """Both ways a heartbeat is answered (a full exchange, and a batched renewal that
    changes nothing) tell a spread interval, and a held long-poll is held that long."""

    async def body(h: Harness) -> None:
        pace = configured_pacing(h.ctx.config, 1).interval
        told = set()
        for k in range(6):
            cred, beat = await h.register(f"spread{k}")
            h.t += 0.37
            told.add((await h.beat(cred, beat))["interval"])  # full exchange
            beat["objects"] = None
            await h.beat(cred, beat)
            h.t += 0.41
            told.add((await h.beat(cred, beat))["interval"])  # batched renewal
        assert all(pace * (1 - INTERVAL_SPREAD) <= t <= pace for t in told)
        assert len(told) >= 6, told

    asyncio.run(_with_server(tmp_path, str(tmp_path / "corral.db"), body))
