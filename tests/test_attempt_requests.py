"""What a runner's start costs the server: the fenced UPDATE of the attempt and the
UPDATE of its job, nothing else (the metrics come from those statements' RETURNING, not
from reading the rows again). In process (no loops), statements counted with a cursor
hook; the runner sends start without a body (tests/test_finish_logs.py covers the
runner's side of the finish)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import REGISTRY

from corral.server.app import close_context, open_context
from corral.server.config import ServerConfig
from corral.server.issued import IssuedTokens
from corral.server.loops.dispatcher import dispatch_once
from tests import appkit
from tests.test_heartbeat_writes import Statements

TX = ("BEGIN", "COMMIT", "ROLLBACK")


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def _start(tmp_path: Path, db_url: str) -> tuple[list[str], dict, float, float]:
    ctx = await open_context(ServerConfig(data_dir=tmp_path / "srv", db_url=db_url))
    counter = Statements(ctx.db.engine)
    try:
        async with appkit.client(ctx) as http:
            agent = await appkit.join(http, ctx, "one")
            admin = {"Authorization": f"Bearer {ctx.admin_token}"}
            r = await http.post("/api/v1/jobs", json={"command": ["true"]}, headers=admin)
            assert r.status_code in (200, 201), r.text
            await dispatch_once(ctx)
            r = await http.post("/api/v1/agents/heartbeat", json=agent.beat, headers=agent.headers)
            (order,) = r.json()["start"]
            url = f"/api/v1/jobs/{order['job_id']}/attempts/{order['attempt']}/start"
            token = {"X-Corral-Attempt-Token": order["token"]}
            started0 = _sample("corral_attempts_started_total")
            waits0 = _sample("corral_submit_to_start_seconds_count")
            counter.on = True
            r = await http.post(url, headers=token)
            counter.on = False
            assert r.status_code == 200, r.text
            ack = r.json()
            # a retried start (its reply was lost), with the empty body older runners send
            r = await http.post(url, headers=token, json={})
            assert r.status_code == 200, r.text
            return (
                [s for s in counter.seen if not s.lstrip().upper().startswith(TX)],
                ack,
                _sample("corral_attempts_started_total") - started0,
                _sample("corral_submit_to_start_seconds_count") - waits0,
            )
    finally:
        await close_context(ctx)


def test_a_start_is_two_statements_and_counted_once(tmp_path: Path, db_url: str):
    seen, ack, started, waits = asyncio.run(_start(tmp_path, db_url))
    assert [s.split()[0:2] for s in seen] == [["UPDATE", "job_attempts"], ["UPDATE", "jobs"]], seen
    assert ack["job_state"] == "running" and ack["recorded"]
    assert (started, waits) == (1, 1)


FINISH = {"exit_code": 0, "reason": None, "outputs": []}


async def _finish_after_start(tmp_path: Path, db_url: str) -> dict:
    """Start then finish an attempt; then finish another as a server that never saw
    its start (its memory of tokens empty, as after a restart)."""
    ctx = await open_context(ServerConfig(data_dir=tmp_path / "srv", db_url=db_url))
    counter = Statements(ctx.db.engine)
    out: dict = {}
    try:
        async with appkit.client(ctx) as http:
            agent = await appkit.join(http, ctx, "one")
            admin = {"Authorization": f"Bearer {ctx.admin_token}"}
            orders = []
            for _ in range(2):
                r = await http.post("/api/v1/jobs", json={"command": ["true"]}, headers=admin)
                assert r.status_code in (200, 201), r.text
                await dispatch_once(ctx)
                r = await http.post(
                    "/api/v1/agents/heartbeat", json=agent.beat, headers=agent.headers
                )
                orders += r.json()["start"]
            urls = [f"/api/v1/jobs/{o['job_id']}/attempts/{o['attempt']}" for o in orders]
            tokens = [{"X-Corral-Attempt-Token": o["token"]} for o in orders]
            for url, token in zip(urls, tokens, strict=True):
                r = await http.post(url + "/start", headers=token)
                assert r.status_code == 200, r.text
            # a token never issued for the first attempt (the second attempt's): refused
            # before its body is read, although the first attempt's token is known
            r = await http.post(urls[0] + "/finish", headers=tokens[1], json=FINISH)
            out["wrong_token"] = r.status_code
            counter.on = True
            r = await http.post(urls[0] + "/finish", headers=tokens[0], json=FINISH)
            counter.on = False
            assert r.status_code == 200, r.text
            out["first"] = [s for s in counter.seen if not s.lstrip().upper().startswith(TX)]
            # a server that never saw the start (restarted, or another one on PostgreSQL):
            # its memory of tokens is empty
            ctx.issued_tokens = IssuedTokens()
            counter.seen.clear()
            counter.on = True
            r = await http.post(urls[1] + "/finish", headers=tokens[1], json=FINISH)
            counter.on = False
            assert r.status_code == 200, r.text
            out["other"] = [s for s in counter.seen if not s.lstrip().upper().startswith(TX)]
            # a retried finish (its reply was lost): the token is known now
            counter.seen.clear()
            counter.on = True
            r = await http.post(urls[1] + "/finish", headers=tokens[1], json=FINISH)
            counter.on = False
            assert r.status_code == 200 and r.json()["recorded"] is False, r.text
            out["retried"] = counter.seen[:]
    finally:
        await close_context(ctx)
    return out


def _token_reads(statements: list[str]) -> list[str]:
    """The guard's check (jobs.attempt_token_issued)."""
    return [s for s in statements if s.lstrip().startswith("SELECT job_attempts.number")]


