"""A held exchange woken by jobs placed on its instance looks only for those jobs; woken
by anything else (or by both), it looks at everything again.

In process (httpx ASGITransport, no background loops), on SQLite and PostgreSQL, with the
statements counted by a SQLAlchemy cursor hook (tests.test_lease_batching.Harness)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from corral.server.leases import instance_key
from corral.server.loops.dispatcher import dispatch_once
from tests.test_lease_batching import Harness, _db_url, _with_server

# tables only the full look reads: components, objects held, offloads
FULL_LOOK = re.compile(r"\b(instance_components|replicas|offloads)\b", re.I)


async def _held(h: Harness, cred: dict, beat: dict) -> asyncio.Task:
    """A heartbeat the server holds (told to wait), once it waits for a wake-up."""
    key = instance_key(beat["instance_id"])
    task = asyncio.create_task(h.beat(cred, {**beat, "wait": 30.0}))
    deadline = time.monotonic() + 10
    while key not in h.ctx.notifier._events:
        assert not task.done(), task.result()
        assert time.monotonic() < deadline, "the heartbeat was never held"
        await asyncio.sleep(0.005)
    return task


async def _submit(h: Harness) -> int:
    admin = {"Authorization": f"Bearer {h.ctx.admin_token}"}
    r = await h.http.post("/api/v1/jobs", json={"command": ["true"]}, headers=admin)
    assert r.status_code in (200, 201), r.text
    return r.json()["id"]


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
@pytest.mark.parametrize("also_woken", [False, True])
def test_a_hold_woken_by_a_placement_alone_looks_only_for_the_jobs_placed(
    db: str, also_woken: bool, tmp_path: Path, request
) -> None:
    """Woken by the dispatcher alone: the reply carries the job, and the look after the
    wake-up reads no components, objects or offloads (nothing woke them). Woken also by
    something else (as a cancel or a drain order wakes it): the full look."""

    async def body(h: Harness) -> None:
        cred, beat = await h.register("held")
        await h.settle(cred, beat)
        task = await _held(h, cred, beat)
        job_id = await _submit(h)
        h.counter.clear()
        h.counter.on = True
        if also_woken:
            h.ctx.notifier.wake(instance_key(beat["instance_id"]))
        await dispatch_once(h.ctx)
        reply = await asyncio.wait_for(task, 10)
        h.counter.on = False
        assert [s["job_id"] for s in reply["start"]] == [job_id], reply
        full = [s for s, _ in h.counter.seen if FULL_LOOK.search(s)]
        if also_woken:
            assert full, "woken by more than a placement, it did not look at everything"
        else:
            assert full == [], "\n".join(full)

    asyncio.run(_with_server(tmp_path, _db_url(db, tmp_path, request), body))


def test_a_placement_seen_from_another_server_makes_a_full_look(tmp_path: Path) -> None:
    """Another server's placement arrives as the instance's wake-up alone (LISTEN/NOTIFY
    carries no placement mark): it cannot tell why it was woken, so it looks at all."""

    async def body(h: Harness) -> None:
        cred, beat = await h.register("remote")
        await h.settle(cred, beat)
        task = await _held(h, cred, beat)
        await _submit(h)
        # what another server's dispatcher does to this one: the rows, then the key
        original = h.ctx.notifier.wake
        h.ctx.notifier.wake = lambda *keys: original(*(k for k in keys if isinstance(k, tuple)))
        h.counter.clear()
        h.counter.on = True
        await dispatch_once(h.ctx)
        reply = await asyncio.wait_for(task, 10)
        h.counter.on = False
        assert len(reply["start"]) == 1, reply
        assert any(FULL_LOOK.search(s) for s, _ in h.counter.seen)

    asyncio.run(_with_server(tmp_path, str(tmp_path / "corral.db"), body))


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
@pytest.mark.parametrize("report", ["taken", "not taken", "late"])
def test_the_report_right_after_taking_starts_only_renews_the_lease(
    db: str, report: str, tmp_path: Path, request
) -> None:
    """An agent handed starts reports at once, its attempts now among its own: that
    report only renews the lease (no transaction; the token was issued once, nothing is
    delivered again). A report without them (the reply was lost), or one later than
    `heartbeat_full_every` after the last full exchange, runs the full exchange."""

    async def body(h: Harness) -> None:
        cred, beat = await h.register("taker")
        await h.settle(cred, beat)
        job_id = await _submit(h)
        await dispatch_once(h.ctx)
        h.t += 0.5
        (start,) = (await h.beat(cred, beat))["start"]
        assert start["job_id"] == job_id
        if report != "not taken":
            beat["attempts"] = [
                {"job_id": job_id, "attempt": start["attempt"], "token": start["token"]}
            ]
        h.t += h.ctx.config.heartbeat_full_every if report == "late" else 0.01
        h.transactions = 0
        reply = await h.beat(cred, beat)
        assert reply["start"] == [] and reply["kill"] == [], reply
        if report == "taken":
            assert h.transactions == 0
            assert h.ctx.leases.is_pending(beat["instance_id"])
        else:
            assert h.transactions == 1
            assert (await h.row(beat["instance_id"]))["last_heartbeat_at"] == h.t

    asyncio.run(_with_server(tmp_path, _db_url(db, tmp_path, request), body))


def test_looks_for_placements_alone_do_not_postpone_the_full_exchange(tmp_path: Path) -> None:
    """A busy instance is handed jobs through looks for placements alone, each followed
    by a report that only renews: the time of the last full exchange is kept through
    them, so the report after `heartbeat_full_every` runs the full exchange all the same
    (time-driven decisions, such as an install's backoff, are not starved)."""

    async def body(h: Harness) -> None:
        cred, beat = await h.register("busy")
        await h.settle(cred, beat)  # the last full exchange, at t0
        full_every = h.ctx.config.heartbeat_full_every
        h.t += full_every - 1.0
        task = await _held(h, cred, beat)  # renews only; then held
        job_id = await _submit(h)
        await dispatch_once(h.ctx)
        (start,) = (await asyncio.wait_for(task, 10))["start"]
        beat["attempts"] = [
            {"job_id": job_id, "attempt": start["attempt"], "token": start["token"]}
        ]
        h.t += 0.5
        h.transactions = 0
        await h.beat(cred, beat)  # taken, within full_every of t0: renews only
        assert h.transactions == 0
        h.t += 1.0  # past full_every since t0, 1.5 s after the look that handed the job
        await h.beat(cred, beat)
        assert h.transactions == 1

    asyncio.run(_with_server(tmp_path, str(tmp_path / "corral.db"), body))
