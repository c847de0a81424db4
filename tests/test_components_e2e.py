"""Components end to end: real servers of two different builds on one PostgreSQL
behind a round-robin proxy, a real agent, and an artifact server on loopback that
counts every request and byte."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import httpx
import pytest

from corral.testing import ArtifactServer, Cluster, Proxy, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

OBSERVE = float(os.environ.get("CORRAL_E2E_OBSERVE", "45"))
EXCHANGES = 10  # heartbeat exchanges per server watched for a new order that must not come


def runner_artifact(version: str, ran: Path | None = None) -> bytes:
    """A real runner component: a wrapper that notes each attempt it runs (in `ran`;
    a job's environment is built from scratch, so it cannot carry the mark) and runs
    corral's runner."""
    note = f'[ "$1" = --self-test ] || echo {version} >> {ran}\n' if ran else ""
    return (
        f"#!/bin/sh\n# corral runner {version}\n{note}"
        f'exec {sys.executable} -m corral.agent.runner "$@"\n'
    ).encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def status_of(client, name: str = "runner"):
    rows = [r for r in client.component_status() if r.component == name]
    return rows[0] if rows else None


def test_two_builds_converge_once_and_then_stay_quiet(pg_url: str, tmp_path: Path):
    ran = tmp_path / "runner-builds-that-ran"
    v1, v2 = runner_artifact("1.0.0", ran), runner_artifact("1.1.0", ran)
    with ArtifactServer() as art, Cluster(tmp_path / "c") as c:
        s1 = c.server(db_url=pg_url, name="s1", env={"CORRAL_BUILD_VERSION": "0.20.18"})
        s2 = c.server(db_url=pg_url, name="s2", env={"CORRAL_BUILD_VERSION": "0.20.23"})
        with Proxy([s1.url, s2.url]) as lb:
            c.agent(lb.url, name="a1", join_token=s1.join_token)
            client = c.client(s1)
            c.wait_agents_running(client, 1)

            # servers of different builds are detected and reported
            warn = wait_for(
                lambda: [
                    e for e in client.events(level="warning") if e.kind == "servers.mixed_builds"
                ],
                30,
                "the mixed-builds warning",
            )
            assert "0.20.18" in warn[0].message and "0.20.23" in warn[0].message
            health = httpx.get(s2.url + "/health").json()
            flag = [f for f in health["flags"] if f["flag"] == "mixed_server_builds"]
            assert flag and flag[0]["builds"] == ["0.20.18", "0.20.23"]

            url1 = art.put("/runner/1.0.0", v1)
            client.publish("runner", "1.0.0", url1, sha(v1), len(v1))
            client.rollout("runner", "1.0.0")
            wait_for(
                lambda: (s := status_of(client)) and s.state == "converged",
                60,
                "the agent to converge on runner 1.0.0",
            )
            assert art.requests() == 1 and art.body_bytes() == len(v1)

            # both servers answer the agent in turn; neither orders anything more
            # (observed over a number of exchanges with each server, not a wall-clock
            # window, so a loaded machine observes as much as an idle one)
            orders, hits = status_of(client).orders_total, list(lb.counts)
            wait_for(
                lambda: min(b - a for a, b in zip(hits, lb.counts, strict=True)) >= EXCHANGES,
                OBSERVE * 4,
                f"{EXCHANGES} exchanges with each server",
            )
            assert art.requests() == 1 and art.body_bytes() == len(v1)
            assert status_of(client).orders_total == orders == 1
            assert status_of(client).observed_version == "1.0.0"

            # jobs now run on the installed runner component
            job = client.submit(["sh", "-c", "echo ran"])
            out = []
            page = client.follow(job.id, on_output=lambda s, d: out.append(d))
            assert page.job_state == "succeeded" and b"".join(out) == b"ran\n"
            assert ran.read_text() == "1.0.0\n"

            # a new version is downloaded exactly once
            url2 = art.put("/runner/1.1.0", v2)
            client.publish("runner", "1.1.0", url2, sha(v2), len(v2))
            client.rollout("runner", "1.1.0")
            wait_for(
                lambda: status_of(client).observed_version == "1.1.0",
                60,
                "the agent to converge on runner 1.1.0",
            )
            assert art.body_bytes() == len(v1) + len(v2) and art.requests() == 2


def test_an_install_that_never_lands_is_capped_warned_and_flagged(pg_url: str, tmp_path: Path):
    data = runner_artifact("2.0.0")
    with ArtifactServer() as art, Cluster(tmp_path / "c") as c:
        s1 = c.server(db_url=pg_url, extra=["--install-backoff", "1", "--install-cap", "3"])
        c.agent(s1, name="a1")
        client = c.client(s1)
        c.wait_agents_running(client, 1)
        url = art.put("/runner/2.0.0", data, mode="403")  # an error page, every time
        client.publish("runner", "2.0.0", url, sha(data), len(data))
        client.rollout("runner", "2.0.0")
        failed = wait_for(
            lambda: (s := status_of(client)) and s.state == "install_failed" and s,
            60,
            "the install to be given up",
        )
        assert failed.orders_total == 3 and "HTTP 403" in (failed.last_error or "")
        events = [e for e in client.events(level="warning") if e.kind == "component.install_failed"]
        assert len(events) == 1 and "HTTP 403" in events[0].message
        health = client.health()
        assert health["status"] == "degraded"
        assert any(f["flag"] == "install_failed" for f in health["flags"])
        time.sleep(5)  # no more orders, however long we wait
        assert status_of(client).orders_total == 3 and art.requests() == 3
        assert art.body_bytes() == 3 * len(b"<html><body>403 Forbidden</body></html>\n")
        # the agent installed nothing: no runner component on disk
        assert not (c.agents[0].data_dir / "components" / "runner" / "current.json").exists()
