"""Runners' attempt reports relayed by their agent (corral.agent.relay): the server's
route answers each report as the report's own route would, fenced by its own token;
the agent's end sends what waits as one request and hands each runner its answer; a
report the relay cannot deliver is the runner's to send directly."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from corral.agent.relay import MAX_REPORT, NotRelayed, RelayClient
from corral.agent.relay_server import RelayServer
from corral.server.app import close_context, open_context
from corral.server.config import ServerConfig
from corral.server.loops.dispatcher import dispatch_once
from tests import appkit

RELAY = "/api/v1/agents/attempts"


async def _orders(http, ctx, agent, n: int) -> list[dict]:
    admin = {"Authorization": f"Bearer {ctx.admin_token}"}
    for _ in range(n):
        r = await http.post("/api/v1/jobs", json={"command": ["true"]}, headers=admin)
        assert r.status_code in (200, 201), r.text
    await dispatch_once(ctx)
    r = await http.post("/api/v1/agents/heartbeat", json=agent.beat, headers=agent.headers)
    orders = r.json()["start"]
    assert len(orders) == n
    return orders


def _report(order: dict, action: str, body: dict | None = None, token: str | None = None):
    return {
        "job_id": order["job_id"],
        "attempt": order["attempt"],
        "token": token or order["token"],
        "action": action,
        "body": body,
    }


async def _relayed_reports(tmp_path: Path, db_url: str) -> dict:
    ctx = await open_context(ServerConfig(data_dir=tmp_path / "srv", db_url=db_url))
    out: dict = {}
    try:
        async with appkit.client(ctx) as http:
            agent = await appkit.join(http, ctx, "one")
            a, b, c = await _orders(http, ctx, agent, 3)
            stale = "0" * 64
            reports = [
                _report(a, "start"),
                _report(b, "start"),
                _report(c, "start", token=stale),  # not c's token: 409, nothing changes
                _report(a, "finish", {"exit_code": 0, "outputs": []}),
                _report(b, "finish", {"exit_code": "not a number"}),  # 422, b still runs
                _report(b, "logs", {"chunks": [{"seq": 0, "stream": "out", "data": "aGkK"}]}),
            ]
            out["no_credential"] = (await http.post(RELAY, json={"reports": reports})).status_code
            r = await http.post(RELAY, json={"reports": reports}, headers=agent.headers)
            assert r.status_code == 200, r.text
            out["results"] = r.json()["results"]
            # b's start and a's finish again (their answers lost): neither happens twice
            again = [reports[1], reports[3]]
            r = await http.post(RELAY, json={"reports": again}, headers=agent.headers)
            out["again"] = r.json()["results"]
            admin = {"Authorization": f"Bearer {ctx.admin_token}"}
            out["states"] = [
                (await http.get(f"/api/v1/jobs/{o['job_id']}", headers=admin)).json()
                for o in (a, b, c)
            ]
            logs = await http.get(f"/api/v1/jobs/{b['job_id']}/logs", headers=admin)
            out["b_logs"] = logs.json()
            empty = await http.post(RELAY, json={"reports": []}, headers=agent.headers)
            out["empty"] = empty.status_code
    finally:
        await close_context(ctx)
    return out


def test_relayed_reports_are_answered_one_by_one_as_their_own_routes(tmp_path, db_url):
    out = asyncio.run(_relayed_reports(tmp_path, db_url))
    assert out["no_credential"] == 401
    statuses = [r["status"] for r in out["results"]]
    assert statuses == [200, 200, 409, 200, 422, 200], out["results"]
    assert out["results"][0]["body"]["job_state"] == "running"
    assert out["results"][2]["body"]["error"]["code"] == "stale_token"
    assert out["results"][3]["body"] == {
        "job_id": out["states"][0]["id"],
        "attempt": 1,
        "job_state": "succeeded",
        "recorded": True,
    }
    assert "exit_code" in out["results"][4]["body"]["error"]["message"]
    # sent again: the start and the finish are not recorded twice
    assert [r["status"] for r in out["again"]] == [200, 200]
    assert out["again"][1]["body"]["recorded"] is False
    a, b, c = out["states"]
    assert (a["state"], b["state"], c["state"]) == ("succeeded", "running", "locked")
    assert a["attempts"][0]["exit_code"] == 0
    assert [c["data"] for c in out["b_logs"]["chunks"]] == ["aGkK"], out["b_logs"]  # "hi\n"
    assert out["empty"] == 422


# -- the agent's end and the runner's end, over the real socket ---------------------------------


class Relay:
    """A RelayServer on its own event loop thread, with a `send` the test controls."""

    def __init__(self, data_dir: Path, answer=None) -> None:
        self.batches: list[list[dict]] = []
        self.answer = answer or (lambda r: {"status": 200, "body": {"echo": r["job_id"]}})
        self.gate = threading.Event()
        self.gate.set()
        self.held = 0  # reports whose request is on its way (or held at the gate)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = RelayServer(data_dir, self._send)
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)

    async def _send(self, reports: list[dict]):
        self.held += len(reports)
        await asyncio.to_thread(self.gate.wait, 10)
        self.batches.append(reports)
        return [self.answer(r) for r in reports]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def relay(tmp_path):
    made: list[Relay] = []

    def make(answer=None) -> Relay:
        r = Relay(tmp_path, answer)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def test_the_relay_socket_is_the_agents_alone(tmp_path, relay):
    relay()
    mode = stat.S_IMODE(os.stat(tmp_path / "relay.sock").st_mode)
    assert mode == 0o600


def test_reports_waiting_together_go_as_one_request_and_each_gets_its_answer(tmp_path, relay):
    from corral.testing import wait_for

    r = relay()
    r.gate.clear()  # the first request is held: the others queue behind it
    answers: dict[int, tuple[int, bytes]] = {}

    def runner(job_id: int) -> None:
        client = RelayClient(tmp_path, timeout=60)
        answers[job_id] = client.report(job_id, 1, "tok", "start", None)

    first = threading.Thread(target=runner, args=(1,))
    first.start()
    wait_for(lambda: r.held == 1, 10, "the first report's request to be on its way")
    rest = [threading.Thread(target=runner, args=(k,)) for k in range(2, 12)]
    for t in rest:
        t.start()
    wait_for(lambda: len(r.server.waiting) == 10, 10, "ten reports queued behind it")
    r.gate.set()
    for t in [first, *rest]:
        t.join(10)
    assert {k: json.loads(v[1])["echo"] for k, v in answers.items()} == {k: k for k in range(1, 12)}
    assert all(status == 200 for status, _ in answers.values())
    assert [len(b) for b in r.batches] == [1, 10]  # 11 reports, 2 requests


def test_a_report_the_relay_cannot_deliver_is_the_runners_to_send(tmp_path, relay):
    r = relay()

    async def refuse(_reports):
        return None  # the server did not answer (or does not take relayed reports)

    r.server.send = refuse
    client = RelayClient(tmp_path)
    with pytest.raises(NotRelayed):
        client.report(1, 1, "tok", "start", None)


def test_without_an_agent_listening_the_runner_goes_direct_at_once(tmp_path):
    client = RelayClient(tmp_path)
    with pytest.raises(NotRelayed):
        client.report(1, 1, "tok", "start", None)
    (tmp_path / "relay.sock").write_text("")  # a stale file: connect refused
    client.down_until = 0
    with pytest.raises(NotRelayed):
        client.report(1, 1, "tok", "start", None)


def test_a_report_too_large_to_relay_is_not_sent_to_the_relay(tmp_path, relay):
    r = relay()
    client = RelayClient(tmp_path)
    with pytest.raises(NotRelayed, match="too large"):
        client.report(1, 1, "tok", "logs", {"chunks": ["x" * MAX_REPORT]})
    assert r.batches == []
    assert client.report(2, 1, "tok", "start", None)[0] == 200  # and the relay still works


# -- end to end: real server, agent and runners ---------------------------------------------------


def _counts(server) -> dict[str, float]:
    import httpx

    text = httpx.get(
        server.url + "/metrics", headers={"Authorization": f"Bearer {server.admin_token}"}
    ).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("corral_relayed_attempt_reports_total{"):
            out["relayed"] = out.get("relayed", 0.0) + float(line.split()[1])
        elif line.startswith('corral_http_requests_total{route="attempts.'):
            route = line.split('"')[1]
            out[route] = out.get(route, 0.0) + float(line.split()[1])
    return out


@pytest.mark.slow
def test_runners_report_through_their_agent_and_directly_when_it_is_gone(cluster, jobfiles):
    from corral.testing import job_python, wait_for

    server = cluster.server()
    agent = cluster.agent(server, name="relay1", cpus=8)
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1)
    ids = client.submit_array(["true"], 1, 12)
    wait_for(
        lambda: all(client.job(i).state == "succeeded" for i in ids),
        120,
        "12 jobs through the relay",
    )
    counts = _counts(server)
    assert counts.get("relayed", 0) >= 24, counts  # each job's start and finish
    assert counts.get("attempts.start", 0) == 0 and counts.get("attempts.finish", 0) == 0, counts

    # a running job whose agent dies: its runner finishes it on its own, directly
    gate = jobfiles / "gate"
    job = client.submit([job_python(), "-c", GATED, str(gate)])
    wait_for(lambda: client.job(job.id).state == "running", 60, "the gated job to run")
    agent.kill()
    gate.write_text("go")
    done = wait_for(
        lambda: (j := client.job(job.id)).state in ("succeeded", "failed") and j,
        60,
        "the orphaned runner's finish",
    )
    assert (done.state, done.result_attempt) == ("succeeded", 1)
    assert _counts(server).get("attempts.finish", 0) == 1  # sent by the runner itself


GATED = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]):\n    time.sleep(0.05)\n"


def test_a_relay_that_does_not_answer_is_given_up_for_the_direct_route(tmp_path, relay):
    r = relay()
    r.gate.clear()  # the server never answers the relay
    client = RelayClient(tmp_path, timeout=0.5)
    with pytest.raises(NotRelayed, match="no answer"):
        client.report(1, 1, "tok", "finish", {"exit_code": 0})
    r.gate.set()


def test_a_stopped_agent_is_seen_as_not_answering():
    import signal
    import subprocess

    from corral.agent.relay import _running
    from corral.testing import wait_for

    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert _running(proc.pid)
        proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: not _running(proc.pid), 10, "the process to show as stopped")
        proc.send_signal(signal.SIGCONT)
        wait_for(lambda: _running(proc.pid), 10, "the process to run again")
    finally:
        proc.kill()
        proc.wait()
    assert not _running(proc.pid)
