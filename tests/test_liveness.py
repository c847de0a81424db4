"""Liveness: the grace after which a silent agent counts as lost is derived from the
heartbeat interval that agent was told, so no healthy agent is ever declared lost
between two heartbeats, at any fleet size; and a silent agent is still found. (How
fast is measured by benchmarks/agents.py, `detect_s`, not asserted here.)"""

from __future__ import annotations

import signal
import time

import pytest

from corral.domain.heartbeat import grace_period, heartbeat_interval
from corral.server.config import ServerConfig
from corral.testing import Cluster, job_python, wait_for
from tests.test_metrics import scrape

FLEETS = [1, 10, 100, 500, 1_000, 1_500, 2_000, 5_000, 10_000, 20_000]


@pytest.mark.parametrize("agents", FLEETS)
def test_grace_outlasts_the_told_interval_at_every_fleet_size(agents: int) -> None:
    """An agent touches its lease once per told interval (plus a round trip): the
    grace must cover two missed heartbeats beyond that, whatever the fleet size."""
    cfg = ServerConfig()
    interval = heartbeat_interval(
        agents, base=cfg.heartbeat_base, max_per_second=cfg.heartbeat_max_rate
    )
    grace = grace_period(interval, cfg.agent_grace)
    assert grace >= 3 * interval
    assert grace >= cfg.agent_grace


def test_small_fleets_keep_the_configured_grace() -> None:
    """Small fleets heartbeat every base interval; their grace is the configured one."""
    cfg = ServerConfig()
    interval = heartbeat_interval(10, base=cfg.heartbeat_base)
    assert grace_period(interval, cfg.agent_grace) == cfg.agent_grace


def test_a_long_told_interval_stretches_the_grace() -> None:
    assert grace_period(25.0, 3.0) == 76.0
    assert grace_period(1.0, 4.0) == 4.0


@pytest.mark.slow
def test_a_healthy_agent_told_a_long_interval_is_never_lost(cluster: Cluster) -> None:
    """`--heartbeat-interval 6` with `--agent-grace 3`: the agent is silent for about
    6 s between heartbeats while its job runs; it must not be declared lost, and the
    job must succeed on its first attempt."""
    server = cluster.server(extra=["--heartbeat-interval", "6", "--agent-grace", "3"])
    cluster.agent(server, name="slow-beat")
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1)
    job = client.submit([job_python(), "-c", "import time; time.sleep(14)"])
    deadline = time.monotonic() + 60
    while True:
        j = client.job(job.id)
        lost = [i.name for i in client.instances() if i.lost]
        assert not lost, f"healthy instance declared lost: {lost}"
        if j.state in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, f"job still {j.state} after 60 s"
        time.sleep(0.2)
    assert j.state == "succeeded", j
    assert j.attempt == 1, f"the job ran {j.attempt} attempts"
    assert not [e for e in client.events(level="warning") if e.kind == "instance.lost"]


def _stopped_until_lost(agent, client):
    """Stop the agent (SIGSTOP) until the server declares its instance lost; its one
    `instance.lost` event."""
    agent.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: any(i.lost for i in client.instances()), 60, "the silent agent to be lost")
    finally:
        agent.signal(signal.SIGCONT)
    (event,) = [e for e in client.events(level="warning") if e.kind == "instance.lost"]
    return event


@pytest.mark.slow
def test_a_silent_agent_is_declared_lost_and_the_event_names_its_interval(
    cluster: Cluster,
) -> None:
    server = cluster.server(extra=["--agent-grace", "5"])
    agent = cluster.agent(server, name="quiet")
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1, timeout=60)
    event = _stopped_until_lost(agent, client)
    assert "quiet" in event.message and "told to heartbeat every" in event.message


@pytest.mark.slow
def test_an_agent_told_to_renew_between_exchanges_is_kept_alive_and_found_by_its_lease(
    cluster: Cluster,
) -> None:
    """Exchanges every 20 s (as a fleet of 1,000 is told) and lease renewals every
    second: a job longer than the grace runs on its first attempt with no instance
    declared lost (the renewals kept it alive between exchanges); then the agent is
    stopped and is declared lost by the grace of its renewal interval."""
    server = cluster.server(
        extra=["--heartbeat-interval", "20", "--lease-interval", "1", "--agent-grace", "3"]
    )
    agent = cluster.agent(server, name="renewing")
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1, timeout=60)
    job = client.submit([job_python(), "-c", "import time; time.sleep(8)"])
    wait_for(
        lambda: client.job(job.id).state in ("succeeded", "failed", "cancelled"),
        90,
        "the job to finish",
    )
    j = client.job(job.id)
    assert j.state == "succeeded" and j.attempt == 1, j
    assert not [e for e in client.events(level="warning") if e.kind == "instance.lost"]

    event = _stopped_until_lost(agent, client)
    # judged by the grace of its renewal interval (1 s), not its exchanges' (20 s)
    assert "told to heartbeat every 1s" in event.message, event.message
    assert scrape(server)[("corral_lease_renewals_total", ())] >= 1
