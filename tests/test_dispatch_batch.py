"""The dispatcher places a pass's jobs with a bounded number of statements, whatever the
number of jobs, and delivers an instance's attempts likewise; the placed rows are
exactly what one-by-one placement wrote.

Statements are counted with a SQLAlchemy cursor hook around one call of the store
function (no server, no loops)."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from corral.api import JobSubmit
from corral.domain.jobs import AttemptState, JobState
from corral.store import dispatch, fleets
from corral.store import jobs as repo
from corral.store.schema import job_attempts, jobs
from tests.storekit import register
from tests.test_store import NOW, add_instance, open_db


class Counted:
    """Statements sent on the engine while inside `with counted:`."""

    def __init__(self, engine) -> None:
        self.on = False
        self.seen: list[str] = []
        event.listen(engine.sync_engine, "before_cursor_execute", self._hook)

    def _hook(self, _conn, _cursor, statement, _params, _context, _many) -> None:
        if self.on and not statement.lstrip().upper().startswith(("BEGIN", "COMMIT", "ROLLBACK")):
            self.seen.append(" ".join(statement.split())[:80])

    def __enter__(self):
        self.seen.clear()
        self.on = True
        return self

    def __exit__(self, *_exc) -> None:
        self.on = False


async def _pass(db, n_jobs: int, prefix: str) -> tuple[list[str], list[str], dict]:
    """Submit n_jobs (plus n_jobs/5 no instance can hold), run one dispatcher pass and one
    delivery per instance; the statements of each, and what they wrote."""
    a = await add_instance(db, name=f"{prefix}a", cpus=n_jobs // 2)
    b = await add_instance(db, name=f"{prefix}b", cpus=n_jobs // 2)
    ids = await db.transact(repo.submit_many, [JobSubmit(command=["true"], cpus=1)] * n_jobs, NOW)
    huge = await db.transact(
        repo.submit_many, [JobSubmit(command=["true"], cpus=64)] * (n_jobs // 5), NOW
    )
    counter = Counted(db.engine)
    with counter:
        placed = await db.transact(dispatch.lock_jobs, db, NOW + 1)
    locking = list(counter.seen)
    with counter:
        orders = await db.transact(dispatch.deliver_attempts, a, NOW + 2)
    delivering = list(counter.seen)
    orders += await db.transact(dispatch.deliver_attempts, b, NOW + 2)
    async with db.read() as conn:
        job_rows = (await conn.execute(sa.select(jobs).order_by(jobs.c.id))).mappings().all()
        attempt_rows = (
            (await conn.execute(sa.select(job_attempts).order_by(job_attempts.c.job_id)))
            .mappings()
            .all()
        )
    # every delivered token works: it starts its attempt
    for o in orders:
        assert await db.transact(repo.start_attempt, o.job_id, o.attempt, o.token, NOW + 3)
    return (
        locking,
        delivering,
        {
            "ids": ids,
            "huge": huge,
            "instances": {a, b},
            "placed": placed,
            "orders": orders,
            "jobs": job_rows,
            "attempts": attempt_rows,
        },
    )


def test_a_pass_places_50_jobs_with_a_bounded_number_of_statements(db_url):
    async def main():
        db = await open_db(db_url)
        try:
            return await _pass(db, 50, "fifty"), await _pass(db, 10, "ten")
        finally:
            await db.dispose()

    (locking50, delivering50, got), (locking10, delivering10, _) = asyncio.run(main())
    # independent of the number of jobs: the same statements for 10 and for 50 jobs
    assert len(locking50) == len(locking10), (locking10, locking50)
    assert len(locking50) <= 10, locking50
    assert len(delivering50) == len(delivering10), (delivering10, delivering50)
    assert len(delivering50) <= 3, delivering50

    # the semantics of one-by-one placement
    ids, huge = got["ids"], got["huge"]
    placed = got["placed"]
    assert sorted(p.job_id for p in placed) == ids
    assert {p.attempt for p in placed} == {1}
    assert {p.instance_id for p in placed} == got["instances"]
    where = {p.job_id: p.instance_id for p in placed}
    by_id = {r["id"]: r for r in got["jobs"]}
    for job_id in ids:
        r = by_id[job_id]
        assert (r["state"], r["current_attempt"], r["instance_id"], r["reason"]) == (
            JobState.LOCKED,
            1,
            where[job_id],
            None,
        )
        assert r["updated_at"] == NOW + 1
    for job_id in huge:
        r = by_id[job_id]
        assert (r["state"], r["current_attempt"], r["instance_id"]) == (JobState.QUEUED, 0, None)
        assert r["reason"].startswith("waiting: no running instance has 64 cpus")
    attempts = {(r["job_id"], r["number"]): r for r in got["attempts"]}
    assert sorted(attempts) == [(j, 1) for j in ids]
    for job_id in ids:
        r = attempts[(job_id, 1)]
        assert (r["instance_id"], r["cpus"], r["created_at"]) == (where[job_id], 1, NOW + 1)
        assert r["delivered_at"] == NOW + 2 and r["token_hash"] is not None
        assert r["state"] == AttemptState.ISSUED
    # each delivered once, each with its own token
    orders = got["orders"]
    assert sorted(o.job_id for o in orders) == ids
    assert len({o.token for o in orders}) == len(orders)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_job_no_longer_queued_is_skipped(db_url, monkeypatch):
    """A job cancelled between the pass's read and its UPDATE gets no attempt."""

    async def main():
        db = await open_db(db_url)
        try:
            inst = await add_instance(db, name="a", cpus=8)
            ids = await db.transact(repo.submit_many, [JobSubmit(command=["true"])] * 3, NOW)
            real = dispatch._capacities

            async def cancel_one_then(conn, which, **kw):
                await conn.execute(
                    sa.update(jobs).where(jobs.c.id == ids[1]).values(state=JobState.CANCELLED)
                )
                return await real(conn, which, **kw)

            monkeypatch.setattr(dispatch, "_capacities", cancel_one_then)
            placed = await db.transact(dispatch.lock_jobs, db, NOW + 1)
            assert [(p.job_id, p.attempt, p.instance_id) for p in placed] == [
                (ids[0], 1, inst),
                (ids[2], 1, inst),
            ]
            async with db.read() as conn:
                n = (
                    await conn.execute(sa.select(sa.func.count()).select_from(job_attempts))
                ).scalar_one()
                cancelled = (
                    (await conn.execute(sa.select(jobs).where(jobs.c.id == ids[1])))
                    .mappings()
                    .one()
                )
            assert n == 2
            assert (cancelled["state"], cancelled["current_attempt"]) == (JobState.CANCELLED, 0)
        finally:
            await db.dispose()

    asyncio.run(main())


