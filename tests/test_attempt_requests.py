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
