"""Lease renewals between exchanges (`POST /api/v1/agents/lease`).

A fleet large enough that its agents exchange rarely (the interval grows with the
fleet) renews leases with a tiny request that touches no database; the grace, and so
how soon a silent agent is found, follows the renewal interval each agent was told,
not the exchange interval. In process, the clock under the test's control (the
harness of test_lease_batching)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from corral.domain.backoff import RETRY_AFTER_SPREAD
from corral.domain.heartbeat import (
    INTERVAL_SPREAD,
    grace_period,
    heartbeat_interval,
    lease_interval,
)
from corral.server.api.agents import HEARTBEAT_RETRY_MAX, admission_period
from corral.server.app import close_context, open_context
from corral.server.config import ServerConfig
from corral.server.lease_route import INCARNATION_HEADER, PATH
from corral.server.leases import configured_pacing, flush_leases, instance_key
from corral.server.loops import reaper
from corral.store.tokens import AGENT
from tests import appkit
from tests.test_lease_batching import Harness, _db_url, _with_server

# ---- pure: the pacing at any fleet size ----------------------------------------------------


def test_small_fleets_renew_only_by_exchanging() -> None:
    cfg = ServerConfig()
    for n in (0, 1, 10, 100):
        interval = heartbeat_interval(n, cfg.heartbeat_base, cfg.heartbeat_max_rate)
        assert lease_interval(n, interval, cfg.lease_base, cfg.lease_max_rate, 4.0) is None


@pytest.mark.parametrize("agents", [101, 500, 1_000, 2_000, 5_000, 10_000])
def test_a_silent_agent_is_found_within_15_s_up_to_10000_agents(agents: int) -> None:
    """Grace + one reaper pass + one flush of the buffered renewals: within 15 s, and
    never fewer than three renewal intervals (one slow renewal never costs a job)."""
    cfg = ServerConfig()
    pace = configured_pacing(cfg, agents)  # what the server tells them
    assert pace.lease is not None and pace.lease < pace.interval
    grace = grace_period(pace.lease, cfg.agent_grace)
    assert grace >= 3 * pace.lease
    assert grace + cfg.reaper_interval + cfg.lease_flush_interval <= 15.0
    # the whole fleet's renewals stay within the rate one server is paced for
    assert agents / pace.lease <= cfg.lease_max_rate


# ---- the route, in process -----------------------------------------------------------------


def _large_fleet_config(tmp_path: Path, db_url: str) -> ServerConfig:
    # exchanges every 20 s (as a fleet of 1,000 is told), renewals every 2 s
    return ServerConfig(data_dir=tmp_path / "srv", db_url=db_url, heartbeat_base=20)


async def _run(tmp_path: Path, db_url: str, body) -> None:
    ctx = await open_context(_large_fleet_config(tmp_path, db_url))
    try:
        async with appkit.client(ctx) as http:
            await body(Harness(ctx, http))
    finally:
        await close_context(ctx)


def _renewal(cred: dict, incarnation: int) -> dict:
    return {**cred, INCARNATION_HEADER: str(incarnation)}


async def _renewing_agent(h: Harness, name: str) -> tuple[dict, dict]:
    """Register an agent and exchange twice: the first reply tells it to renew between
    exchanges, the second says so (`renews_every`)."""
    cred, beat = await h.register(name)
    beat["renews_every"] = (await h.beat(cred, beat))["lease_interval"]
    await h.beat(cred, beat)
    return cred, beat


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_a_renewal_touches_no_database_and_the_flush_writes_the_short_lease(
    tmp_path: Path, db: str, request
) -> None:
    async def body(h: Harness) -> None:
        cred, beat = await h.register("big-1")
        n = beat["incarnation"]
        r = await h.http.post(PATH, headers=_renewal(cred, n))
        assert r.status_code == 409, "a renewal before any exchange here is refused"
        assert r.json()["error"]["code"] == "exchange_needed"

        reply = await h.beat(cred, beat)
        assert 20 * (1 - INTERVAL_SPREAD) <= reply["interval"] <= 20
        assert reply["lease_interval"] == 2
        beat["renews_every"] = reply["lease_interval"]
        await h.beat(cred, beat)  # the agent now says it renews every 2 s

        h.t += 1.5
        h.counter.clear()
        h.counter.on, before = True, h.transactions
        r = await h.http.post(PATH, headers=_renewal(cred, n))
        h.counter.on = False
        assert r.status_code == 204, r.text
        assert h.counter.seen == [] and h.transactions == before, "a renewal used the database"
        assert h.ctx.leases.is_pending(beat["instance_id"])

        await flush_leases(h.ctx)
        row = await h.row(beat["instance_id"])
        assert row["last_heartbeat_at"] == h.t
        assert row["lease_until"] == h.t + grace_period(2, h.ctx.config.agent_grace)
        assert row["heartbeat_interval"] == 2

    asyncio.run(_run(tmp_path, _db_url(db, tmp_path, request), body))


def test_a_renewal_that_does_not_match_the_last_exchange_asks_for_one(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        cred, beat = await h.register("big-2")
        n, iid = beat["incarnation"], beat["instance_id"]
        await h.beat(cred, beat)
        assert (await h.http.post(PATH, headers=_renewal(cred, n))).status_code == 204

        # another incarnation, a bad header, a body, another method, no credential
        assert (await h.http.post(PATH, headers=_renewal(cred, n + 1))).status_code == 409
        assert (await h.http.post(PATH, headers=_renewal(cred, "x"))).status_code == 400  # type: ignore[arg-type]
        with_body = await h.http.post(PATH, headers=_renewal(cred, n), content=b"{}")
        assert with_body.status_code == 400
        assert (await h.http.get(PATH, headers=_renewal(cred, n))).status_code == 405
        anon = await h.http.post(PATH, headers={INCARNATION_HEADER: str(n)})
        assert anon.status_code == 401
        stranger = {"Authorization": "Bearer cr_agent_" + "A" * 43, INCARNATION_HEADER: str(n)}
        assert (await h.http.post(PATH, headers=stranger)).status_code == 409

        # something woke the instance (an order for it): exchange first
        h.ctx.notifier.wake(instance_key(iid))
        assert (await h.http.post(PATH, headers=_renewal(cred, n))).status_code == 409
        await h.beat(cred, beat)  # the exchange admits it again
        assert (await h.http.post(PATH, headers=_renewal(cred, n))).status_code == 204

        # still accepted while exchanges are refused (an overloaded server's 503s) ...
        h.t += 3 * 20 + h.ctx.config.heartbeat_full_every + 1
        assert (await h.http.post(PATH, headers=_renewal(cred, n))).status_code == 204
        # ... until the admission period since its last exchange here has passed
        h.t += admission_period(20)
        assert (await h.http.post(PATH, headers=_renewal(cred, n))).status_code == 409

    asyncio.run(_run(tmp_path, str(tmp_path / "corral.db"), body))


def test_a_revoked_credential_stops_renewing_at_once(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        cred, beat = await h.register("big-3")
        n = beat["incarnation"]
        await h.beat(cred, beat)
        assert (await h.http.post(PATH, headers=_renewal(cred, n))).status_code == 204
        admin = {"Authorization": f"Bearer {h.ctx.admin_token}"}
        listed = (await h.http.get("/api/v1/tokens", headers=admin)).json()
        (mine,) = [
            t for t in listed if t["kind"] == AGENT and t.get("instance_id") == beat["instance_id"]
        ]
        r = await h.http.post(f"/api/v1/tokens/{mine['id']}/revoke", headers=admin)
        assert r.status_code == 200, r.text
        assert (await h.http.post(PATH, headers=_renewal(cred, n))).status_code == 409

    asyncio.run(_run(tmp_path, str(tmp_path / "corral.db"), body))


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_the_reaper_judges_a_renewing_agent_by_its_renewal_interval(
    tmp_path: Path, db: str, request
) -> None:
    """Two agents told to exchange every 20 s and renew every 2 s: the one that keeps
    renewing (and never exchanges again) is never lost; the silent one is lost after
    its renewal grace (10 s), long before three exchange intervals (61 s)."""

    async def body(h: Harness) -> None:
        grace = grace_period(2, h.ctx.config.agent_grace)
        agents = []
        for name in ("alive", "silent"):
            cred, beat = await _renewing_agent(h, name)
            agents.append((cred, beat))
        (alive_cred, alive), (_, silent) = agents
        start = h.t
        while h.t < start + grace + 8:
            h.t += 2
            r = await h.http.post(PATH, headers=_renewal(alive_cred, alive["incarnation"]))
            assert r.status_code == 204, r.text
            await reaper.reap_once(h.ctx)
        assert not (await h.row(alive["instance_id"]))["lost_at"], "a renewing agent was lost"
        lost_at = (await h.row(silent["instance_id"]))["lost_at"]
        assert lost_at is not None and lost_at <= start + grace + 2 + 1e-6

    asyncio.run(_run(tmp_path, _db_url(db, tmp_path, request), body))


# ---- under load: a refused exchange never hides a silent agent for long ----------------------


async def _reap_until_lost(h: Harness, instance_id: str, limit: float) -> float | None:
    """Flush and reap once a second (the loops' pace) until the instance is lost or the
    clock passes `limit`: its `lost_at`."""
    while not (await h.row(instance_id))["lost_at"] and h.t < limit:
        h.t += 1
        await flush_leases(h.ctx)
        await reaper.reap_once(h.ctx)
    return (await h.row(instance_id))["lost_at"]


def _refuse_with(gate, seconds: float) -> None:
    """Every slot busy and the queue full, each exchange slow enough that the next
    one refused is told to come back after the longest Retry-After there is."""
    gate.busy, gate.waiting, gate.mean_s = gate.slots, gate.queue, seconds


async def _refused_then_silent(
    h: Harness, cred: dict, beat: dict, horizon: float
) -> tuple[float, float]:
    """Its next exchange refused for load (503, told at most HEARTBEAT_RETRY_MAX), then
    the agent silent for good: the Retry-After it was told, and how long after its
    silence began it was declared lost (within `horizon` seconds)."""
    _refuse_with(h.ctx.gate(), 100.0)
    h.t += 1
    r = await h.http.post("/api/v1/agents/heartbeat", json=beat, headers=cred)
    assert r.status_code == 503, r.text
    retry = float(r.headers["retry-after"])
    assert retry <= HEARTBEAT_RETRY_MAX
    silent_from = h.t  # it never comes back
    lost_at = await _reap_until_lost(h, beat["instance_id"], silent_from + horizon)
    assert lost_at is not None
    return retry, lost_at - silent_from


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_a_renewing_agent_refused_for_load_is_still_found_within_its_renewal_grace(
    tmp_path: Path, db: str, request
) -> None:
    """An agent that renews between exchanges, woken (news for it), so its renewals
    ask for an exchange first, and that exchange refused for load with a long
    Retry-After: its renewals keep proving it alive meanwhile (so the refusal need not
    stretch its lease), and once it falls silent it is lost within its renewal grace,
    not the Retry-After plus that grace (30 + 10 s, as a benchmark at 500 agents saw)."""

    async def body(h: Harness) -> None:
        grace = grace_period(2, h.ctx.config.agent_grace)
        agents = []
        for name in ("waits", "dies"):
            cred, beat = await _renewing_agent(h, name)
            # news for it: its renewals now ask for an exchange first
            h.ctx.notifier.wake(instance_key(beat["instance_id"]))
            agents.append((cred, beat))
        gate = h.ctx.gate()
        _refuse_with(gate, 100.0)
        h.t += 1
        retry = 0.0
        for cred, beat in agents:
            r = await h.http.post("/api/v1/agents/heartbeat", json=beat, headers=cred)
            assert r.status_code == 503, r.text
            retry = float(r.headers["retry-after"])
            assert retry > grace, "the test needs a Retry-After past the grace"
        (cred, waits), (dies_cred, dies) = agents
        # both wait as told, renewing every 2 s (each renewal asks for an exchange);
        # one of them is killed after two renewals
        start = h.t
        last_heard = start
        while h.t < start + retry:
            h.t += 2
            r = await h.http.post(PATH, headers=_renewal(cred, waits["incarnation"]))
            assert r.status_code == 409, r.text
            if h.t <= start + 4:
                r = await h.http.post(PATH, headers=_renewal(dies_cred, dies["incarnation"]))
                assert r.status_code == 409, r.text
                last_heard = h.t
            await flush_leases(h.ctx)
            await reaper.reap_once(h.ctx)
            assert not (await h.row(waits["instance_id"]))["lost_at"], (
                f"a renewing agent was lost at +{h.t - start:.0f} s"
            )
        lost_at = (await h.row(dies["instance_id"]))["lost_at"]
        assert lost_at is not None, "the killed agent outlived the Retry-After it was told"
        assert lost_at <= last_heard + grace + 2 + 1e-6, (
            f"found {lost_at - last_heard:.0f} s after it fell silent (grace {grace:.0f} s)"
        )
        gate.busy = gate.waiting = 0

    asyncio.run(_run(tmp_path, _db_url(db, tmp_path, request), body))


def test_an_agent_without_renewals_is_told_a_short_retry_and_found_soon_after(
    tmp_path: Path,
) -> None:
    """A freshly registered agent of a small fleet has no renewals to keep it alive, so
    its refused exchange must not get it declared lost while it waits as told: it is
    told at most HEARTBEAT_RETRY_MAX and its lease outlasts that, so a silent one is
    still found within 15 s. (A small fleet's agents, exchanging every 2 s, the
    server's defaults: a 10 s grace.)"""

    async def body(h: Harness) -> None:
        cfg = h.ctx.config
        cred, beat = await h.register("fresh")
        retry, lost_after = await _refused_then_silent(h, cred, beat, 60)
        # not lost while it could still come back as told (the agent waits up to
        # RETRY_AFTER_SPREAD more than the Retry-After)
        assert lost_after > retry * (1 + RETRY_AFTER_SPREAD)
        # the loop above is the reaper's and the flush's once-a-second pace
        assert cfg.reaper_interval <= 1 and cfg.lease_flush_interval <= 1
        assert lost_after <= 15.0

    asyncio.run(_with_server(tmp_path, str(tmp_path / "corral.db"), body))


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_a_newly_registered_agent_renews_from_its_registration(
    tmp_path: Path, db: str, request
) -> None:
    """In a large fleet (exchanges every 20 s) a newcomer is told at registration how to
    renew its lease, and its renewals are accepted from then on: when its first
    exchange is refused for load it is told to come back later (spreading a crowd of
    newcomers) and kept alive by its renewals meanwhile; killed before any exchange, it
    is found within its renewal grace, not three exchange intervals (61 s: a benchmark
    at 1,000 agents found such a newcomer after 42.6 s)."""

    async def body(h: Harness) -> None:
        grace = grace_period(2, h.ctx.config.agent_grace)
        cred, beat = await h.register("newcomer")
        joined = h.last_registration
        assert joined["lease_interval"] == 2, joined
        iid, n = beat["instance_id"], beat["incarnation"]
        h.t += 2
        r = await h.http.post(PATH, headers=_renewal(cred, n))
        assert r.status_code in (204, 409), r.text
        assert h.ctx.leases.is_pending(iid), "a renewal right after registration renews"
        _refuse_with(h.ctx.gate(), 100.0)
        beat["renews_every"] = 2
        r = await h.http.post("/api/v1/agents/heartbeat", json=beat, headers=cred)
        assert r.status_code == 503, r.text
        assert float(r.headers["retry-after"]) > grace, "a renewing newcomer may wait long"
        last_heard = h.t
        lost_at = await _reap_until_lost(h, iid, last_heard + 70)
        assert lost_at is not None and lost_at - last_heard <= grace + 1 + 1e-6, (
            f"found {lost_at - last_heard if lost_at else None} s after it fell silent"
        )

    asyncio.run(_run(tmp_path, _db_url(db, tmp_path, request), body))


def test_an_agent_that_only_exchanges_in_a_large_fleet_is_found_soon_after_a_refusal(
    tmp_path: Path,
) -> None:
    """In a large fleet (exchanges every 20 s) an agent that does not renew between
    exchanges (an older agent, or one registered while the fleet was small) has three
    exchange intervals' grace (61 s here). Refused for load, it is told a short
    Retry-After and its lease is made to outlast only that, within the fleet's renewal
    grace: dead, it is found within 15 s, not after 61 (at 2,000 agents, 121 s: a
    benchmark's silenced agent went unfound for its whole 35 s window)."""

    async def body(h: Harness) -> None:
        cfg = h.ctx.config
        cred, beat = await h.register("old-style")
        beat.pop("renews_every", None)  # it does not renew between exchanges
        await h.beat(cred, beat)
        retry, lost_after = await _refused_then_silent(h, cred, beat, 90)
        assert lost_after > retry * (1 + RETRY_AFTER_SPREAD)
        assert cfg.reaper_interval <= 1 and cfg.lease_flush_interval <= 1
        assert lost_after <= 15.0, f"found after {lost_after:.0f} s"

    asyncio.run(_run(tmp_path, str(tmp_path / "corral.db"), body))
