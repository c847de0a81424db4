"""Joining: a retried join is the same instance; a join to a fleet nobody created is
refused with what to do, and the agent exits with that message (real server and agent
processes on loopback)."""

from __future__ import annotations

import secrets

import httpx
import pytest

from corral.testing import Cluster

pytestmark = pytest.mark.e2e


def body(**extra) -> dict:
    return {"name": "w1", "cpus": 1, "memory_mb": 1, **extra}


def test_a_retried_join_is_the_same_instance_and_an_unknown_fleet_is_a_clear_422(
    cluster: Cluster, db_url: str
):
    server = cluster.server(db_url=db_url)
    url = server.url + "/api/v1/agents/register"
    h = {"Authorization": f"Bearer {server.join_token}"}
    key = secrets.token_urlsafe(32)
    first = httpx.post(url, json=body(join_key=key), headers=h)
    assert first.status_code == 200, first.text
    # the answer was lost (a client timeout): the agent sends the same join again
    again = httpx.post(url, json=body(join_key=key), headers=h)
    assert again.status_code == 200, again.text
    assert again.json()["instance_id"] == first.json()["instance_id"]
    assert again.json()["action"] == "welcome" and again.json()["credential"]
    # only the credential of the answer that arrived works
    hb = server.url + "/api/v1/agents/heartbeat"
    for reply, status in ((first, 401), (again, 200)):
        r = httpx.post(
            hb,
            json={"instance_id": reply.json()["instance_id"], "incarnation": 2},
            headers={"Authorization": f"Bearer {reply.json()['credential']}"},
        )
        assert r.status_code == status, r.text
    # somebody else with the same name (another key, or none) is refused
    for other in ({"join_key": secrets.token_urlsafe(32)}, {}):
        r = httpx.post(url, json=body(**other), headers=h)
        assert r.status_code == 409 and r.json()["error"]["code"] == "name_in_use"

    # a fleet nobody created: 422 naming it and the command that creates it
    r = httpx.post(url, json=body(name="w2", fleet="nosuch"), headers=h)
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert "nosuch" in message and "corral fleet apply" in message
    # the agent exits with that message instead of retrying forever
    agent = cluster.agent(server, name="w3", extra=["--fleet", "nosuch"])
    code = agent.process.wait(timeout=60)
    assert code not in (0, 3)
    assert "fleet 'nosuch'" in agent.log() and "corral fleet apply" in agent.log()
