"""Agent self-update with real processes: the agent re-executes into a new build
without stopping its jobs, and a build that never heartbeats is rolled back."""

from __future__ import annotations

import hashlib
import sys
import threading
from pathlib import Path

import pytest

from corral.testing import AgentProc, ArtifactServer, Cluster, wait_for

pytestmark = pytest.mark.e2e


def good_build(version: str) -> bytes:
    return (
        f'#!/bin/sh\n# corral agent {version}\nexec {sys.executable} -m corral agent "$@"\n'
    ).encode()


HANGING_BUILD = (
    b'#!/bin/sh\nif [ "$1" = "--self-test" ]; then echo \'corral-agent ok\'; '
    b"exit 0; fi\nexec sleep 3600\n"
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Supervisor:
    """What systemd or the local backend does: restart the agent's base command if it
    dies, unless it exited as retired."""

    def __init__(self, agent: AgentProc):
        self.agent = agent
        self.restarts = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.2):
            if not self.agent.alive() and self.agent.popen.returncode != 3:
                self.restarts += 1
                self.agent.start()

    def __enter__(self) -> Supervisor:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def agent_status(client):
    rows = [r for r in client.component_status() if r.component == "agent"]
    return rows[0] if rows else None


def test_agent_switches_builds_and_its_jobs_keep_running(cluster: Cluster, jobfiles: Path):
    server = cluster.server()
    agent = cluster.agent(server, name="a1")
    client = cluster.client(server)
    (before,) = cluster.wait_agents_running(client, 1)
    gate = jobfiles / "gate"
    job = client.submit(["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.1; done; echo survived"])
    wait_for(lambda: client.job(job.id).state == "running", 30, "the job to run")
    pid = agent.pid
    build = good_build("2.0.0")
    with ArtifactServer() as art:
        client.publish("agent", "2.0.0", art.put("/agent-2.0.0", build), sha(build), len(build))
        client.rollout("agent", "2.0.0")
        wait_for(
            lambda: (s := agent_status(client)) and s.state == "converged",
            60,
            "the agent to switch to 2.0.0",
        )
        inst = wait_for(
            lambda: (i := client.instances()[0]).agent_version == "2.0.0" and i,
            30,
            "the new build to register",
        )
    assert agent.pid == pid and agent.alive()  # re-executed in place, never restarted
    assert inst.incarnation == before.incarnation + 1 and inst.state == "running"
    assert client.job(job.id).state == "running"
    gate.touch()
    final = wait_for(
        lambda: (j := client.job(job.id)).state == "succeeded" and j,
        30,
        "the job started before the switch to finish",
    )
    assert final.attempt == 1  # never requeued
    trial = agent.data_dir / "components" / "agent" / "trial.json"
    wait_for(
        lambda: '"state": "committed"' in trial.read_text(),
        30,
        "the new build to commit after its first heartbeat",
    )


def test_a_build_that_never_heartbeats_is_rolled_back(cluster: Cluster, jobfiles: Path):
    server = cluster.server(extra=["--install-backoff", "2", "--install-cap", "2"])
    agent = cluster.agent(server, name="a1", extra=["--switch-timeout", "6"])
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1)
    gate = jobfiles / "gate"
    job = client.submit(["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.1; done; echo ok"])
    wait_for(lambda: client.job(job.id).state == "running", 30, "the job to run")
    with ArtifactServer() as art, Supervisor(agent) as sup:
        url = art.put("/agent-3.0.0", HANGING_BUILD)
        client.publish("agent", "3.0.0", url, sha(HANGING_BUILD), len(HANGING_BUILD))
        client.rollout("agent", "3.0.0")
        failed = wait_for(
            lambda: (s := agent_status(client)) and s.state == "install_failed" and s,
            120,
            "the bad build to be given up",
        )
        assert failed.orders_total == 2
        assert "rolled back" in (failed.last_error or "")
        assert art.requests() == 1  # the second try came from the cache
        assert sup.restarts == 2  # the watchdog killed each trial; the base came back
        wait_for(
            lambda: (
                (i := client.instances()[0]).state == "running"
                and not i.lost
                and i.agent_version != "3.0.0"
            ),
            30,
            "the base build to be back",
        )
    warnings = [e.kind for e in client.events(level="warning")]
    assert "component.install_failed" in warnings
    gate.touch()
    final = wait_for(
        lambda: (j := client.job(job.id)).state in ("succeeded", "failed") and j,
        60,
        "the job to finish",
    )
    assert final.state == "succeeded"