def test_on_sqlite_a_pass_reads_the_room_once(db_url):
    """SQLite has one writer and the pass's transaction is it from its first read
    (BEGIN IMMEDIATE): the instances' room read to plan cannot change before the pass
    commits, so it is neither locked nor read again. PostgreSQL locks the chosen
    instances and reads their room again (another server may have filled them)."""

    async def main():
        db = await open_db(db_url)
        try:
            return await _pass(db, 10, "once"), db.is_sqlite
        finally:
            await db.dispose()

    (locking, _delivering, got), sqlite = asyncio.run(main())
    room_reads = [s for s in locking if s.startswith("SELECT instances.id, instances.fleet")]
    instance_locks = [s for s in locking if s.startswith("SELECT instances.id FROM instances")]
    assert len(room_reads) == (1 if sqlite else 2), locking
    assert len(instance_locks) == (0 if sqlite else 1), locking
    assert sorted(p.job_id for p in got["placed"]) == got["ids"]  # all placed all the same


def test_an_array_is_inserted_with_a_bounded_number_of_statements_ids_in_order(db_url):
    """submit_many: the ids come back in the order given, each on its own spec, with a
    bounded number of statements whatever the number of jobs (on SQLite the ids are the
    ones SQLite gives rows one by one: the largest id + 1, + 2, ...)."""

    async def main():
        db = await open_db(db_url)
        try:
            counted = Counted(db.engine)
            first = await db.transact(repo.submit_many, [JobSubmit(command=["true"])] * 3, NOW)
            specs = [JobSubmit(command=["echo", str(k)], name=f"task-{k}") for k in range(300)]
            with counted:
                ids = await db.transact(repo.submit_many, specs, NOW)
            assert len(counted.seen) <= 3, counted.seen
            assert ids == list(range(first[-1] + 1, first[-1] + 301))
            async with db.read() as conn:
                rows = {
                    r.id: r
                    for r in await conn.execute(
                        sa.select(jobs.c.id, jobs.c.name, jobs.c.command, jobs.c.state).where(
                            jobs.c.id.in_(ids)
                        )
                    )
                }
            for k, job_id in enumerate(ids):
                assert rows[job_id].name == f"task-{k}"
                assert rows[job_id].command == ["echo", str(k)]
                assert rows[job_id].state == JobState.QUEUED
            # and a job submitted after them comes after them
            (after,) = await db.transact(repo.submit_many, [JobSubmit(command=["true"])], NOW)
            assert after == ids[-1] + 1
        finally:
            await db.dispose()

    asyncio.run(main())


