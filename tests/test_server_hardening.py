"""Server hardening against a real `corral server` process (issue 10, items 9 and 16):
bodies are refused before they are read when the request carries no credential, bodies
are capped per route (413 with the JSON error shape), integers beyond 64 bits get 422,
database errors get the documented JSON 503, /metrics and /docs need a token unless the
server was started with --public-metrics."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import httpx
import psutil
import pytest

from corral.testing import Cluster, ServerProc

pytestmark = pytest.mark.e2e

MiB = 2**20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with Cluster(tmp_path_factory.mktemp("hardening")) as c:
        yield c.server()


def _raw_request(server: ServerProc, head: str, body: bytes, timeout: float = 5.0) -> str:
    """Send a request head and (part of) a body over a plain socket; return what the
    server answers within `timeout` (the head and whatever body came with it)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(head.encode() + body)
        s.settimeout(timeout)
        got = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            got += chunk
            if b"\r\n\r\n" in got:
                head_part, _, rest = got.partition(b"\r\n\r\n")
                length = [
                    int(line.split(b":", 1)[1])
                    for line in head_part.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                if length and len(rest) >= length[0]:
                    break
        return got.decode(errors="replace")


def _json_tail(raw: str) -> dict:
    return json.loads(raw.partition("\r\n\r\n")[2])


def test_anonymous_large_post_gets_401_before_its_body_is_read(server: ServerProc):
    rss_before = psutil.Process(server.pid).memory_info().rss
    declared = 20 * MiB
    head = (
        "POST /api/v1/agents/heartbeat HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    # only the first 64 KiB of the declared 20 MB are ever sent: a server that reads
    # the body before it authenticates waits for the rest and answers nothing
    raw = _raw_request(server, head, b"[" * 65536)
    assert raw.startswith("HTTP/1.1 401"), raw[:300] or "no answer within 5 s"
    assert _json_tail(raw)["error"]["code"] == "unauthorized"
    # a forged token is no better than none
    raw = _raw_request(
        server,
        head.replace("\r\n\r\n", "\r\nAuthorization: Bearer adm_forged\r\n\r\n"),
        b"[" * 65536,
    )
    assert raw.startswith("HTTP/1.1 401"), raw[:300] or "no answer within 5 s"
    # and an attempt route with an attempt token that was never issued
    raw = _raw_request(
        server,
        head.replace("/api/v1/agents/heartbeat", "/api/v1/jobs/1/attempts/1/logs").replace(
            "\r\n\r\n", "\r\nX-Corral-Attempt-Token: " + "a" * 43 + "\r\n\r\n"
        ),
        b"[" * 65536,
    )
    assert raw.startswith("HTTP/1.1 401"), raw[:300] or "no answer within 5 s"
    assert psutil.Process(server.pid).memory_info().rss - rss_before < 10 * MiB
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


def test_authenticated_json_body_over_the_limit_gets_413(server: ServerProc):
    auth = {"Authorization": f"Bearer {server.admin_token}"}
    spec = {"command": ["true"], "env": {"BIG": "x" * (2 * MiB)}}
    data = json.dumps(spec).encode()
    r = httpx.post(
        server.url + "/api/v1/jobs",
        content=data,
        headers={**auth, "Content-Type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 413, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "too_large"

    def chunks():  # no Content-Length: counted while it streams
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]

    r = httpx.post(
        server.url + "/api/v1/jobs",
        content=chunks(),
        headers={**auth, "Content-Type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "too_large"
    # nothing was submitted by either
    jobs = httpx.get(server.url + "/api/v1/jobs", headers=auth, timeout=5).json()
    assert jobs == []


def test_integers_beyond_64_bits_get_422(server: ServerProc):
    auth = {"Authorization": f"Bearer {server.admin_token}"}
    huge = 2**70
    r = httpx.get(f"{server.url}/api/v1/jobs/{huge}", headers=auth, timeout=5)
    assert r.status_code == 422, r.text
    r = httpx.get(f"{server.url}/api/v1/jobs", params={"before": huge}, headers=auth, timeout=5)
    assert r.status_code == 422, r.text
    join = {"Authorization": f"Bearer {server.join_token}"}
    r = httpx.post(
        f"{server.url}/api/v1/agents/register",
        json={"name": "huge", "cpus": 1, "memory_mb": huge},
        headers=join,
        timeout=5,
    )
    assert r.status_code == 422, r.text
    # unauthenticated routes: the attempt routes (fenced by the attempt token)
    r = httpx.post(
        f"{server.url}/api/v1/jobs/{huge}/attempts/1/start",
        headers={"X-Corral-Attempt-Token": "a" * 43},
        timeout=5,
    )
    assert r.status_code == 422, r.text
    # an agent's heartbeat
    reg = httpx.post(
        f"{server.url}/api/v1/agents/register",
        json={"name": "bigint", "cpus": 1, "memory_mb": 512},
        headers=join,
        timeout=5,
    ).json()
    r = httpx.post(
        f"{server.url}/api/v1/agents/heartbeat",
        json={"instance_id": reg["instance_id"], "incarnation": huge},
        headers={"Authorization": f"Bearer {reg['credential']}"},
        timeout=5,
    )
    assert r.status_code == 422, r.text
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


def test_metrics_and_docs_need_a_token(server: ServerProc):
    auth = {"Authorization": f"Bearer {server.admin_token}"}
    for path in ("/metrics", "/docs"):
        r = httpx.get(server.url + path, timeout=5)
        assert r.status_code == 401, (path, r.status_code)
        assert r.json()["error"]["code"] == "unauthorized"
        assert httpx.get(server.url + path, headers=auth, timeout=5).status_code == 200
    agent_like = {"Authorization": f"Bearer {server.join_token}"}
    assert httpx.get(server.url + "/metrics", headers=agent_like, timeout=5).status_code == 403


def test_public_metrics_flag_opens_them(tmp_path: Path):
    with Cluster(tmp_path / "c") as c:
        server = c.server(extra=["--public-metrics"])
        for path in ("/metrics", "/docs"):
            assert httpx.get(server.url + path, timeout=5).status_code == 200, path


@pytest.mark.postgres
def test_database_errors_get_the_json_503(tmp_path: Path, pg_server_url: str):
    import asyncio
    import secrets

    from conftest import _admin, _with_db

    name = f"corral_test_{secrets.token_hex(6)}"
    asyncio.run(_admin(pg_server_url, f'CREATE DATABASE "{name}"'))
    try:
        with Cluster(tmp_path / "c") as c:
            server = c.server(db_url=_with_db(pg_server_url, name))
            auth = {"Authorization": f"Bearer {server.admin_token}"}
            assert httpx.get(server.url + "/api/v1/jobs", headers=auth, timeout=5).is_success
            asyncio.run(_admin(pg_server_url, f'DROP DATABASE "{name}" WITH (FORCE)'))
            for path in ("/api/v1/jobs", "/api/v1/instances", "/api/v1/events"):
                r = httpx.get(server.url + path, headers=auth, timeout=15)
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.headers["content-type"].startswith("application/json"), r.text
                assert r.json()["error"]["code"] == "database_unavailable"
            # a body sent while the database is down: its credential cannot be checked
            r = httpx.post(
                server.url + "/api/v1/jobs", json={"command": ["true"]}, headers=auth, timeout=15
            )
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "database_unavailable"
    finally:
        asyncio.run(_admin(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_a_request_framed_two_ways_is_refused(server: ServerProc):
    """Content-Length and Transfer-Encoding: chunked on one request (the ambiguity of
    request smuggling: a proxy in front may frame the body one way, the server the
    other) get 400 and a closed connection, and nothing reaches the routes."""
    auth = f"Authorization: Bearer {server.admin_token}\r\n"
    body = b'{"command": ["true"]}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    head = (
        "POST /api/v1/jobs HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\n"
        f"{auth}"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(chunked)}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    before = httpx.get(
        server.url + "/api/v1/jobs", headers={"Authorization": auth.split(": ", 1)[1].strip()}
    ).json()
    raw = _raw_request(server, head, chunked)
    assert raw.startswith("HTTP/1.1 400"), raw[:300] or "no answer within 5 s"
    after = httpx.get(
        server.url + "/api/v1/jobs", headers={"Authorization": auth.split(": ", 1)[1].strip()}
    ).json()
    assert len(after) == len(before)  # no job was submitted


def test_a_database_password_on_the_command_line_is_found():
    from corral.server.config import password_in_arguments

    url = "postgresql://corral:pw-123@db.internal:5432/corral"
    assert password_in_arguments(url, ["server", "--db", url])
    assert password_in_arguments(url, [f"--db={url}"])
    assert not password_in_arguments(url, ["server"])  # from CORRAL_DB: not on it
    assert not password_in_arguments("postgresql://corral@db/corral", ["--db", "x"])
    assert not password_in_arguments("sqlite:////var/lib/corral.db", ["--db", "sqlite:///x"])


@pytest.mark.postgres
def test_a_server_given_its_database_password_on_the_command_line_warns(
    tmp_path: Path, pg_url: str
):
    """Every process on the host (a job's too) reads a command line in /proc."""
    secret = "pw-" + os.urandom(6).hex()  # trust authentication accepts any password
    url = pg_url.replace("postgresql://postgres@", f"postgresql://postgres:{secret}@", 1)
    assert secret in url
    with Cluster(tmp_path / "c") as c:
        server = c.server(db_url=url)
        log = server.log()
    assert "the database password is on this server's command line" in log, log
    assert secret not in log  # the URL it shows hides the password
