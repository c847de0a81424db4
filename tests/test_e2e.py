"""End to end with real processes on loopback: `corral server`, two `corral agent`s,
the `corral` CLI, runners and the commands they run."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import httpx
import psutil
import pytest

from corral.domain.sandbox import MINIMAL_PATH
from corral.testing import Cluster, corral_cmd, job_python, wait_for

pytestmark = pytest.mark.e2e


def cli(server, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "CORRAL_SERVER": server.url, "CORRAL_TOKEN": server.admin_token}
    return subprocess.run(
        corral_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def two_agents(cluster: Cluster, db_url: str):
    server = cluster.server(db_url=db_url)
    cluster.agent(server, name="a1")
    cluster.agent(server, name="a2")
    client = cluster.client(server)
    cluster.wait_agents_running(client, 2)
    return server, client


def test_run_streams_output_and_exits_with_the_job_code(two_agents):
    server, client = two_agents
    r = cli(server, "run", "--", job_python(), "-c", "print(42)")
    assert (r.returncode, r.stdout) == (0, "42\n"), r.stderr
    r = cli(server, "run", "--", "sh", "-c", "echo to-err >&2; exit 3")
    assert r.returncode == 3
    assert r.stdout == ""
    assert "to-err" in r.stderr and "exited with code 3" in r.stderr
    jobs = client.jobs()
    assert [(j.state, j.exit_code) for j in jobs] == [("failed", 3), ("succeeded", 0)]


def test_jobs_spread_over_both_agents(two_agents):
    _server, client = two_agents
    ids = [client.submit(["sleep", "1"], cpus=2).id for _ in range(4)]
    wait_for(lambda: all(client.job(i).state == "succeeded" for i in ids), 60, "4 jobs to finish")
    used = {client.job(i).instance_id for i in ids}
    assert len(used) == 2  # each agent offers 2 cpus: one such job at a time each


TREE = textwrap.dedent("""
    import os, subprocess, sys, time
    pids = []
    pids.append(subprocess.Popen(["sleep", "300"]).pid)             # a child
    pids.append(subprocess.Popen(["sh", "-c", "sleep 300 & wait"]).pid)  # a grandchild
    # a daemonised grandchild in its own session, escaping the process group
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        p = subprocess.Popen(["sleep", "300"])
        os.write(w, str(p.pid).encode()); os._exit(0)
    pids.append(int(os.read(r, 20)))
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(" ".join(map(str, pids + [os.getpid()])))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    print("tree ready", flush=True)
    time.sleep(300)
