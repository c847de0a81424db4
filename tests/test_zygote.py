"""The zygote: runners forked by a long-lived parent per agent. An attempt it starts
runs and records its result like a spawned one; without it, runners are spawned;
agent and zygote can both die under running attempts without losing or doubling one."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import textwrap
from pathlib import Path

import psutil
import pytest

from corral.agent.proctree import same_process
from corral.agent.runner import EXIT_STALE
from corral.agent.zygote import (
    PID_NAME,
    RUNNER_EXITS,
    SOCKET_NAME,
    Zygote,
    ZygoteClient,
    ZygoteUnavailable,
)
from corral.testing import Cluster, job_python, wait_for

# The job: record that it started (attempt, pid, parent), wait for the gate, record
# that it finished, exit 0.
JOB = textwrap.dedent("""
    import os, sys, time
    d, name = sys.argv[1], sys.argv[2]
    n = os.environ["CORRAL_ATTEMPT"]
    with open(os.path.join(d, name + ".runs"), "a") as f:
        f.write(f"start {n} {os.getpid()} {os.getppid()}\\n")
    while not os.path.exists(os.path.join(d, "gate")):
        time.sleep(0.05)
    with open(os.path.join(d, name + ".runs"), "a") as f:
        f.write(f"done {n}\\n")
    print(f"{name} done", flush=True)