def test_a_finish_after_its_start_is_not_looked_up_again_by_the_guard(tmp_path: Path, db_url: str):
    out = asyncio.run(_finish_after_start(tmp_path, db_url))
    assert out["wrong_token"] == 401
    # the server that saw the start: the finish is its two fenced UPDATEs, no token read
    assert [s.split()[0:2] for s in out["first"]] == [
        ["UPDATE", "job_attempts"],
        ["UPDATE", "jobs"],
    ], out["first"]
    # a server that never saw the start looks the token up first, as before
    assert len(_token_reads(out["other"])) == 1, out["other"]
    assert not _token_reads(out["retried"]), out["retried"]


def _what(statement: str) -> str:
    """'INSERT jobs', 'SELECT tokens', 'UPDATE jobs': the kind of a statement and its table."""
    words = statement.split()
    if words[0].upper() == "INSERT":
        return f"INSERT {words[2]}"
    if words[0].upper() == "UPDATE":
        return f"UPDATE {words[1]}"
    return f"{words[0]} {words[words.index('FROM') + 1]}"


async def _submit(tmp_path: Path, db_url: str, key: str | None) -> tuple[list[str], dict, dict]:
    ctx = await open_context(ServerConfig(data_dir=tmp_path / "srv", db_url=db_url))
    counter = Statements(ctx.db.engine)
    try:
        async with appkit.client(ctx) as http:
            admin = {"Authorization": f"Bearer {ctx.admin_token}"}
            r = await http.get("/api/v1/jobs", headers=admin)  # the token's first use is noted
            assert r.status_code == 200, r.text
            headers = {**admin, **({"Idempotency-Key": key} if key else {})}
            body = {"command": ["true"], "name": "n", "env": {"A": "1"}, "cpus": 0.5}
            counter.on = True
            r = await http.post("/api/v1/jobs", json=body, headers=headers)
            counter.on = False
            assert r.status_code == 201, r.text
            got = await http.get(f"/api/v1/jobs/{r.json()['id']}", headers=admin)
            assert got.status_code == 200, got.text
            seen = [s for s in counter.seen if not s.lstrip().upper().startswith(TX)]
            return [_what(s) for s in seen], r.json(), got.json()
    finally:
        await close_context(ctx)


def test_a_submit_answers_with_the_row_it_wrote_and_reads_nothing_back(tmp_path: Path, db_url: str):
    """A submit is the credential's lookup and the job's INSERT (with its idempotency
    key's), answered from the INSERT's RETURNING: the same as a GET of the new job."""
    seen, reply, got = asyncio.run(_submit(tmp_path / "plain", db_url, None))
    assert seen == ["SELECT tokens", "INSERT jobs"]
    assert reply == got
    seen, reply, got = asyncio.run(_submit(tmp_path / "keyed", db_url, "k-1"))
    assert seen == ["SELECT tokens", "INSERT jobs", "INSERT submit_keys"]
    assert reply == got