def _queue_reads(counter: Counted) -> int:
    """The most queued rows the counted statements could have read (their LIMITs)."""
    return sum(limit for _statement, limit in counter.queue_limits)


class QueueReads(Counted):
    """Also the LIMIT of each read of the queue."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.queue_limits: list[tuple[str, int]] = []

    def _hook(self, conn, cursor, statement, params, context, many) -> None:
        super()._hook(conn, cursor, statement, params, context, many)
        flat = " ".join(statement.split())
        if self.on and flat.startswith("SELECT jobs.id, jobs.cpus, jobs.memory_mb"):
            values = list(params.values()) if isinstance(params, dict) else list(params)
            limit = values[-2] if " OFFSET " in flat else values[-1]  # SQLite adds OFFSET 0
            self.queue_limits.append((flat, int(limit)))

    def __enter__(self):
        self.queue_limits.clear()
        return super().__enter__()


def test_a_pass_with_one_slot_free_reads_a_page_of_the_queue_not_the_batch(db_url):
    async def main():
        db = await open_db(db_url)
        try:
            inst = await add_instance(db, name="one-slot", cpus=1)
            await db.transact(repo.submit_many, [JobSubmit(command=["true"])] * 150, NOW)
            counter = QueueReads(db.engine)
            with counter:
                placed = await db.transact(dispatch.lock_jobs, db, NOW + 1, explain=False)
            assert [p.instance_id for p in placed] == [inst]
            assert 0 < _queue_reads(counter) <= 8
            with counter:  # full now: a pass reads its first look of the queue, no more
                assert await db.transact(dispatch.lock_jobs, db, NOW + 2, explain=False) == []
            assert _queue_reads(counter) == dispatch.FIRST_LOOK
            with counter:  # a pass that explains reads the whole batch, as it did
                await db.transact(dispatch.lock_jobs, db, NOW + 3, explain=True, batch=200)
            assert _queue_reads(counter) == 200
        finally:
            await db.dispose()

    asyncio.run(main())


SCENARIOS = {
    # instances (name, cpus, fleet), then the queue in order (cpus, fleet) x count
    "half a cpu free behind a head of one-cpu jobs": (
        [("a", 0.5, None), ("b", 1, None)],
        [(1, None)] * 30 + [(0.5, None)] * 3,
    ),
    "room only in a fleet the head of the queue does not ask for": (
        [("g", 4, "gpu"), ("c", 1, "cpu")],
        [(1, "cpu")] * 40 + [(1, "gpu")] * 10,
    ),
    "mixed sizes on instances of several sizes": (
        [("x", 3, None), ("y", 5.5, None), ("z", 16, None)],
        [(c, None) for c in [1, 2, 0.5, 8, 4, 1, 1, 3, 64, 0.25] * 12],
    ),
    "more room than the batch": ([("big", 400, None)], [(1, None)] * 260),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_a_paged_pass_places_what_one_read_of_the_batch_places(tmp_path, scenario):
    fleet_of, queue = SCENARIOS[scenario]

    async def one(path, explain: bool) -> list[tuple[int, str]]:
        db = await open_db(f"sqlite:///{path}")
        try:
            names = {}
            for k, (name, cpus, fleet) in enumerate(fleet_of):
                if fleet is not None:
                    await db.transact(
                        fleets.upsert_fleet,
                        name=fleet,
                        backend="local",
                        min_size=0,
                        max_size=10,
                        target_size=0,
                        now=NOW,
                    )
                reg = await register(  # created one after another: the same order in both
                    db,
                    name,
                    NOW + k,
                    cpus=cpus,
                    memory_mb=8000,
                    host="h",
                    agent_version="t",
                    fleet=fleet,
                )
                names[reg.instance["id"]] = name
            await db.transact(
                repo.submit_many,
                [JobSubmit(command=["true"], cpus=c, fleet=f) for c, f in queue],
                NOW,
            )
            placed = await db.transact(dispatch.lock_jobs, db, NOW + 10, explain=explain, batch=200)
            return [(p.job_id, names[p.instance_id]) for p in placed]
        finally:
            await db.dispose()

    whole = asyncio.run(one(tmp_path / "whole.db", True))
    paged = asyncio.run(one(tmp_path / "paged.db", False))
    assert whole  # each scenario places something
    assert paged == whole


def test_a_pass_over_an_empty_queue_reads_no_instance(db_url):
    """A pass runs on every wake (each registration, each attempt's end); with nothing
    queued it must not read every instance's room, a read that grows with the fleet
    (measured: 12-16% of one server's CPU through a storm of 1,000 registrations)."""

    async def main():
        db = await open_db(db_url)
        try:
            for k in range(3):
                await add_instance(db, name=f"idle{k}", cpus=4)
            counter = Counted(db.engine)
            with counter:
                placed = await db.transact(dispatch.lock_jobs, db, NOW + 1)
            empty = list(counter.seen)
            await db.transact(repo.submit_many, [JobSubmit(command=["true"])], NOW)
            with counter:
                again = await db.transact(dispatch.lock_jobs, db, NOW + 2)
            return placed, empty, again
        finally:
            await db.dispose()

    placed, empty, again = asyncio.run(main())
    assert placed == []
    assert len(empty) == 1 and "instances" not in empty[0], empty
    assert len(again) == 1 and again[0].job_id  # a queued job is still placed


def test_a_pass_that_does_not_explain_reads_only_instances_with_room(db_url):
    """Placement can use only instances with cpu left (every job asks for some), so a
    pass reads only those (in a busy fleet, few of them), and places as before; the
    pass that explains waiting jobs reads all (a job that fits a full instance waits
    for room, not for an instance big enough)."""

    async def main():
        db = await open_db(db_url)
        try:
            small = await add_instance(db, name="small", cpus=1)
            big = await add_instance(db, name="big", cpus=2)

            async def one_pass(n_jobs: int, explain: bool = False) -> list[str]:
                if n_jobs:
                    await db.transact(repo.submit_many, [JobSubmit(command=["true"])] * n_jobs, NOW)
                placed = await db.transact(dispatch.lock_jobs, db, NOW + 1, explain=explain)
                return [p.instance_id for p in placed]

            async def with_room() -> list[str]:
                async with db.read() as conn:
                    caps = await dispatch._capacities(conn, None, room_left_only=True)
                return [c.instance_id for c in caps]

            steps = [(await one_pass(1), await with_room())]
            steps.append((await one_pass(2), await with_room()))
            steps.append((await one_pass(1), await with_room()))
            blocked = await one_pass(0, explain=True)
            async with db.read() as conn:
                waiting = (
                    (await conn.execute(sa.select(jobs.c.reason).where(jobs.c.state == "queued")))
                    .scalars()
                    .all()
                )
            return small, big, steps, blocked, waiting
        finally:
            await db.dispose()

    small, big, steps, blocked, waiting = asyncio.run(main())
    assert steps == [
        ([small], [big]),  # idle instances first, the tightest fit among them
        ([big, big], []),
        ([], []),  # every instance full: nothing read, nothing placed
    ]
    assert blocked == [] and waiting == [None]  # it would fit: it waits for room
