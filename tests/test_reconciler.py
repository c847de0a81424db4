"""Components and rollouts in the store, on SQLite and PostgreSQL, with a fake clock:
install orders are counted, backed off and capped; rollouts go in batches, pause on
failures, never downgrade on their own."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random

import pytest

from corral.api import ComponentPublish, ObservedComponent, RolloutRequest
from corral.domain.backoff import Backoff
from corral.domain.reconcile import ComponentState, InstallPolicy
from corral.store import components, events, instances
from corral.store.db import Database
from corral.store.migrate import migrate
from tests.storekit import register

T0 = 1_000_000.0
POLICY = InstallPolicy(backoff=Backoff(base=30, factor=2, maximum=3600, jitter=0.2), cap=5)


def run(coro):
    return asyncio.run(coro)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def setup(url: str, n_instances: int = 1):
    db = Database(url)
    await migrate(db)
    insts = []
    for k in range(n_instances):
        reg = await register(db, f"w{k}", T0)
        insts.append(reg.instance)
    for v in ("1.0.0", "1.1.0", "1.2.0", "main.7"):
        await db.transact(
            components.publish,
            ComponentPublish(
                name="runner", version=v, url=f"http://127.0.0.1:1/runner-{v}", sha256=sha(v)
            ),
            T0,
        )
    return db, insts


async def heartbeat(db, inst, observed_version, now, rng=None):
    obs = (
        []
        if observed_version is None
        else [
            ObservedComponent(name="runner", version=observed_version, sha256=sha(observed_version))
        ]
    )
    return await db.transact(components.sync, inst, obs, now, POLICY, rng or random.Random(1))


@pytest.mark.slow
def test_persistent_mismatch_gets_at_most_cap_orders_on_a_backoff_schedule(db_url):
    """The install never lands (the agent keeps reporting 1.0.0): orders are capped
    at 5, spaced 30 s, 60 s, 120 s, 240 s (minus up to 20% jitter), followed by one
    WARNING, and nothing more however long it goes on."""

    async def main():
        db, (inst,) = await setup(db_url)
        await db.transact(
            components.start_rollout, RolloutRequest(component="runner", version="1.0.0"), T0
        )
        await db.transact(components.advance, db, T0)
        await heartbeat(db, inst, "1.0.0", T0)  # converged on 1.0.0
        await db.transact(
            components.start_rollout, RolloutRequest(component="runner", version="1.1.0"), T0
        )
        await db.transact(components.advance, db, T0)
        order_times = []
        now = T0
        while now < T0 + 3600:  # heartbeats every 4 s for an hour (the cap is hit in 8 min)
            orders = await heartbeat(db, inst, "1.0.0", now)
            order_times += [now] * len(orders)
            now += 4.0
        assert len(order_times) == POLICY.cap
        gaps = [b - a for a, b in itertools.pairwise(order_times)]
        for k, gap in enumerate(gaps, start=1):
            ceiling = POLICY.backoff.ceiling(k)
            assert ceiling * 0.8 - 4 <= gap <= ceiling + 4, (k, gap)
        warnings = await db.query(
            events.list_events, min_level="warning", kind="component.install_failed"
        )
        assert len(warnings) == 1 and "not installed after 5 orders" in warnings[0]["message"]
        (failed,) = await db.query(components.failed_installs)
        assert failed["component"] == "runner" and failed["state"] == "install_failed"
        assert failed["orders_total"] == 5
        await db.dispose()

    run(main())


@pytest.mark.slow
def test_converged_instance_gets_no_orders_at_all(db_url):
    async def main():
        db, (inst,) = await setup(db_url)
        await db.transact(
            components.start_rollout, RolloutRequest(component="runner", version="1.1.0"), T0
        )
        await db.transact(components.advance, db, T0)
        first = await heartbeat(db, inst, None, T0)
        assert [o.version for o in first] == ["1.1.0"]
        total = 0
        for k in range(1, 500):
            total += len(await heartbeat(db, inst, "1.1.0", T0 + 2 * k))
        assert total == 0
        (row,) = await db.query(components.instance_status)
        assert (row["state"], row["orders_total"]) == ("converged", 1)
        await db.dispose()

    run(main())


def test_agent_errors_are_recorded_with_the_order(db_url):
    async def main():
        db, (inst,) = await setup(db_url)
        await db.transact(
            components.start_rollout, RolloutRequest(component="runner", version="1.1.0"), T0
        )
        await db.transact(components.advance, db, T0)
        await heartbeat(db, inst, None, T0)
        obs = [
            ObservedComponent(
                name="runner", error="http://x answered HTTP 403", error_sha256=sha("1.1.0")
            )
        ]
        await db.transact(components.sync, inst, obs, T0 + 1, POLICY, random.Random(1))
        (row,) = await db.query(components.instance_status)
        assert row["last_error"] == "http://x answered HTTP 403"
        await db.dispose()

    run(main())


def test_rollout_goes_in_batches_and_completes(db_url):
    async def main():
        db, insts = await setup(db_url, n_instances=5)
        r = await db.transact(
            components.start_rollout,
            RolloutRequest(component="runner", version="1.1.0", max_unavailable=2),
            T0,
        )
        targeted = await db.transact(components.advance, db, T0)
        assert len(targeted) == 2
        assert await db.transact(components.advance, db, T0 + 1) == []  # batch is full
        now = T0 + 2
        converged: set[str] = set()
        while len(converged) < 5:
            for inst in insts:
                orders = await heartbeat(
                    db, inst, "1.1.0" if inst["id"] in converged else None, now
                )
                converged |= {inst["id"]} if orders else set()
            in_flight = (await db.query(components.rollout_progress, r)).in_flight
            assert in_flight <= 2
            await db.transact(components.advance, db, now)
            now += 1
        for inst in insts:
            await heartbeat(db, inst, "1.1.0", now)
        await db.transact(components.advance, db, now)
        done = await db.query(components.get_rollout, r["id"])
        assert done["state"] == "completed"
        assert (await db.query(components.rollout_progress, done)).converged == 5
        await db.dispose()

    run(main())


@pytest.mark.slow
def test_rollout_pauses_when_failures_pass_the_threshold(db_url):
    async def main():
        db, insts = await setup(db_url, n_instances=3)
        r = await db.transact(
            components.start_rollout,
            RolloutRequest(component="runner", version="1.1.0", max_unavailable=1),
            T0,
        )
        await db.transact(components.advance, db, T0)
        now = T0
        for _ in range(600):  # the first instance never installs
            for inst in insts:
                await heartbeat(db, inst, None, now)
            await db.transact(components.advance, db, now)
            now += 10
            paused = await db.query(components.get_rollout, r["id"])
            if paused["state"] != "active":
                break
        assert paused["state"] == "paused" and "failed to install" in paused["message"]
        progress = await db.query(components.rollout_progress, paused)
        assert (progress.failed, progress.waiting) == (1, 2)  # the rest were never touched
        warn = await db.query(events.list_events, min_level="warning", kind="rollout.paused")
        assert len(warn) == 1
        resumed = await db.transact(components.resume, r["id"], now)
        assert resumed["state"] == "active"
        await db.dispose()

    run(main())


def test_no_downgrade_without_saying_so(db_url):
    async def main():
        db, (inst,) = await setup(db_url)
        await db.transact(
            components.start_rollout, RolloutRequest(component="runner", version="1.2.0"), T0
        )
        with pytest.raises(components.ComponentError, match="--downgrade"):
            await db.transact(
                components.start_rollout, RolloutRequest(component="runner", version="1.1.0"), T0
            )
        with pytest.raises(components.ComponentError, match="different schemes"):
            await db.transact(
                components.start_rollout, RolloutRequest(component="runner", version="main.7"), T0
            )
        with pytest.raises(components.ComponentError, match="not published"):
            await db.transact(
                components.start_rollout, RolloutRequest(component="runner", version="9.9.9"), T0
            )
        with pytest.raises(components.ComponentError, match="immutable"):
            await db.transact(
                components.publish,
                ComponentPublish(
                    name="runner",
                    version="1.2.0",
                    url="http://127.0.0.1:1/other",
                    sha256=sha("other"),
                ),
                T0,
            )
        # an instance that runs something newer than desired is held, not downgraded
        await db.transact(components.advance, db, T0)
        await db.transact(
            components.start_rollout,
            RolloutRequest(component="runner", version="1.1.0", downgrade=True),
            T0,
        )
        # ...unless the rollout is an explicit downgrade: this one is
        await db.transact(components.advance, db, T0)
        orders = await heartbeat(db, inst, "1.2.0", T0)
        assert [o.version for o in orders] == ["1.1.0"]
        await db.dispose()

    run(main())


def test_newer_installed_version_is_held_with_a_warning(db_url):
    async def main():
        db, (inst,) = await setup(db_url)
        await db.transact(
            components.start_rollout, RolloutRequest(component="runner", version="1.1.0"), T0
        )
        await db.transact(components.advance, db, T0)
        for k in range(10):
            assert await heartbeat(db, inst, "1.2.0", T0 + k) == []
        (row,) = await db.query(components.instance_status)
        assert row["state"] == ComponentState.HELD and row["orders_total"] == 0
        warn = await db.query(events.list_events, min_level="warning", kind="component.held")
        assert len(warn) == 1 and "no automatic downgrade" in warn[0]["message"]
        await db.dispose()

    run(main())


def test_rollback_returns_to_the_previous_version(db_url):
    async def main():
        db, (_inst,) = await setup(db_url)
        await db.transact(
            components.start_rollout, RolloutRequest(component="runner", version="1.1.0"), T0
        )
        await db.transact(
            components.start_rollout, RolloutRequest(component="runner", version="1.2.0"), T0
        )
        back = await db.transact(components.rollback, "runner", None, T0)
        assert back["version"] == "1.1.0" and back["allow_downgrade"]
        desired = await db.query(components.current_desired, "*", "runner")
        assert desired["version"] == "1.1.0"
        await db.dispose()

    run(main())


def test_an_instance_that_goes_silent_while_installing_still_counts_as_unavailable(db_url):
    """An agent switching builds can be silent long enough to count as lost: it is
    still one of the max_unavailable, so the rollout starts no other instance."""

    async def main():
        db, insts = await setup(db_url, n_instances=3)
        r = await db.transact(
            components.start_rollout,
            RolloutRequest(component="runner", version="1.1.0", max_unavailable=1),
            T0,
        )
        (first,) = await db.transact(components.advance, db, T0)
        assert await db.transact(instances.mark_lost, first, T0 + 1)
        assert await db.transact(components.advance, db, T0 + 2) == []  # no second one
        progress = await db.query(components.rollout_progress, r)
        assert (progress.in_flight, progress.waiting) == (1, 2)
        # back, converged: the next instance's turn
        await db.transact(
            instances.heartbeat,
            first,
            next(i for i in insts if i["id"] == first)["incarnation"],
            T0 + 3,
        )
        await heartbeat(db, next(i for i in insts if i["id"] == first), "1.1.0", T0 + 3)
        assert len(await db.transact(components.advance, db, T0 + 4)) == 1
        await db.dispose()

    run(main())
