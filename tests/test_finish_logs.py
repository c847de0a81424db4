"""A finish that carries the attempt's last log chunks: they are stored with the result,
in one transaction and before it, fenced by the same token, within the log limit; a
retried finish stores nothing twice; the runner sends them with its finish (and falls
back to a separate logs call on a server that does not take them)."""

from __future__ import annotations

import asyncio
import base64
import threading
import time

import pytest
import sqlalchemy as sa

from corral.agent.relay import RelayClient
from corral.agent.runner import MAX_BATCH_BYTES, LogBuffer, Runner
from corral.api import JobSubmit
from corral.domain.errors import StaleToken
from corral.domain.sandbox import cut_log
from corral.store import dispatch
from corral.store import jobs as repo
from corral.store.schema import log_chunks
from tests.test_store import NOW, job_row, locked_job, open_db


async def _logs(db, job_id: int, n: int) -> bytes:
    return b"".join(bytes(c["data"]) for c in await db.query(repo.read_logs, job_id, n, -1))


async def _locked(db, **spec) -> tuple[int, int, str, str]:
    """A job locked and delivered wherever the dispatcher puts it (earlier cases' instances
    may have room): (job id, attempt, instance, token)."""
    job_id = await db.transact(repo.submit, JobSubmit(command=["true"], **spec), NOW)
    (p,) = [p for p in await db.transact(dispatch.lock_jobs, db, NOW) if p.job_id == job_id]
    (order,) = [
        o
        for o in await db.transact(dispatch.deliver_attempts, p.instance_id, NOW)
        if o.job_id == job_id
    ]
    return job_id, order.attempt, p.instance_id, order.token


async def _stored_once(db) -> None:
    """With the result, in order; a retried finish (lost reply) stores nothing twice."""
    job_id, n, _inst, token = await locked_job(db)
    await db.transact(repo.start_attempt, job_id, n, token, NOW + 1)
    await db.transact(repo.append_logs, job_id, n, token, [(0, "out", b"a\n")], NOW + 2)
    last = [(1, "out", b"b\n"), (2, "err", b"c\n")]
    got = await db.transact(
        repo.finish_attempt, job_id, n, token, 0, None, NOW + 3, None, None, last
    )
    assert got == ("succeeded", True)
    assert await _logs(db, job_id, n) == b"a\nb\nc\n"
    # past every chunk (Job.wait asks so, to hear only of the job's end): none, on
    # PostgreSQL too, where the sequence is a 32-bit integer
    assert list(await db.query(repo.read_logs, job_id, n, 2**62)) == []
    again = await db.transact(
        repo.finish_attempt, job_id, n, token, 0, None, NOW + 9, None, None, last
    )
    assert again == ("succeeded", False)
    assert await _logs(db, job_id, n) == b"a\nb\nc\n"
    row = await job_row(db, job_id)
    assert (row["state"], row["finished_at"]) == ("succeeded", NOW + 3)


async def _stale_stores_nothing(db) -> None:
    job_id, n, inst, token1 = await _locked(db)
    await db.transact(repo.start_attempt, job_id, n, token1, NOW)
    await db.transact(repo.requeue, job_id, NOW + 1, "test")
    await db.transact(dispatch.lock_jobs, db, NOW + 2)
    await db.transact(dispatch.deliver_attempts, inst, NOW + 2)
    with pytest.raises(StaleToken):
        await db.transact(
            repo.finish_attempt, job_id, 1, token1, 0, None, NOW + 3, None, None,
            [(0, "out", b"late\n")],
        )  # fmt: skip
    async with db.read() as conn:
        count = (
            sa.select(sa.func.count()).select_from(log_chunks).where(log_chunks.c.job_id == job_id)
        )
        assert (await conn.execute(count)).scalar_one() == 0
    assert (await job_row(db, job_id))["state"] == "locked"


async def _within_the_limit(db) -> None:
    job_id, n, _inst, token = await _locked(db, log_limit=1024)
    await db.transact(repo.start_attempt, job_id, n, token, NOW)
    await db.transact(repo.append_logs, job_id, n, token, [(0, "out", b"x" * 1000)], NOW)
    last = [(1, "out", b"y" * 100), (2, "out", b"z" * 100)]
    await db.transact(repo.finish_attempt, job_id, n, token, 0, None, NOW + 1, None, None, last)
    kept, _cut = cut_log(1000, 1024, b"y" * 100)
    assert await _logs(db, job_id, n) == b"x" * 1000 + kept