""")


def _zygote(agent) -> psutil.Process | None:
    try:
        info = json.loads((agent.data_dir / PID_NAME).read_text())
    except (OSError, ValueError):
        return None
    return same_process(info["pid"], info["create_time"])


def _runner_pid(agent, job_id: int, n: int = 1) -> int:
    info = json.loads((agent.data_dir / "attempts" / f"{job_id}-{n}" / "runner.pid").read_text())
    return int(info["pid"])


def _runner(agent, job_id: int, n: int = 1) -> psutil.Process:
    return psutil.Process(_runner_pid(agent, job_id, n))


def _dead(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _runs(work: Path, name: str) -> list[list[str]]:
    f = work / f"{name}.runs"
    return [line.split() for line in f.read_text().splitlines()] if f.exists() else []


@pytest.fixture
def work(jobfiles: Path) -> Path:
    (jobfiles / "job.py").write_text(JOB)
    w = jobfiles / "work"
    w.mkdir()
    w.chmod(0o777)  # the job (its own user, under a root agent) writes here
    return w


def _submit(client, jobfiles: Path, work: Path, name: str, **options):
    return client.submit([job_python(), str(jobfiles / "job.py"), str(work), name], **options)


@pytest.mark.e2e
def test_an_attempt_forked_by_the_zygote_runs_and_records_its_result(
    cluster: Cluster, jobfiles: Path, work: Path
):
    server = cluster.server()
    agent = cluster.agent(server, name="a1")
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1)
    zygote = wait_for(lambda: _zygote(agent), 30, "the agent's zygote")
    job = _submit(client, jobfiles, work, "j1")
    started = wait_for(lambda: _runs(work, "j1"), 30, "the job to start")
    n = started[0][1]
    # the runner is the zygote's child, in a session of its own
    runner = _runner(agent, job.id)
    assert runner.ppid() == zygote.pid
    assert os.getsid(runner.pid) == runner.pid != os.getsid(zygote.pid)
    (work / "gate").touch()
    final = wait_for(
        lambda: (j := client.job(job.id)).state in ("succeeded", "failed") and j, 30, "the result"
    )
    assert (final.state, final.exit_code, final.attempt, n) == ("succeeded", 0, 1, "1")
    out = b"".join(base64.b64decode(c.data) for c in client.logs(job.id).chunks)
    assert b"j1 done" in out
    assert "forked runner for attempt" in agent.log()

    # an agent restart re-attaches to the same zygote, which forks the next runners
    agent.kill()
    agent.start()
    cluster.wait_agents_running(client, 1)
    wait_for(lambda: f"attached to zygote {zygote.pid}" in agent.log(), 30, "re-attaching")
    job2 = _submit(client, jobfiles, work, "j2")
    final2 = wait_for(
        lambda: (j := client.job(job2.id)).state in ("succeeded", "failed") and j, 30, "job 2"
    )
    assert (final2.state, final2.attempt) == ("succeeded", 1)
    restarted_log = agent.log().split(f"attached to zygote {zygote.pid}", 1)[1]
    assert f"forked runner for attempt {job2.id}/1" in restarted_log
    assert _zygote(agent) is not None and _zygote(agent).pid == zygote.pid
    # the zygote's own log does not grow by a line per attempt
    zlog = (agent.data_dir / "zygote.log").read_text()
    assert "forked runner" not in zlog and "exited" not in zlog, zlog
    assert RUNNER_EXITS == (0, EXIT_STALE)


@pytest.mark.e2e
def test_without_its_zygote_the_agent_spawns_runners_and_loses_nothing(
    cluster: Cluster, jobfiles: Path, work: Path
):
    server = cluster.server()
    agent = cluster.agent(server, name="a1")
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1)
    zygote = wait_for(lambda: _zygote(agent), 30, "the agent's zygote")
    zygote.kill()  # SIGKILL: its socket file stays behind, nothing answers on it
    wait_for(lambda: _dead(zygote), 10, "the zygote to die")
    assert (agent.data_dir / SOCKET_NAME).exists()
    (work / "gate").touch()
    jobs = [_submit(client, jobfiles, work, f"j{i}", cpus=0.5) for i in range(3)]
    for job in jobs:
        final = wait_for(
            lambda job=job: (j := client.job(job.id)).state in ("succeeded", "failed") and j,
            60,
            f"job {job.id}",
        )
        assert (final.state, final.exit_code, final.attempt) == ("succeeded", 0, 1)
    assert "spawning the runner of" in agent.log()


@pytest.mark.e2e
def test_agent_then_zygote_sigkilled_under_running_attempts(
    cluster: Cluster, jobfiles: Path, work: Path
):
    """SIGKILL the agent, then its zygote, while attempts run: the runners go on
    (their own sessions), the restarted agent adopts them, every job ends with one
    recorded result (or a reason), no command runs twice, nothing is left behind."""
    # a grace long enough for the agent to come back under any load: then every
    # attempt must be adopted, none requeued
    server = cluster.server(extra=["--agent-grace", "60"])
    agent = cluster.agent(server, name="a1", cpus=4)
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1)
    zygote = wait_for(lambda: _zygote(agent), 30, "the agent's zygote")
    names = [f"j{i}" for i in range(4)]
    jobs = {name: _submit(client, jobfiles, work, name, cpus=1) for name in names}
    wait_for(lambda: all(_runs(work, n) for n in names), 60, "every job to start")
    runners = [_runner(agent, job.id) for job in jobs.values()]
    assert all(r.ppid() == zygote.pid for r in runners)

    agent.kill()
    zygote.kill()
    wait_for(lambda: _dead(zygote), 10, "the zygote to die")
    # the runners (and their commands) outlive both
    assert not any(_dead(r) for r in runners)
    agent.start()
    cluster.wait_agents_running(client, 1)
    new_zygote = wait_for(lambda: _zygote(agent), 30, "a new zygote")
    assert new_zygote.pid != zygote.pid
    assert agent.log().count("adopted attempt") == len(names)
    (work / "gate").touch()

    finals = {
        name: wait_for(
            lambda job=job: (j := client.job(job.id)).state in ("succeeded", "failed") and j,
            90,
            f"job {name} to end",
        )
        for name, job in jobs.items()
    }
    for name, final in finals.items():
        runs = _runs(work, name)
        where = f"{name}: {final} {runs}"
        # one result, recorded once, from the attempt that ran to the end
        assert final.result_attempt == final.attempt, where
        if final.state == "succeeded":
            assert final.exit_code == 0, where
        else:
            assert final.reason, where
        # never two attempts' commands at once, and at most one ran to its end
        done = [r for r in runs if r[0] == "done"]
        assert len(done) <= 1, where
        if final.state == "succeeded":
            assert done == [["done", str(final.attempt)]], where
        for r in runs:
            if r[0] == "start" and r[1] != str(final.attempt):
                # an earlier attempt was given up: its command was killed, not finished
                assert ["done", r[1]] not in runs, where
    # every attempt was adopted: each job succeeded with its first attempt
    outcome = {n: (f.state, f.attempt) for n, f in finals.items()}
    assert outcome == dict.fromkeys(names, ("succeeded", 1))
    # no runner or command outlives its attempt (the new zygote is the agent's)
    wait_for(lambda: not cluster.leftovers(), 30, "no runner or command left behind")
    assert all(_dead(r) for r in runners)


# -- the zygote in-process: what it refuses ----------------------------------------------------


def test_the_zygote_only_forks_for_private_attempt_dirs_of_its_agent(tmp_path: Path):
    data = tmp_path / "d"
    (data / "attempts").mkdir(parents=True, mode=0o700)
    z = Zygote(data)
    ok = data / "attempts" / "1-1"
    ok.mkdir(mode=0o700)
    (ok / "spec.json").write_text("{}")
    assert z._attempt_dir(str(ok)) == ok
    elsewhere = tmp_path / "1-1"
    elsewhere.mkdir(mode=0o700)
    (elsewhere / "spec.json").write_text("{}")
    link = data / "attempts" / "2-1"
    link.symlink_to(elsewhere)
    shared = data / "attempts" / "3-1"
    shared.mkdir()
    shared.chmod(0o755)
    (shared / "spec.json").write_text("{}")
    nospec = data / "attempts" / "4-1"
    nospec.mkdir(mode=0o700)
    for bad in (elsewhere, link, shared, nospec, data / "attempts" / "5-1"):
        with pytest.raises((ValueError, OSError)):
            z._attempt_dir(str(bad))
    with pytest.raises(ValueError):
        z._attempt_dir(None)


def test_a_stale_socket_is_unavailable_not_a_hang(tmp_path: Path):
    """A zygote killed outright leaves its socket file; the client says so at once."""
    data = tmp_path / ("x" * 120)  # past sun_path: reached through /proc/self/fd
    data.mkdir()
    client = ZygoteClient(data, timeout=2)
    with pytest.raises(ZygoteUnavailable):
        client.ping()  # no socket at all
    z = Zygote(data)
    listener = z.bind()
    assert (data / SOCKET_NAME).stat().st_mode & 0o777 == 0o600
    listener.close()  # as if the zygote died: the file stays, nothing listens
    assert (data / SOCKET_NAME).exists()
    with pytest.raises(ZygoteUnavailable, match="refused"):
        client.ping()


def test_a_runners_crash_is_kept_in_the_agents_runners_log(tmp_path: Path):
    """What a runner prints (its traceback when it crashes) goes to the agent's
    runners.log, which outlives the attempt's directory: the attempt creates no file
    of its own for it."""
    from corral.agent.zygote import RUNNERS_LOG

    data = tmp_path / "d"
    (data / "attempts").mkdir(parents=True, mode=0o700)
    attempt = data / "attempts" / "9-1"
    attempt.mkdir(mode=0o700)
    (attempt / "spec.json").write_text("{}")  # no job: the runner fails at once
    with _zygote_process(data) as (client, _zygote):
        pid = client.start(attempt)
        wait_for(lambda: not psutil.pid_exists(pid) or _dead(psutil.Process(pid)), 30, "the runner")
        log = data / RUNNERS_LOG
        wait_for(lambda: "Traceback" in log.read_text(), 10, "the traceback in runners.log")
        assert "runner of attempt 9-1 crashed:" in log.read_text()
        assert sorted(p.name for p in attempt.iterdir()) == ["runner.pid", "spec.json"]
        assert log.stat().st_mode & 0o777 == 0o600


def _pings(client: ZygoteClient) -> bool:
    try:
        client.ping()
        return True
    except ZygoteUnavailable:
        return False


def test_the_zygote_hands_an_attempt_to_a_spare_forked_ahead(tmp_path: Path):
    """The zygote keeps one runner forked ahead (its own session, waiting on a pipe):
    a start request hands it the attempt, and a new spare follows. When the zygote
    dies its spare exits instead of lingering; a spare killed while waiting costs
    nothing (the next attempt gets a child forked then)."""
    from corral.agent.zygote import spares

    data = tmp_path / "d"
    (data / "attempts").mkdir(parents=True, mode=0o700)
    dirs = []
    for k in range(2):
        d = data / "attempts" / f"{k + 1}-1"
        d.mkdir(mode=0o700)
        (d / "spec.json").write_text("{}")  # no job: each runner fails at once
        dirs.append(d)

    with _zygote_process(data) as (client, zygote):
        first = wait_for(lambda: spares(zygote), 30, "a spare")[0]
        assert os.getsid(first.pid) == first.pid  # its own session, as a runner's
        assert client.start(dirs[0]) == first.pid
        second = wait_for(
            lambda: [s for s in spares(zygote) if s.pid != first.pid], 30, "the next spare"
        )[0]
        zygote.kill()
        wait_for(lambda: _dead(second), 10, "the spare to exit with its zygote")

    with _zygote_process(data) as (client, zygote):
        spare = wait_for(lambda: spares(zygote), 30, "a spare")[0]
        spare.kill()  # it dies waiting
        wait_for(lambda: not spares(zygote), 10, "the killed spare to be collected")
        pid = client.start(dirs[1])  # forked then
        assert pid != spare.pid
        assert json.loads((dirs[1] / "runner.pid").read_text())["pid"] == pid
    # both attempts' runners ran (no job: each crashed, and said so)
    log = data / "runners.log"
    wait_for(lambda: log.read_text().count("crashed:") == 2, 30, "both runners' ends")


@contextlib.contextmanager
def _zygote_process(data: Path):
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.agent.zygote", str(data)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = ZygoteClient(data, timeout=5)
        wait_for(lambda: _pings(client), 30, "the zygote to listen")
        yield client, psutil.Process(proc.pid)
    finally:
        proc.kill()
        proc.wait(timeout=10)
