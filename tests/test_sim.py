"""The deterministic simulator: the server's own loops and store under a virtual
clock with seeded faults, checked against the invariants; and proof that the checks
catch the failures they name, by running it against deliberately broken code.

CI runs the seeds in CORRAL_SIM_SEEDS (default "1 2"); a failing seed replays with
`python -m corral.sim --seed N`."""

from __future__ import annotations

import asyncio
import os

import pytest
import sqlalchemy as sa

from corral.domain import reconcile as reconcile_mod
from corral.domain.reconcile import InstallPolicy
from corral.sim import Settings, run
from corral.store import components as components_repo
from corral.store import drain
from corral.store import jobs as jobs_repo
from corral.store.schema import jobs

SEEDS = [int(s) for s in os.environ.get("CORRAL_SIM_SEEDS", "1 2").split()]
pytestmark = pytest.mark.slow  # each seed is tens of seconds (the smoke test is fast)


def simulate(seed: int, jobs: int = 100, **kw) -> dict:
    return asyncio.run(run(Settings(seed=seed, jobs=jobs, agents=kw.pop("agents", 4), **kw)))


def test_invariants_hold_under_seeded_faults():
    reports = [simulate(seed) for seed in SEEDS]
    for r in reports:
        assert r["violations"] == [], (r["seed"], r["violations"][:10])
        assert sum(r["job_states"].values()) == 100
        assert set(r["job_states"]) <= {"succeeded", "failed"}
    # the faults really happened, and really produced stale runners
    injected = {k for r in reports for k in r["faults"]}
    assert {
        "agent_frozen_past_grace",
        "host_partitioned_past_grace",
        "agent_killed",
        "runner_crashed",
        "runner_silent_past_grace",
        "drain",
        "server_restarted",
        "partition_agent_server",
        "partition_agent_agent",
        "slow_disk",
        "duplicate_delivery",
        "reordered_messages",
    } <= injected, injected
    assert sum(r["stale_updates_refused"] for r in reports) > 0


def test_a_seed_replays_the_same_run():
    first, second = simulate(11, jobs=12, fault_seconds=60), simulate(11, jobs=12, fault_seconds=60)
    first.pop("wall_seconds"), second.pop("wall_seconds")
    assert first == second
    assert simulate(12, jobs=12, fault_seconds=60)["trace_digest"] != first["trace_digest"]


def _first_violation(prefixes: tuple[str, ...]) -> list[str]:
    for seed in (2, 3, 6, 7):
        found = [v for v in simulate(seed, jobs=40)["violations"] if v.startswith(prefixes)]
        if found:
            return found
    return []


def test_the_checks_catch_an_unfenced_finish(monkeypatch: pytest.MonkeyPatch):
    """Failure 3 put back: a finish that writes the job without checking the token."""

    async def unfenced_finish(conn, job_id, number, token, exit_code, reason, now, outputs=None):
        state = "succeeded" if exit_code == 0 else "failed"
        await conn.execute(
            sa.update(jobs)
            .where(jobs.c.id == job_id)
            .values(
                state=state,
                exit_code=exit_code,
                result_attempt=number,
                updated_at=now,
                finished_at=now,
            )
        )
        return state, True

    monkeypatch.setattr(jobs_repo, "finish_attempt", unfenced_finish)
    found = _first_violation(("I1",))
    assert found and any("completed 2 times" in v or "not its final attempt" in v for v in found), (
        found
    )


def test_the_checks_catch_a_retirement_that_ignores_data_at_risk(monkeypatch: pytest.MonkeyPatch):
    """Failure 2's second hole put back: retire once idle, whatever it alone holds."""
    monkeypatch.setattr(drain, "may_retire", lambda live, risky, force: not live)
    found = _first_violation(("I2",))
    assert found and "held by no live instance" in found[0], found


# ---- the component invariants (I4-I7): each check catches its failure put back ----------
# Small worlds with faults on installs often, so each failure shows within a few seeds.
COMPONENT_FAULTS = dict(jobs=4, agents=3, fault_seconds=60.0, p_disk=0.03)


def _component_violation(prefix: str, **kw) -> list[str]:
    for seed in (1, 2, 3, 4, 5):
        found = [
            v
            for v in simulate(seed, **{**COMPONENT_FAULTS, **kw})["violations"]
            if v.startswith(prefix)
        ]
        if found:
            return found
    return []


def test_the_component_checks_pass_on_the_real_code():
    for seed in (1, 2):
        r = simulate(seed, **COMPONENT_FAULTS, p_newer_component=0.5)
        assert r["violations"] == [], r["violations"]


def test_the_checks_catch_install_orders_without_a_cap(monkeypatch: pytest.MonkeyPatch):
    """Failure 1 put back: every heartbeat orders the install again, uncounted."""
    real = components_repo.reconcile

    def uncapped(status, now, policy, rand):  # no backoff (always due), no cap
        return real(status, float("inf"), InstallPolicy(cap=10**6), rand)

    monkeypatch.setattr(components_repo, "reconcile", uncapped)
    found = _component_violation("I4")
    assert found and "install orders" in found[0], found


def test_the_checks_catch_a_download_per_install(monkeypatch: pytest.MonkeyPatch):
    """Failure 1's other half: no artifact cache, so each order downloads it again."""
    found = _component_violation("I4", cache_artifacts=False)
    assert found and "downloaded artifact" in found[0], found


def test_the_checks_catch_orders_a_server_computes_itself(monkeypatch: pytest.MonkeyPatch):
    """I5 broken: a server orders its own build's version, not the database's."""
    real = components_repo.sync

    async def own_build(*args, **kwargs):
        orders = await real(*args, **kwargs)
        return [o.model_copy(update={"version": "9.9.9"}) for o in orders]

    monkeypatch.setattr(components_repo, "sync", own_build)
    found = _component_violation("I5")
    assert found and "never desired" in found[0], found


def test_the_checks_catch_an_automatic_downgrade(monkeypatch: pytest.MonkeyPatch):
    """I6 broken: a host with a newer runner is not held but downgraded."""
    monkeypatch.setattr(reconcile_mod, "is_downgrade", lambda current, target: False)
    found = _component_violation("I6", p_newer_component=1.0)
    assert found and "went down from 2.0.0" in found[0], found


def test_the_checks_catch_an_unverified_download():
    """I7 broken: an HTTP error page is installed because nothing checked its sha256."""
    found = _component_violation("I7", verify_downloads=False)
    assert found and "not the published artifact" in found[0], found
