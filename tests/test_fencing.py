"""Fenced dispatch with real processes: a revoked attempt can never change the job,
its processes are killed, and the next attempt's result is the one recorded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import psutil
import pytest

from corral.testing import Cluster, job_python, wait_for

pytestmark = pytest.mark.e2e

# The job: announce the attempt, record its pid, wait for its own gate, exit 40+N.
JOB = textwrap.dedent("""
    import os, sys, time
    n = os.environ["CORRAL_ATTEMPT"]
    d = sys.argv[1]
    print(f"attempt {n}", flush=True)
    with open(os.path.join(d, f"pids-{n}"), "a") as f:
        f.write(f"{os.getpid()}\\n")
    while not os.path.exists(os.path.join(d, f"gate-{n}")):
        time.sleep(0.05)
    print(f"attempt {n} done", flush=True)
    sys.exit(40 + int(n))
""")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _pids(d: Path, n: int) -> list[int]:
    f = d / f"pids-{n}"
    return [int(x) for x in f.read_text().split()] if f.exists() else []


def _attempt_dir(agent, job_id: int, n: int) -> Path:
    return agent.data_dir / "attempts" / f"{job_id}-{n}"


@pytest.fixture
def one_agent(cluster: Cluster, db_url: str, jobfiles: Path):
    server = cluster.server(db_url=db_url)
    agent = cluster.agent(server, name="a1")
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1)
    script = jobfiles / "job.py"
    script.write_text(JOB)
    work = jobfiles / "work"
    work.mkdir(mode=0o777)
    work.chmod(0o777)  # the job (its own user, under a root agent) writes here
    return server, agent, client, script, work


def _finish_with(server, job_id: int, n: int, token: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/v1/jobs/{job_id}/attempts/{n}/finish",
        json={"exit_code": 0},
        headers={"X-Corral-Attempt-Token": token},
    )


def test_requeued_attempt_is_fenced_killed_and_superseded(one_agent):
    server, agent, client, script, work = one_agent
    job = client.submit([job_python(), str(script), str(work)])
    wait_for(lambda: _pids(work, 1), 30, "attempt 1 to start")
    (pid1,) = _pids(work, 1)
    token1 = json.loads((_attempt_dir(agent, job.id, 1) / "spec.json").read_text())["token"]

    client.requeue(job.id)  # revoke attempt 1 while it still runs; lock attempt 2
    r = _finish_with(server, job.id, 1, token1)
    assert r.status_code == 409 and r.json()["error"]["code"] == "stale_token"
    assert "stale" in r.json()["error"]["message"]

    wait_for(lambda: not _alive(pid1), 30, "attempt 1's process to be killed")
    wait_for(lambda: _pids(work, 2), 30, "attempt 2 to start")
    (work / "gate-2").touch()
    final = wait_for(
        lambda: (j := client.job(job.id)).state == "failed" and j, 30, "attempt 2 to finish"
    )
    assert (final.exit_code, final.result_attempt, final.attempt) == (42, 2, 2)
    states = {a.number: (a.state, a.exit_code) for a in final.attempts}
    assert states == {1: ("revoked", None), 2: ("failed", 42)}
    out = []
    client.follow(job.id, on_output=lambda s, d: out.append(d))
    assert b"".join(out) == b"attempt 2\nattempt 2 done\n"
    # attempt 1's output was fenced too: it never reported "done"
    old = client.logs(job.id, attempt=1)
    assert b"done" not in b"".join(__import__("base64").b64decode(c.data) for c in old.chunks)


def test_stale_runner_cannot_record_even_if_its_agent_is_frozen(one_agent):
    """The agent cannot kill the stale attempt (it is stopped); the stale runner's
    own finish is refused (409), it records nothing, and kills its leftovers."""
    _server, agent, client, script, work = one_agent
    job = client.submit([job_python(), str(script), str(work)])
    wait_for(lambda: _pids(work, 1), 30, "attempt 1 to start")
    attempt1 = _attempt_dir(agent, job.id, 1)
    agent.signal(signal.SIGSTOP)
    try:
        client.requeue(job.id)
        wait_for(lambda: client.job(job.id).attempt == 2, 30, "attempt 2 to be locked")
        (work / "gate-1").touch()  # attempt 1's command finishes, its runner reports
        done = wait_for(
            lambda: (
                (attempt1 / "done.json").exists()
                and json.loads((attempt1 / "done.json").read_text())
            ),
            30,
            "the stale runner to give up",
        )
        assert done["status"] == "stale"
        j = client.job(job.id)
        assert (j.state, j.exit_code, j.result_attempt) == ("locked", None, None)
        assert j.attempts[0].exit_code is None and j.attempts[0].state == "revoked"
    finally:
        agent.signal(signal.SIGCONT)
    wait_for(lambda: _pids(work, 2), 30, "attempt 2 to start once the agent is back")
    (work / "gate-2").touch()
    final = wait_for(
        lambda: (j := client.job(job.id)).state == "failed" and j, 30, "attempt 2 to finish"
    )
    assert (final.exit_code, final.result_attempt) == (42, 2)


def test_job_lock_keeps_a_second_runner_of_the_same_job_out(one_agent):
    """Even if the agent is confused and starts a second runner for a job this
    instance already runs, the per-job lock file keeps its command from running."""
    _server, agent, client, script, work = one_agent
    job = client.submit([job_python(), str(script), str(work)])
    wait_for(lambda: _pids(work, 1), 30, "attempt 1 to start")
    original = _attempt_dir(agent, job.id, 1)
    clone = agent.data_dir / "attempts-clone" / f"{job.id}-1"
    clone.mkdir(parents=True)
    spec = json.loads((original / "spec.json").read_text())
    spec["lock_wait"] = 2.0
    (clone / "spec.json").write_text(json.dumps(spec))
    r = subprocess.run(
        [sys.executable, "-m", "corral.agent.runner", str(clone)],
        timeout=60,
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    assert json.loads((clone / "done.json").read_text())["status"] == "lock_timeout"
    assert len(_pids(work, 1)) == 1  # the command ran once
    assert client.job(job.id).state == "running"  # and the real attempt is untouched
    shutil.rmtree(clone.parent)
    (work / "gate-1").touch()
    final = wait_for(
        lambda: (j := client.job(job.id)).state == "failed" and j, 30, "attempt 1 to finish"
    )
    assert (final.exit_code, final.result_attempt) == (41, 1)


def test_lost_instance_requeues_and_the_old_runner_is_killed_when_it_returns(
    cluster: Cluster, one_agent
):
    """An agent silent past the grace period loses its attempts (requeue is an event);
    when it comes back, it is told to kill the stale attempt."""
    server, a1, client, script, work = one_agent
    job = client.submit([job_python(), str(script), str(work)])
    wait_for(lambda: _pids(work, 1), 30, "attempt 1 to start")
    (pid1,) = _pids(work, 1)
    a1.signal(signal.SIGSTOP)  # heartbeats stop; the runner keeps running
    a2 = cluster.agent(server, name="a2")
    try:
        wait_for(lambda: client.job(job.id).attempt == 2, 40, "the requeue after the grace")
        events = client.events(level="warning", job=job.id)
        assert any(e.kind == "job.requeued" for e in events)
        assert any(e.kind == "instance.lost" for e in client.events(level="warning"))
        wait_for(lambda: _pids(work, 2), 30, "attempt 2 to start on a2")
        # the stale runner fences itself on its next call even before a1 returns
        wait_for(lambda: not _alive(pid1), 30, "attempt 1's process to be killed")
    finally:
        a1.signal(signal.SIGCONT)
    (work / "gate-2").touch()
    final = wait_for(
        lambda: (j := client.job(job.id)).state == "failed" and j, 30, "attempt 2 to finish"
    )
    assert (final.exit_code, final.result_attempt) == (42, 2)
    assert final.attempts[0].state == "lost"
    assert a2.alive() and a1.alive()


def test_max_attempts_then_fail_with_the_reason(cluster: Cluster, tmp_path: Path):
    """Every attempt's runner is killed outright (SIGKILL): the agent reports each
    one lost, the job is retried up to max_attempts, then fails saying so."""
    server = cluster.server()
    agent = cluster.agent(server, name="a1")
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1)
    job = client.submit(["sleep", "300"], max_attempts=2)
    for n in (1, 2):
        pid_file = _attempt_dir(agent, job.id, n) / "runner.pid"
        wait_for(
            lambda pid_file=pid_file: client.job(job.id).state == "running" and pid_file.exists(),
            30,
            f"attempt {n} to run",
        )
        os.kill(json.loads(pid_file.read_text())["pid"], signal.SIGKILL)
    final = wait_for(
        lambda: (j := client.job(job.id)).state == "failed" and j, 30, "the job to give up"
    )
    assert final.attempt == 2
    assert "gave up after 2 attempts (max_attempts=2)" in final.reason
    assert "runner exited unexpectedly" in final.reason
    assert [a.state for a in final.attempts] == ["lost", "lost"]
    # no `sleep 300` outlives its runner
    wait_for(lambda: not cluster.leftovers(), 20, "no processes left behind")