def test_a_finish_stores_its_chunks_once_fenced_and_within_the_limit(db_url):
    """(one database for the three cases: a fresh one costs more than the cases)"""

    async def main():
        db = await open_db(db_url)
        try:
            await _stored_once(db)
            await _stale_stores_nothing(db)
            await _within_the_limit(db)
        finally:
            await db.dispose()

    asyncio.run(main())


# -- the runner's side ------------------------------------------------------------------------


def test_output_just_before_the_end_is_left_for_the_finish():
    """The shipper lingers briefly on new output: when the command's streams close in
    that time, the output is not shipped on its own but left for the finish."""
    buf = LogBuffer()
    buf.put("out", b"last line\n")
    threading.Timer(0.02, buf.stream_closed).start()
    threading.Timer(0.03, buf.stream_closed).start()
    assert buf.take(timeout=0.2, linger=5.0) == []
    assert buf.closed_streams == 2
    assert [d for _s, _st, d in buf.rest()] == [b"last line\n"]


def test_output_of_a_running_command_is_shipped_after_the_linger():
    buf = LogBuffer()
    buf.put("out", b"progress\n")
    t0 = time.monotonic()
    assert [d for _s, _st, d in buf.take(timeout=0.2, linger=0.05)] == [b"progress\n"]
    assert time.monotonic() - t0 >= 0.05
    # a full batch does not wait
    buf = LogBuffer()
    buf.put("out", b"x" * MAX_BATCH_BYTES)
    t0 = time.monotonic()
    assert len(buf.take(timeout=0.2, linger=5.0)) == 1
    assert time.monotonic() - t0 < 2.0


class FakeServer:
    """What the runner's calls would send, answered as a server would (or, with
    `old`, as a server before finish took chunks: 422 for the unknown field)."""

    def __init__(self, old: bool = False) -> None:
        self.old = old
        self.calls: list[tuple[str, dict]] = []

    def request(self, _method, url, json, deadline=None, stop=None):
        action = url.rsplit("/", 1)[1]
        self.calls.append((action, json))

        class Resp:
            status_code = 200
            text = ""

            @staticmethod
            def json():
                return {"job_state": "succeeded"}

        if self.old and action == "finish" and "chunks" in json:
            Resp.status_code = 422
            Resp.text = "extra fields not permitted"
        return Resp


def _runner(server: FakeServer, tmp_path) -> Runner:
    r = Runner.__new__(Runner)
    r.dir = tmp_path
    r.base = "/api/v1/jobs/1/attempts/1"
    r.job_id, r.attempt, r.spec = 1, 1, {"token": "t"}
    r.server = server
    r.relay = RelayClient(tmp_path)  # no agent listens: the runner reports directly
    r.logs = LogBuffer()
    r.stale = threading.Event()
    r.terminated = threading.Event()
    r.evicted = threading.Event()
    return r


def _decoded(chunks: list[dict]) -> list[tuple[int, bytes]]:
    return [(c["seq"], base64.b64decode(c["data"])) for c in chunks]


def test_the_finish_carries_the_last_chunks_in_one_request(tmp_path):
    server = FakeServer()
    r = _runner(server, tmp_path)
    r.logs.put("out", b"a\n")
    r.logs.put("err", b"b\n")
    assert r.finish(0, None) == 0
    assert [a for a, _ in server.calls] == ["finish"]
    assert _decoded(server.calls[0][1]["chunks"]) == [(0, b"a\n"), (1, b"b\n")]


def test_more_than_one_batch_left_ships_in_order_and_the_last_rides_the_finish(tmp_path):
    server = FakeServer()
    r = _runner(server, tmp_path)
    for k in range(5):
        r.logs.put("out", bytes([65 + k]) * (MAX_BATCH_BYTES // 2))
    assert r.finish(0, None) == 0
    actions = [a for a, _ in server.calls]
    assert actions[-1] == "finish" and set(actions[:-1]) == {"logs"} and len(actions) > 1
    seqs = [s for _a, body in server.calls for s, _d in _decoded(body.get("chunks", []))]
    assert seqs == [0, 1, 2, 3, 4]


def test_a_server_that_does_not_take_chunks_gets_them_as_logs_first(tmp_path):
    server = FakeServer(old=True)
    r = _runner(server, tmp_path)
    r.logs.put("out", b"a\n")
    assert r.finish(0, None) == 0
    assert [a for a, _ in server.calls] == ["finish", "logs", "finish"]
    assert "chunks" not in server.calls[2][1]
    assert _decoded(server.calls[1][1]["chunks"]) == [(0, b"a\n")]
