"""Objects, replicas and grants in the store, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from corral.api import JobSubmit, ObjectError, OutputFile
from corral.domain.errors import StaleToken
from corral.domain.instances import InstanceState
from corral.store import dispatch, drain, events, fleets, instances, objects, offloads
from corral.store import jobs as jobs_repo
from corral.store.db import Database
from corral.store.migrate import migrate
from tests.storekit import register

T0 = 2_000_000.0
GRACE = {"drain_grace": 600}


def run(coro):
    return asyncio.run(coro)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def setup(url: str, n: int = 2):
    db = Database(url)
    await migrate(db)
    insts = []
    for k in range(n):
        reg = await register(db, f"w{k}", T0, peer_url=f"http://127.0.0.1:{9000 + k}")
        insts.append(reg.instance)
    return db, insts


async def finished_job(db, outputs):
    job_id = await db.transact(jobs_repo.submit, JobSubmit(command=["true"]), T0)
    (p,) = await db.transact(dispatch.lock_jobs, db, T0)
    (order,) = await db.transact(dispatch.deliver_attempts, p.instance_id, T0)
    await db.transact(jobs_repo.start_attempt, job_id, 1, order.token, T0)
    await db.transact(jobs_repo.finish_attempt, job_id, 1, order.token, 0, None, T0, outputs)
    return job_id, p.instance_id, order.token


async def draining_holder_of_one_output(db_url: str):
    """Two instances; the one that ran a job holds its one output "o" and is draining:
    its drain step ordered the copy to the other. (db, holder id, the other's row)"""
    db, (a, b) = await setup(db_url)
    _job_id, holder, _ = await finished_job(db, [OutputFile(path="o", sha256=sha("o"), size=5)])
    other = b if holder == a["id"] else a
    holder_row = await db.query(instances.get_instance, holder)
    await db.transact(objects.sync, holder_row, [sha("o")], [], T0, "http://s")
    await db.transact(drain.request_drain, holder, False, T0)
    result = await db.transact(drain.drain_step, holder_row, T0, drain_grace=600)
    assert result.copies == [(sha("o"), other["id"])]
    return db, holder, other


def test_outputs_are_recorded_with_the_finish_and_a_stale_finish_records_none(db_url):
    async def main():
        db, _ = await setup(db_url, 1)
        out = [OutputFile(path="a/b.txt", sha256=sha("b"), size=1)]
        job_id, inst, _token = await finished_job(db, out)
        rows = await db.query(objects.list_outputs, job_id)
        # recorded, but a copy only once the agent itself reports holding it
        assert [(r["path"], r["copies"]) for r in rows] == [("a/b.txt", 0)]
        row = await db.query(instances.get_instance, inst)
        await db.transact(objects.sync, row, [sha("b")], [], T0 + 1, "http://s")
        rows = await db.query(objects.list_outputs, job_id)
        assert [(r["path"], r["copies"]) for r in rows] == [("a/b.txt", 1)]
        # a requeued job's old attempt reports outputs: refused, nothing recorded
        job2 = await db.transact(jobs_repo.submit, JobSubmit(command=["true"]), T0)
        await db.transact(dispatch.lock_jobs, db, T0)
        (o1,) = await db.transact(dispatch.deliver_attempts, inst, T0)
        await db.transact(jobs_repo.start_attempt, job2, 1, o1.token, T0)
        await db.transact(jobs_repo.requeue, job2, T0, "test")
        with pytest.raises(StaleToken):
            await db.transact(
                jobs_repo.finish_attempt,
                job2,
                1,
                o1.token,
                0,
                None,
                T0,
                [OutputFile(path="x", sha256=sha("x"), size=1)],
            )
        assert await db.query(objects.list_outputs, job2) == []
        assert await db.query(objects.get_object, sha("x")) is None
        await db.dispose()

    run(main())


def test_grants_are_one_object_short_lived_and_only_for_running_recipients(db_url):
    async def main():
        db, (_a, b) = await setup(db_url)
        await finished_job(db, [OutputFile(path="o", sha256=sha("o"), size=1)])
        token = await db.transact(objects.grant, sha("o"), b["id"], T0)

        async def verify(sha256, tok, now, recipient=b["id"]):
            return await db.transact(objects.verify_grant, sha256, tok, now, recipient=recipient)

        # refusals do not use the token up
        assert "no such grant" in await verify(sha("p"), token, T0)
        assert "expired" in await verify(sha("o"), token, T0 + 601)
        assert "malformed" in await verify(sha("o"), "x", T0)
        assert await verify(sha("o"), token, T0) is None
        token = await db.transact(objects.grant, sha("o"), b["id"], T0)
        await db.transact(instances.transition, b["id"], InstanceState.DRAINING, T0)
        why = await verify(sha("o"), token, T0)
        assert "only running instances receive data" in why
        server_token = await db.transact(objects.grant, sha("o"), None, T0)
        assert await verify(sha("o"), server_token, T0, recipient=None) is None
        await db.dispose()

    run(main())


def test_replication_orders_reach_only_running_recipients(db_url):
    async def main():
        db, (a, b) = await setup(db_url)
        _job_id, holder, _ = await finished_job(db, [OutputFile(path="o", sha256=sha("o"), size=5)])
        other = b if holder == a["id"] else a
        holder_row = await db.query(instances.get_instance, holder)
        await db.transact(drain.request_drain, holder, False, T0)
        result = await db.transact(
            drain.drain_step, await db.query(instances.get_instance, holder), T0, drain_grace=600
        )
        assert result.copies == [(sha("o"), other["id"])] and not result.retired
        other_row = await db.query(instances.get_instance, other["id"])
        (order,) = await db.transact(objects.sync, other_row, [], [], T0, "http://s")
        assert order.sources == [f"{holder_row['peer_url']}/objects/{sha('o')}"]
        # the copy lands: reported by the recipient, after which the holder retires
        await db.transact(objects.sync, other_row, [sha("o")], [], T0 + 1, "http://s")
        result = await db.transact(
            drain.drain_step,
            await db.query(instances.get_instance, holder),
            T0 + 2,
            drain_grace=600,
        )
        assert result.retired
        assert (await db.query(instances.get_instance, holder))["state"] == "retired"
        await db.dispose()

    run(main())


def test_a_copy_reported_at_once_counts_only_if_ordered_and_from_the_live_incarnation(db_url):
    """The agent's report of a landed copy outside its heartbeat (the copies route):
    an ordered copy is present at once, and its source retires; a report from an older
    incarnation, or of an object never ordered there, changes nothing."""

    async def main():
        db, holder, other = await draining_holder_of_one_output(db_url)
        holder_row = await db.query(instances.get_instance, holder)
        other_row = await db.query(instances.get_instance, other["id"])
        (_order,) = await db.transact(objects.sync, other_row, [], [], T0, "http://s")
        stale = other_row["incarnation"] - 1
        landed = objects.copies_landed
        assert await db.transact(landed, other["id"], stale, [sha("o")], T0 + 1) == 0
        assert await db.transact(landed, other["id"], other_row["incarnation"], [sha("x")], T0) == 0
        assert await db.query(objects.replica_state, sha("o"), other["id"]) == "pending"
        assert (
            await db.transact(landed, other["id"], other_row["incarnation"], [sha("o")], T0 + 1)
            == 1
        )
        assert await db.query(objects.replica_state, sha("o"), other["id"]) == "present"
        # reported twice (the heartbeat's list, or a retried report): nothing more to do
        assert (
            await db.transact(landed, other["id"], other_row["incarnation"], [sha("o")], T0 + 1)
            == 0
        )
        holder_row = await db.query(instances.get_instance, holder)
        result = await db.transact(drain.drain_step, holder_row, T0 + 2, drain_grace=600)
        assert result.retired
        # a retired instance's report is not heard either
        assert await db.transact(landed, holder, holder_row["incarnation"], [sha("o")], T0) == 0
        await db.dispose()

    run(main())


def test_a_heartbeat_list_older_than_a_copy_report_does_not_undo_it(db_url):
    """A heartbeat composed before a copy landed, whose exchange runs after the copy's
    own report: its list omits the copy, which stays present (the newer report wins).
    A list received after the report that omits it marks it missing."""

    async def main():
        db, _holder, other = await draining_holder_of_one_output(db_url)
        row = await db.query(instances.get_instance, other["id"])
        await db.transact(objects.sync, row, [], [], T0, "http://s")  # the order goes out
        # a heartbeat received at T0 + 1 (listing nothing), the copy's report at T0 + 2,
        # then that heartbeat's exchange
        args = (other["id"], row["incarnation"], [sha("o")], T0 + 2)
        assert await db.transact(objects.copies_landed, *args) == 1
        await db.transact(objects.sync, row, [], [], T0 + 3, "http://s", listed_before=T0 + 1)
        assert await db.query(objects.replica_state, sha("o"), other["id"]) == "present"
        await db.transact(objects.sync, row, [], [], T0 + 5, "http://s", listed_before=T0 + 4)
        assert await db.query(objects.replica_state, sha("o"), other["id"]) == "missing"
        await db.dispose()

    run(main())


def test_a_landed_copy_wakes_the_drainer_only_when_a_step_has_work(db_url):
    """A drain step after every landed copy is a pass over every draining instance:
    due when the source's last copy on its way landed, not while others still are."""

    async def main():
        db, (a, b) = await setup(db_url)
        out = [OutputFile(path=p, sha256=sha(p), size=5) for p in ("o1", "o2")]
        _job_id, holder, _ = await finished_job(db, out)
        other = b if holder == a["id"] else a
        holder_row = await db.query(instances.get_instance, holder)
        await db.transact(objects.sync, holder_row, [sha("o1"), sha("o2")], [], T0, "http://s")
        await db.transact(drain.request_drain, holder, False, T0)
        result = await db.transact(drain.drain_step, holder_row, T0, drain_grace=600)
        assert len(result.copies) == 2
        row = await db.query(instances.get_instance, other["id"])
        args = (other["id"], row["incarnation"])
        landed = await db.transact(drain.copies_landed, db, *args, [sha("o1")], T0 + 1, **GRACE)
        assert (landed.present, landed.steps, landed.step_due) == (1, [], False)
        # the last copy on its way: the source's step runs in the same transaction,
        # and retires it
        landed = await db.transact(drain.copies_landed, db, *args, [sha("o2")], T0 + 1, **GRACE)
        assert landed.present == 1 and not landed.step_due
        assert [(s.instance_id, s.retired, s.copies) for s in landed.steps] == [(holder, True, [])]
        assert (await db.query(instances.get_instance, holder))["state"] == "retired"
        landed = await db.transact(drain.copies_landed, db, *args, [sha("o2")], T0 + 1, **GRACE)
        assert (landed.present, landed.steps) == (0, [])
        await db.dispose()

    run(main())


def test_a_landed_copy_wakes_the_drainer_when_more_copies_wait_to_be_ordered(db_url):
    async def main():
        db, (a, b) = await setup(db_url)
        out = [OutputFile(path=p, sha256=sha(p), size=5) for p in ("o1", "o2", "o3")]
        _job_id, holder, _ = await finished_job(db, out)
        other = b if holder == a["id"] else a
        holder_row = await db.query(instances.get_instance, holder)
        held = [sha(p) for p in ("o1", "o2", "o3")]
        await db.transact(objects.sync, holder_row, held, [], T0, "http://s")
        await db.transact(drain.request_drain, holder, False, T0)
        # two copies in flight at most: the third waits for a step after one lands
        result = await db.transact(
            drain.drain_step, holder_row, T0, drain_grace=600, max_in_flight=2
        )
        assert len(result.copies) == 2
        row = await db.query(instances.get_instance, other["id"])
        first = result.copies[0][0]
        landed = await db.transact(
            drain.copies_landed, db, other["id"], row["incarnation"], [first], T0 + 1, **GRACE
        )
        # the step runs at once: it orders the third copy (the source stays draining)
        assert landed.present == 1 and not landed.step_due
        (step,) = landed.steps
        assert step.instance_id == holder and not step.retired
        assert [s for s, _ in step.copies] == [s for s in held if s not in dict(result.copies)]
        await db.dispose()

    run(main())


def test_a_draining_recipient_gets_no_orders_and_its_pending_copy_is_cancelled(db_url):
    async def main():
        db, insts = await setup(db_url, 3)
        _job_id, holder, _ = await finished_job(db, [OutputFile(path="o", sha256=sha("o"), size=5)])
        await db.transact(drain.request_drain, holder, False, T0)
        result = await db.transact(
            drain.drain_step, await db.query(instances.get_instance, holder), T0, drain_grace=600
        )
        ((_, recipient),) = result.copies
        await db.transact(drain.request_drain, recipient, False, T0)  # it starts leaving too
        rec = await db.query(instances.get_instance, recipient)
        assert await db.transact(objects.sync, rec, [], [], T0, "http://s") == []
        assert await db.transact(drain.cancel_doomed_copies, T0, 600) == 1
        result = await db.transact(
            drain.drain_step,
            await db.query(instances.get_instance, holder),
            T0 + 20,
            drain_grace=600,
        )
        third = [i["id"] for i in insts if i["id"] not in (holder, recipient)]
        assert [r for _, r in result.copies] == third  # re-planned on a running instance
        await db.dispose()

    run(main())


def test_a_forced_drain_does_not_lose_an_object_another_draining_instance_holds(db_url):
    async def main():
        db, (a, b) = await setup(db_url)
        _job_id, holder, _ = await finished_job(db, [OutputFile(path="o", sha256=sha("o"), size=5)])
        other = b if holder == a["id"] else a
        await db.transact(
            objects.sync, await db.query(instances.get_instance, holder), [sha("o")], [], T0, "s"
        )
        # the object is copied to the other instance, which then starts draining too
        await db.transact(drain.request_drain, holder, False, T0)
        result = await db.transact(
            drain.drain_step, await db.query(instances.get_instance, holder), T0, drain_grace=600
        )
        assert result.copies == [(sha("o"), other["id"])]
        other_row = await db.query(instances.get_instance, other["id"])
        await db.transact(objects.sync, other_row, [sha("o")], [], T0 + 1, "http://s")
        await db.transact(drain.request_drain, other["id"], False, T0 + 2)
        # forcing the first one out: nothing is lost, and it is not announced as lost
        _inst, risk = await db.transact(drain.request_drain, holder, True, T0 + 3)
        assert risk == []
        result = await db.transact(
            drain.drain_step,
            await db.query(instances.get_instance, holder),
            T0 + 4,
            drain_grace=600,
        )
        assert result.retired
        assert (await db.query(objects.get_object, sha("o")))["state"] == "live"
        assert await db.query(events.list_events, kind="instance.retired_forced") == []
        # the last holder forced out: now it is lost, and said so
        _inst, risk = await db.transact(drain.request_drain, other["id"], True, T0 + 5)
        assert [r.sha256 for r in risk] == [sha("o")]
        result = await db.transact(
            drain.drain_step,
            await db.query(instances.get_instance, other["id"]),
            T0 + 6,
            drain_grace=600,
        )
        assert result.retired
        assert (await db.query(objects.get_object, sha("o")))["state"] == "lost"
        assert len(await db.query(events.list_events, kind="instance.retired_forced")) == 1
        await db.dispose()

    run(main())


def test_a_held_object_that_disappears_is_a_warning(db_url):
    async def main():
        db, _ = await setup(db_url, 1)
        _, inst, _ = await finished_job(db, [OutputFile(path="o", sha256=sha("o"), size=5)])
        row = await db.query(instances.get_instance, inst)
        await db.transact(objects.sync, row, [sha("o")], [], T0, "http://s")
        await db.transact(
            objects.sync, row, [], [ObjectError(sha256=sha("o"), error="x")], T0, "http://s"
        )
        warn = await db.query(events.list_events, min_level="warning", kind="object.missing")
        assert len(warn) == 1
        await db.dispose()

    run(main())


def test_a_stranded_object_goes_to_the_durable_store_and_counts_only_once_confirmed(db_url):
    async def main():
        db = Database(db_url)
        await migrate(db)
        await db.transact(
            fleets.upsert_fleet,
            name="f",
            backend="local",
            min_size=0,
            max_size=1,
            target_size=1,
            now=T0,
            spec={"durable": {"endpoint": "http://127.0.0.1:9", "bucket": "b"}},
        )
        await register(db, "w0", T0, fleet="f", peer_url="http://127.0.0.1:9000")
        _, holder, _ = await finished_job(db, [OutputFile(path="o", sha256=sha("o"), size=5)])
        await db.transact(drain.request_drain, holder, False, T0)

        async def step(t: float) -> drain.DrainResult:
            inst = await db.query(instances.get_instance, holder)
            return await db.transact(drain.drain_step, inst, t, drain_grace=600)

        first = await step(T0)
        assert (first.offloads, first.retired, first.copies) == (1, False, [])
        assert await db.query(events.list_events, min_level="warning") == []  # not at risk
        (row,) = await db.transact(offloads.deliver, holder, T0)
        assert row.sha256 == sha("o") and row.fleet == "f" and row.size == 5
        assert await db.transact(offloads.deliver, holder, T0) == []  # handed over once

        # the upload failed: a warning, and a new order only after the retry delay
        await db.transact(
            offloads.report, holder, [], [ObjectError(sha256=sha("o"), error="HTTP 503")], T0 + 1
        )
        (warn,) = await db.query(events.list_events, min_level="warning")
        assert warn["kind"] == "object.offload_failed" and "HTTP 503" in warn["message"]
        assert (await step(T0 + 2)).offloads == 0
        assert (await step(T0 + 1 + offloads.RETRY_AFTER)).offloads == 1
        await db.transact(offloads.deliver, holder, T0 + 12)

        # the agent says it uploaded: not safe until a server has seen it in the bucket
        await db.transact(offloads.report, holder, [sha("o")], [], T0 + 13)
        assert not (await step(T0 + 14)).retired
        (claimed,) = await db.transact(offloads.claim_uploaded, db)
        await db.transact(offloads.confirmed, claimed.sha256, claimed.fleet, "s3://b/o", T0 + 15)
        assert (await step(T0 + 16)).retired
        obj = await db.query(objects.get_object, sha("o"))
        assert (obj["state"], obj["durable_fleet"], obj["durable_url"]) == ("live", "f", "s3://b/o")
        await db.dispose()

    run(main())


def test_an_offload_never_reported_expires_and_is_ordered_again(db_url):
    async def main():
        db, (inst,) = await setup(db_url, 1)
        await finished_job(db, [OutputFile(path="o", sha256=sha("o"), size=5)])
        assert await db.transact(offloads.order, [sha("o")], "f", inst["id"], T0) == 1
        assert await db.transact(offloads.order, [sha("o")], "f", inst["id"], T0) == 0
        await db.transact(offloads.deliver, inst["id"], T0)
        assert await db.transact(offloads.expire, T0 + 30, 60) == 0
        assert await db.transact(offloads.expire, T0 + 61, 60) == 1
        later = T0 + 61 + offloads.RETRY_AFTER
        assert await db.transact(offloads.order, [sha("o")], "f", inst["id"], later) == 1
        await db.dispose()

    run(main())


def test_a_claim_is_no_copy_until_the_agent_reports_it_or_a_server_proves_it(db_url):
    async def main():
        db, (a, b) = await setup(db_url)
        _job, holder, _ = await finished_job(db, [OutputFile(path="x", sha256=sha("x"), size=1)])
        other = b["id"] if holder == a["id"] else a["id"]
        h_row = await db.query(instances.get_instance, holder)
        o_row = await db.query(instances.get_instance, other)
        await db.transact(objects.sync, h_row, [sha("x")], [], T0, "http://s")
        assert await db.query(objects.replica_state, sha("x"), holder) == "present"
        job2, _, _ = await finished_job(db, [OutputFile(path="y", sha256=sha("y"), size=1)])
        await db.transact(objects.sync, h_row, [sha("x"), sha("y")], [], T0, "http://s")

        # a finish names the holder's object on another instance: only a claim
        async def claim(conn):
            await objects.record_outputs(
                conn, job2, 1, other, [OutputFile(path="x", sha256=sha("x"), size=1)], T0
            )

        await db.transact(claim)
        assert await db.query(objects.replica_state, sha("x"), other) == "unverified"
        # a heartbeat lists the holder's other object: a report to be proven
        await db.transact(objects.sync, o_row, [sha("y")], [], T0 + 1, "http://s")
        assert await db.query(objects.replica_state, sha("y"), other) == "unverified"
        (to_prove,) = await db.query(objects.claims_to_prove)
        assert (to_prove.sha256, to_prove.instance_id) == (sha("y"), other)
        # the server could not fetch those bytes from it: refused, with a warning
        await db.transact(objects.disproved, to_prove, "HTTP 404", T0 + 1)
        assert await db.query(objects.replica_state, sha("y"), other) == "failed"

        # draining the real holder: both are at risk and get real copies
        _, risk = await db.transact(drain.request_drain, holder, False, T0 + 2)
        assert {r.sha256 for r in risk} == {sha("x"), sha("y")}
        result = await db.transact(
            drain.drain_step, await db.query(instances.get_instance, holder), T0 + 2, drain_grace=1
        )
        assert not result.retired and {s for s, _ in result.copies} == {sha("x"), sha("y")}

        # a claim its agent never reports expires, with a warning too
        late = T0 + objects.CLAIM_GRACE + 10
        _job3, inst3, _ = await finished_job(db, [OutputFile(path="z", sha256=sha("z"), size=1)])
        row3 = await db.query(instances.get_instance, inst3)
        await db.transact(objects.sync, row3, [], [], late, "http://s")
        assert await db.query(objects.replica_state, sha("z"), inst3) == "failed"
        refused = await db.query(
            events.list_events, min_level="warning", kind="object.claim_refused"
        )
        assert len(refused) == 2
        assert any("could not prove it: HTTP 404" in e["message"] for e in refused)
        assert any("does not hold it" in e["message"] for e in refused)
        await db.dispose()

    run(main())


def test_the_server_cuts_an_attempts_log_at_the_jobs_limit(db_url):
    async def main():
        db, _ = await setup(db_url, 1)
        job_id = await db.transact(
            jobs_repo.submit, JobSubmit(command=["true"], log_limit=2048), T0
        )
        (p,) = await db.transact(dispatch.lock_jobs, db, T0)
        (order,) = await db.transact(dispatch.deliver_attempts, p.instance_id, T0)
        await db.transact(jobs_repo.start_attempt, job_id, 1, order.token, T0)

        async def send(*chunks):
            await db.transact(jobs_repo.append_logs, job_id, 1, order.token, list(chunks), T0)

        await send((0, "out", b"a" * 1500))
        await send((0, "out", b"a" * 1500))  # a retry: stored once, counted once
        await send((1, "err", b"b" * 1000), (2, "out", b"c" * 10))
        await send((3, "out", b"d"))
        rows = await db.query(jobs_repo.read_logs, job_id, 1, -1)
        data = b"".join(r["data"] for r in rows)
        assert data == b"a" * 1500 + b"b" * 548 + b"[corral: log truncated after 2 KiB]\n"
        assert [r["seq"] for r in rows] == [0, 1]
        await db.dispose()

    run(main())


def test_a_sandbox_warning_is_an_event_once_per_instance_and_sandbox(tmp_path):
    async def main():  # plain SQL, nothing dialect-specific: SQLite only
        db = Database(f"sqlite:///{tmp_path / 'corral.db'}")
        await migrate(db)
        kw = dict(
            name="w",
            cpus=1,
            memory_mb=1,
            host=None,
            agent_version=None,
            fleet=None,
            peer_url=None,
            sandbox="subreaper; limits off",
            sandbox_warnings=["no cgroup v2 group for attempts"],
        )
        reg = await db.transact(instances.register, instance_id=None, now=T0, **kw)
        iid = reg.instance["id"]
        for t in (T0 + 1, T0 + 2):  # restarts with the same sandbox
            await db.transact(instances.register, instance_id=iid, now=t, **kw)
        warns = await db.query(events.list_events, min_level="warning", kind="instance.sandbox")
        assert len(warns) == 1 and "no cgroup v2" in warns[0]["message"]
        assert (await db.query(instances.get_instance, iid))["sandbox"] == kw["sandbox"]
        await db.dispose()

    run(main())
