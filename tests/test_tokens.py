"""Credentials can be listed, rotated and revoked (issue 10, item 12): `corral tokens`
lists admin, join and agent credentials without their secrets; `corral tokens rotate
admin|join` prints the new secret once and the old one stops working at once;
`corral tokens revoke ID` takes effect at once; a retired instance's credential is
revoked."""

from __future__ import annotations

import json
import os
import subprocess

import httpx
import pytest

from corral.testing import Cluster, corral_cmd, wait_for

pytestmark = pytest.mark.e2e


def cli(server, token: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CORRAL_SERVER": server.url, "CORRAL_TOKEN": token}
    return subprocess.run(corral_cmd(*args), env=env, capture_output=True, text=True, timeout=60)


def _register(server, secret: str, name: str) -> httpx.Response:
    body = {"name": name, "cpus": 1, "memory_mb": 100, "host": "h", "agent_version": "0.0.1"}
    return httpx.post(
        f"{server.url}/api/v1/agents/register",
        json=body,
        headers={"Authorization": f"Bearer {secret}"},
        timeout=30,
    )


def _credential(agent) -> tuple[str, str]:
    path = agent.data_dir / "identity.json"
    wait_for(path.exists, 30, f"{agent.name}'s identity")
    data = json.loads(path.read_text())
    return data["instance_id"], data["credential"]


def test_rotate_join_and_admin_take_effect_at_once_and_list_shows_no_secret(cluster: Cluster):
    server = cluster.server()
    admin, join = server.admin_token, server.join_token
    a1 = cluster.agent(server, name="a1")
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1)
    _, credential = _credential(a1)

    r = cli(server, admin, "tokens", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert sorted(t["kind"] for t in rows) == ["admin", "agent", "join"]
    for t in rows:
        assert {"id", "kind", "created_at", "last_used_at", "revoked_at"} <= t.keys()
    agent_row = next(t for t in rows if t["kind"] == "agent")
    assert agent_row["last_used_at"] is not None  # its heartbeats use it
    table = cli(server, admin, "tokens")
    for out in (r.stdout, table.stdout):
        for secret in (admin, join, credential):
            assert secret not in out

    # rotate join: the old token is refused at registration, the new one works
    r = cli(server, admin, "tokens", "rotate", "join")
    assert r.returncode == 0, r.stderr
    new_join = r.stdout.strip().splitlines()[-1]
    assert new_join.startswith("crj_") and new_join != join
    assert server.join_token == new_join  # DATA_DIR/join.token follows
    assert _register(server, join, "late").status_code == 401
    cluster.agent(server, name="a2", join_token=new_join)
    cluster.wait_agents_running(client, 2)

    # rotate admin: the old admin token gets 401 at once, the new one works
    r = cli(server, admin, "tokens", "rotate", "admin")
    assert r.returncode == 0, r.stderr
    new_admin = r.stdout.strip().splitlines()[-1]
    assert new_admin.startswith("cra_") and new_admin != admin
    headers = {"Authorization": f"Bearer {admin}"}
    assert httpx.get(f"{server.url}/api/v1/jobs", headers=headers).status_code == 401
    headers = {"Authorization": f"Bearer {new_admin}"}
    assert httpx.get(f"{server.url}/api/v1/jobs", headers=headers).status_code == 200
    assert server.admin_token == new_admin
    r = cli(server, new_admin, "tokens", "--json")
    live = [t for t in json.loads(r.stdout) if t["revoked_at"] is None]
    assert sorted(t["kind"] for t in live) == ["admin", "agent", "agent", "join"]
    assert new_admin not in r.stdout and new_join not in r.stdout
    # the token routes are the admin's alone
    for secret in (new_join, credential):
        h = {"Authorization": f"Bearer {secret}"}
        assert httpx.get(f"{server.url}/api/v1/tokens", headers=h).status_code == 403


def test_revoking_an_agent_credential_and_retiring_an_instance_take_effect_at_once(
    cluster: Cluster,
):
    server = cluster.server()
    admin = server.admin_token
    a1 = cluster.agent(server, name="a1")
    a2 = cluster.agent(server, name="a2")
    client = cluster.client(server)
    cluster.wait_agents_running(client, 2)
    iid1, cred1 = _credential(a1)
    iid2, cred2 = _credential(a2)
    rows = json.loads(cli(server, admin, "tokens", "--json").stdout)
    token1 = next(t["id"] for t in rows if t["instance_id"] == iid1)

    r = cli(server, admin, "tokens", "revoke", token1)
    assert r.returncode == 0, r.stderr
    beat = {"instance_id": iid1, "incarnation": 1}
    resp = httpx.post(
        f"{server.url}/api/v1/agents/heartbeat",
        json=beat,
        headers={"Authorization": f"Bearer {cred1}"},
    )
    assert resp.status_code == 401
    wait_for(lambda: not a1.alive(), 30, "the agent whose credential was revoked to exit")

    # an instance that retires loses its credential
    client.drain(iid2)
    wait_for(
        lambda: (
            next(i for i in client.instances(include_terminated=True) if i.id == iid2).state
            in ("retired", "terminated")
        ),
        60,
        "a2 to retire",
    )
    rows = json.loads(cli(server, admin, "tokens", "--json").stdout)
    assert next(t for t in rows if t["instance_id"] == iid2)["revoked_at"] is not None
    assert _register(server, cred2, "a2").status_code == 401
    # an unknown id is a clear 404
    r = cli(server, admin, "tokens", "revoke", "nosuchid")
    assert r.returncode != 0 and "nosuchid" in r.stderr
