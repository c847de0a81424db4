"""A submit retried with its Idempotency-Key is the same job (a real server on
SQLite and PostgreSQL, real HTTP)."""

from __future__ import annotations

import httpx
import pytest

from corral.client.sdk import CorralError
from corral.testing import Cluster

pytestmark = pytest.mark.e2e


def test_a_retried_submit_returns_the_first_job(cluster: Cluster, db_url: str):
    server = cluster.server(db_url=db_url)
    api = server.url + "/api/v1/jobs"
    h = {"Authorization": f"Bearer {server.admin_token}", "Idempotency-Key": "run-42"}
    first = httpx.post(api, json={"command": ["sleep", "1"]}, headers=h)
    assert first.status_code == 201, first.text
    again = httpx.post(api, json={"command": ["sleep", "1"]}, headers=h)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    # the same key with another body names the conflict and creates nothing
    r = httpx.post(api, json={"command": ["sleep", "2"]}, headers=h)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "idempotency_conflict"
    assert "Idempotency-Key" in r.json()["error"]["message"]
    r = httpx.post(api, json={"command": ["true"]}, headers={**h, "Idempotency-Key": "x" * 300})
    assert r.status_code == 422 and "Idempotency-Key" in r.json()["error"]["message"]
    # without a key every submit is a new job
    del h["Idempotency-Key"]
    assert httpx.post(api, json={"command": ["true"]}, headers=h).status_code == 201
    assert len(httpx.get(api, headers=h).json()) == 2
    # the SDK sends one key per submit call (reused on its own retries)
    client = cluster.client(server)
    a = client.submit(["true"], idempotency_key="sdk-1")
    b = client.submit(["true"], idempotency_key="sdk-1")
    c = client.submit(["true"])
    assert a.id == b.id and c.id != a.id
    with pytest.raises(CorralError) as err:
        client.submit(["false"], idempotency_key="sdk-1")
    assert err.value.status == 409
