"""The SDK and the CLI habits built on it, against a real server and agent:
`from corral import Client, AsyncClient`, run(wait=True), Job.wait/logs/outputs/download/
cancel; `corral logs --tail`, `corral drain --wait`, `corral undrain`; contexts, several
server URLs with failover, and a bad token's error naming where the token came from."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from corral.testing import Cluster, free_port, job_python

pytestmark = pytest.mark.e2e


@pytest.fixture
def one_agent(tmp_path: Path):
    with Cluster(tmp_path / "cluster") as c:
        server = c.server()
        c.agent(server, name="a1")
        c.wait_agents_running(c.client(server), 1)
        yield server


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )


SCRIPT = (
    "import os, pathlib\n"
    "for i in range(1, 6): print(f'line {i}', flush=True)\n"
    "pathlib.Path(os.environ['CORRAL_OUTPUT_DIR'], 'result.txt').write_text('42\\n')\n"
)


def test_sdk_runs_waits_and_fetches_results(one_agent, tmp_path: Path):
    from corral import AsyncClient, Client

    server = one_agent
    with Client(server=server.url, token=server.admin_token) as c:
        job = c.run([job_python(), "-c", SCRIPT], name="sdk-job", timeout=60)
        assert job.state == "succeeded", job.view
        assert job.exit_code == 0
        assert job.name == "sdk-job"
        assert "".join(job.logs()) == "".join(f"line {i}\n" for i in range(1, 6))
        assert [o.path for o in job.outputs()] == ["result.txt"]
        dest = job.download("result.txt", tmp_path / "got" / "result.txt")
        assert dest.read_text() == "42\n"

        # follow=True streams until the job ends
        streaming = c.run([job_python(), "-c", SCRIPT], wait=False)
        assert "line 5" in "".join(streaming.logs(follow=True))
        assert streaming.wait(30).state == "succeeded"

        # wait() gives up after its timeout; cancel() ends the job
        sleeper = c.run([job_python(), "-c", "import time; time.sleep(60)"], wait=False)
        with pytest.raises(TimeoutError):
            sleeper.wait(timeout=1)
        sleeper.cancel()
        assert sleeper.wait(30).state == "cancelled"

        # the CLI's logs --tail: only the last lines
        env = {"CORRAL_SERVER": server.url, "CORRAL_TOKEN": server.admin_token}
        r = cli("--version", env=env)
        assert "agent " in r.stdout and "on 1 instance(s)" in r.stdout, r.stdout
        r = cli("logs", str(job.id), "--tail", "2", env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout == "line 4\nline 5\n"

    async def go():
        async with AsyncClient(server=server.url, token=server.admin_token) as ac:
            job = await ac.run([job_python(), "-c", "print('async')"], timeout=60)
            text = "".join([t async for t in job.logs()])
            return job.state, text

    assert asyncio.run(go()) == ("succeeded", "async\n")


def test_drain_wait_and_undrain(one_agent):
    from corral import Client
    from corral.testing import wait_for

    server = one_agent
    env = {"CORRAL_SERVER": server.url, "CORRAL_TOKEN": server.admin_token}
    with Client(server=server.url, token=server.admin_token) as c:
        # a running job keeps the instance draining (not yet retired)
        busy = c.run([job_python(), "-c", "import time; time.sleep(120)"], wait=False)
        wait_for(lambda: busy.refresh().state == "running", 30, "the job running")
        r = cli("drain", "a1", env=env)
        assert r.returncode == 0, r.stderr
        assert "draining" in r.stdout
        r = cli("undrain", "a1", "-o", "json", env=env)
        assert r.returncode == 0, r.stderr
        assert '"state": "running"' in r.stdout
        busy.cancel()
        busy.wait(30)
    r = cli("drain", "a1", "--wait", "--timeout", "60", env=env)
    assert r.returncode == 0, r.stderr
    assert "instance a1 retired" in r.stdout


def test_contexts_failover_and_where_a_bad_token_came_from(one_agent, tmp_path: Path):
    server = one_agent
    home = tmp_path / "xdg"
    token_file = tmp_path / "prod.token"
    token_file.write_text(server.admin_token + "\n")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {"XDG_CONFIG_HOME": str(home), "CORRAL_DATA_DIR": str(tmp_path / "nodata")}

    r = cli(
        "context",
        "add",
        "prod",
        "--server",
        f"{dead},{server.url}",
        "--token-file",
        str(token_file),
        env=env,
    )
    assert r.returncode == 0, r.stderr
    cfg = home / "corral" / "config.json"
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert server.admin_token not in cfg.read_text()  # the token stays in its own file
    r = cli("context", "add", "lab", "--server", "http://127.0.0.1:1", env=env)
    assert r.returncode == 0, r.stderr
    r = cli("context", "list", env=env)
    assert r.stdout.splitlines()[0].split("\t") == ["CURRENT", "NAME", "SERVERS", "TOKEN FILE"]
    assert "*\tprod\t" in r.stdout

    # the first URL is down: the command goes to the next one
    r = cli("instances", "-o", "json", env=env)
    assert r.returncode == 0, r.stderr
    assert '"name": "a1"' in r.stdout

    # a wrong token is blamed on where it came from
    r = cli("jobs", env={**env, "CORRAL_TOKEN": "wrong"})
    assert r.returncode == 1
    assert "CORRAL_TOKEN environment variable" in r.stderr
    token_file.write_text("also-wrong\n")
    r = cli("jobs", env=env)
    assert r.returncode == 1
    assert f"the token file {token_file} of context prod" in r.stderr
    r = cli("jobs", "--token", "nope", env=env)
    assert "--token" in r.stderr

    r = cli("context", "use", "lab", env=env)
    assert r.returncode == 0, r.stderr
    r = cli("context", "use", "nosuch", env=env)
    assert r.returncode == 2
    assert "lab, prod" in r.stderr


def test_run_says_why_its_job_waits(one_agent):
    """`corral run` following a job no instance can take says why, not only `corral job`."""
    import selectors
    import time

    server = one_agent
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(CORRAL_SERVER=server.url, CORRAL_TOKEN=server.admin_token)
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "run", "--cpus", "64", "--", "true"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = ""
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        while "waiting" not in seen and time.monotonic() < deadline:
            if sel.select(timeout=1):
                line = proc.stderr.readline()
                if not line:
                    break
                seen += line
    finally:
        proc.kill()
        proc.wait(10)
    assert "no running instance has 64 cpus" in seen, seen