""")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_cancel_kills_the_whole_process_tree(two_agents, jobfiles: Path):
    server, client = two_agents
    script = jobfiles / "tree.py"
    script.write_text(TREE)
    pid_file = jobfiles / "pids"
    job = client.submit([job_python(), str(script), str(pid_file)])
    wait_for(pid_file.exists, 30, "the job to start its process tree")
    pids = [int(p) for p in pid_file.read_text().split()]
    assert all(_alive(p) for p in pids)
    r = cli(server, "cancel", str(job.id))
    assert r.returncode == 0 and "cancelled" in r.stdout
    wait_for(lambda: not any(_alive(p) for p in pids), 30, f"processes {pids} to be killed")
    j = client.job(job.id)
    assert j.state == "cancelled" and j.attempts[0].state == "revoked"
    r = cli(server, "cancel", str(job.id))  # again: an ended job is left as it is
    assert r.returncode == 1
    assert f"job {job.id} has already ended (cancelled): nothing to cancel" in r.stderr


def test_an_agent_keeps_no_file_per_job_it_ran(cluster: Cluster, two_agents):
    """Each job's lock on an agent is a file; it goes with the attempt, or the locks
    directory of a long-lived agent grows by a file for every job it ever ran."""
    _server, client = two_agents
    ids = [client.submit(["true"]).id for _ in range(4)]
    ids.append(client.submit(["false"]).id)
    sleeper = client.submit(["sleep", "300"])
    wait_for(lambda: client.job(sleeper.id).state == "running", 30, "the sleeper to start")
    client.cancel(sleeper.id)
    ended = ("succeeded", "failed", "cancelled")
    wait_for(lambda: all(client.job(i).state in ended for i in [*ids, sleeper.id]), 60, "the jobs")

    def lock_files() -> list[str]:
        return [
            str(f) for d in cluster.agent_dirs() if (d / "locks").is_dir()
            for f in (d / "locks").iterdir()
        ]  # fmt: skip

    wait_for(lambda: lock_files() == [], 30, "the jobs' lock files to go")


def test_server_and_token_may_come_before_the_command(two_agents):
    """`corral --server URL --token T jobs`, as other CLIs take their global options;
    a command's own --server wins."""
    server, client = two_agents
    job = client.submit(["true"])
    env = {k: v for k, v in os.environ.items() if k not in ("CORRAL_SERVER", "CORRAL_TOKEN")}
    env["HOME"] = str(server.data_dir / "nohome")  # no context, no `corral up` to find
    r = subprocess.run(
        corral_cmd("--server", server.url, "--token", server.admin_token, "jobs", "-o", "json"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert [j["id"] for j in json.loads(r.stdout)] == [job.id]
    r = subprocess.run(
        corral_cmd(
            "--server",
            "http://127.0.0.1:1",
            "--token",
            server.admin_token,
            "jobs",
            "--server",
            server.url,
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


def test_command_not_found_fails_the_attempt_with_a_reason(two_agents):
    server, client = two_agents
    r = cli(server, "run", "--", "no-such-command-xyz", "arg")
    assert r.returncode == 127
    (job,) = client.jobs()
    assert job.state == "failed"
    # it says where it looked and what to do (the job's PATH is a minimal one, not the
    # submitter's: `python` is not there on a host that has only python3)
    assert job.reason == (
        "command not found: no-such-command-xyz (not on the job's PATH, "
        f"{MINIMAL_PATH}; give its full path, or set PATH with -e)"
    )
    r = cli(server, "job", str(job.id))
    assert "command not found: no-such-command-xyz" in r.stdout
    r = cli(server, "run", "--", "/no/such/command", "arg")
    assert r.returncode == 127
    assert client.job(max(j.id for j in client.jobs())).reason == (
        "command not found: /no/such/command (no such file)"
    )


def test_server_restart_while_a_job_runs(cluster: Cluster, db_url: str, jobfiles: Path):
    """The server dies (SIGKILL) while a job runs and comes back on the same
    database; the agent keeps the job running, reconnects, and the result lands."""
    server = cluster.server(db_url=db_url)
    cluster.agent(server, name="a1")
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1)
    gate = jobfiles / "gate"
    job = client.submit(
        ["sh", "-c", f"echo before; while [ ! -e {gate} ]; do sleep 0.1; done; echo after; exit 5"]
    )
    wait_for(lambda: client.job(job.id).state == "running", 30, "the job to run")
    server.kill()
    gate.touch()  # the command finishes while no server is up
    server.start()
    server.wait_ready()
    j = wait_for(
        lambda: (j := client.job(job.id)).state == "failed" and j,
        60,
        "the result to be recorded after the restart",
    )
    assert (j.exit_code, j.result_attempt, j.attempt) == (5, 1, 1)
    out = []
    client.follow(job.id, on_output=lambda s, d: out.append(d))
    assert b"".join(out) == b"before\nafter\n"


def test_second_server_on_one_sqlite_file_is_refused(cluster: Cluster):
    first = cluster.server()
    second = cluster.server(extra=[], fast=False, wait=False, name="second")
    # same data dir (and so the same SQLite file) as the first
    second.stop()
    second.args[second.args.index("--data-dir") + 1] = str(first.data_dir)
    second.log_path = first.data_dir.parent / "second.log"
    second.start()
    code = second.popen.wait(timeout=30)
    assert code == 1
    assert "already used by another corral server" in second.log()
    assert first.alive()
    assert httpx.get(first.url + "/health").status_code == 200


def test_bad_input_gets_clear_4xx_and_writes_nothing(cluster: Cluster, db_url: str):
    server = cluster.server(db_url=db_url)
    h = {"Authorization": f"Bearer {server.admin_token}"}
    api = server.url + "/api/v1"
    r = httpx.post(api + "/jobs", json={"command": []}, headers=h)
    assert r.status_code == 422
    body = r.json()["error"]
    assert body["code"] == "invalid_request" and body["fields"][0]["field"] == "command"
    r = httpx.post(api + "/jobs", json={"command": ["x"], "cpus": "lots"}, headers=h)
    assert r.status_code == 422 and "cpus" in r.json()["error"]["message"]
    r = httpx.post(api + "/jobs", json={"command": ["x"], "bogus": 1}, headers=h)
    assert r.status_code == 422 and "bogus" in r.json()["error"]["message"]
    assert httpx.get(api + "/jobs", headers=h).json() == []  # nothing half-written
    assert httpx.get(api + "/jobs/424242", headers=h).status_code == 404
    assert httpx.get(api + "/jobs/notanumber", headers=h).status_code == 422
    assert httpx.get(api + "/jobs").status_code == 401
    r = httpx.get(api + "/jobs", headers={"Authorization": "Bearer cra_wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = httpx.get(api + "/jobs", headers={"Authorization": f"Bearer {server.join_token}"})
    assert r.status_code == 403
    # runner endpoints: a malformed or unknown attempt token is 409 or 401, never 500
    job = httpx.post(api + "/jobs", json={"command": ["true"]}, headers=h).json()
    for headers in (
        {},
        {"X-Corral-Attempt-Token": "x"},
        {"X-Corral-Attempt-Token": "A" * 32},
        {"X-Corral-Attempt-Token": "é".encode("latin-1") * 40},
    ):
        r = httpx.post(
            f"{api}/jobs/{job['id']}/attempts/1/finish", json={"exit_code": 0}, headers=headers
        )
        assert r.status_code in (401, 409), (headers, r.status_code, r.text)
    assert httpx.get(f"{api}/jobs/{job['id']}", headers=h).json()["state"] == "queued"
    assert httpx.get(server.url + "/openapi.json").json()["info"]["title"] == "corral"


def test_corral_servers_lists_this_server(cluster: Cluster):
    server = cluster.server()
    r = cli(server, "servers", "--json")
    assert r.returncode == 0, r.stderr
    assert '"alive": true' in r.stdout and '"build_version"' in r.stdout


def test_cli_errors_are_one_clear_line_not_a_traceback(cluster: Cluster):
    server = cluster.server()
    r = cli(server, "job", "424242")
    assert r.returncode == 1 and "error:" in r.stderr and "424242" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    env = {**os.environ, "CORRAL_SERVER": "http://127.0.0.1:9", "CORRAL_TOKEN": "x"}
    r = subprocess.run(corral_cmd("jobs"), env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot reach the corral server" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = cli(server, "fleet", "apply", "/nonexistent.yml")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_dashboard_needs_the_admin_token_and_shows_the_fleet(cluster: Cluster):
    server = cluster.server()
    cluster.agent(server, name="a1")
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1)
    client.apply_fleet({"name": "gpu", "backend": "local", "min_size": 0, "max_size": 2})
    job = client.submit(["true"])
    for cookies in ({}, {"corral_token": server.join_token}):  # to the sign-in form
        r = httpx.get(server.url + "/", cookies=cookies)
        assert (r.status_code, r.headers["location"]) == (303, "/login?next=/")
    with httpx.Client(base_url=server.url, follow_redirects=True) as browser:
        page = browser.get("/", params={"token": server.admin_token})
        assert page.status_code == 200 and browser.cookies.get("corral_token")
        html = page.text
        jobs_html = browser.get("/jobs").text
        fleets_html = browser.get("/fleets").text
    assert "a1" in html and f'<tr id="job-{job.id}">' in jobs_html
    assert "<h1>Fleets</h1>" in fleets_html and "<td>gpu</td>" in fleets_html


def test_corral_up_prints_no_library_warnings_to_the_operator(cluster: Cluster):
    """`corral up`'s terminal is the operator's: a job run through it (every body the
    server validates on the way) leaves no Python warning there."""
    server = cluster.up(agents=1)
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1)
    r = cli(server, "run", "--", "sh", "-c", "echo fine")
    assert r.returncode == 0 and r.stdout.strip() == "fine", r.stderr
    log = server.log()
    assert "Warning" not in log and "warnings.warn" not in log, log[-3000:]
