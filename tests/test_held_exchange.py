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
