"""One agent per data dir: a second process on a data dir in use refuses to start and
names the PID holding it; a process the server says is superseded exits without
killing jobs or writing a tombstone (real server, agents and jobs on loopback)."""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil
import pytest

from corral.domain.instances import AGENT_EXIT_SUPERSEDED, TOMBSTONE_FILE
from corral.testing import Cluster, wait_for

pytestmark = pytest.mark.e2e


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _running_job(client, jobfiles: Path) -> tuple[int, int]:
    """A job that writes its PID and sleeps; returns (job id, pid)."""
    pid_file = jobfiles / "pid"
    job = client.submit(
        ["sh", "-c", f"echo $$ > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; exec sleep 60"]
    )
    wait_for(pid_file.exists, 60, "the job to start")
    return job.id, int(pid_file.read_text())


def test_a_second_agent_on_a_data_dir_in_use_refuses_and_names_the_pid(
    cluster: Cluster, jobfiles: Path
):
    server = cluster.server()
    first = cluster.agent(server, name="w1")
    client = cluster.client(server)
    (inst,) = cluster.wait_agents_running(client, 1)
    job_id, pid = _running_job(client, jobfiles)
    second = cluster.agent(server, name="w1", data_dir=first.data_dir)
    code = second.process.wait(timeout=60)
    assert code == 2, second.log()
    assert f"in use by another agent (pid {first.pid})" in second.log()
    # the live agent, its instance and its job are untouched
    assert first.alive() and _alive(pid)
    assert not (first.data_dir / TOMBSTONE_FILE).exists()
    (now,) = [i for i in client.instances() if i.id == inst.id]
    assert now.state == "running" and now.incarnation == inst.incarnation
    assert client.job(job_id).state == "running"


def test_a_superseded_agent_exits_without_killing_jobs_or_a_tombstone(
    cluster: Cluster, jobfiles: Path
):
    server = cluster.server()
    first = cluster.agent(server, name="w1")
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1)
    _job_id, pid = _running_job(client, jobfiles)
    # another process with this instance's identity (e.g. a copied data dir) registers
    # and so becomes the live incarnation
    other_dir = cluster.base / "agents" / "copy"
    other_dir.mkdir(parents=True)
    shutil.copy(first.data_dir / "identity.json", other_dir / "identity.json")
    cluster.agent(server, name="w1-copy", data_dir=other_dir)
    code = first.process.wait(timeout=60)
    assert code == AGENT_EXIT_SUPERSEDED, first.log()
    assert "superseded" in first.log()
    assert not (first.data_dir / TOMBSTONE_FILE).exists()
    assert _alive(pid)  # its job was not killed on the way out
