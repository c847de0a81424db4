"""The sandbox of an agent that is not root: jobs run as the agent's own user inside
user, mount and pid namespaces (bubblewrap), so they still cannot see the agent's
files or processes, and a whole attempt dies with its runner. Without permission to
create cgroups the agent says so once (a WARNING event, `corral instances`).

The agent runs as `nobody` (the test itself must be root to arrange that) on the
system's Python with this checkout on its path."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import textwrap
from pathlib import Path

import psutil
import pytest
from jobkit import ended, unavailable
from test_sandbox import HOSTILE, VICTIM, _assert_nothing_leaked, _log_chunks, cli

import corral
from corral.testing import JOB_PATH, AgentProc, Cluster, job_python, wait_for

pytestmark = pytest.mark.e2e

PY = job_python()


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root, to start an agent as another user"
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux)"
    if shutil.which("bwrap") is None:
        return "needs bubblewrap (apt-get install bubblewrap)"
    return None


def _start_agent(c: Cluster, server, base: Path, name: str) -> AgentProc:
    who = pwd.getpwnam("nobody")
    data = base / name
    data.mkdir(parents=True)
    os.chown(data, who.pw_uid, who.pw_gid)
    token = base / f"{name}.join-token"
    code = str(Path(corral.__file__).resolve().parents[1])
    env = {"PYTHONPATH": f"{code}:{sysconfig.get_paths()['purelib']}", "HOME": str(data)}
    proc = AgentProc(data, [server.url], server.join_token, name, ["--cpus", "2"], env, token)
    os.chown(token, who.pw_uid, who.pw_gid)
    proc.log_path = base / f"{name}.log"
    proc.args = [
        "setpriv",
        f"--reuid={who.pw_uid}",
        f"--regid={who.pw_gid}",
        "--clear-groups",
        "--",
        PY,
        *proc.args[1:],
    ]
    proc.start()
    c.procs.append(proc)
    c.agents.append(proc)
    return proc


@pytest.fixture(scope="module")
def nonroot():
    why = _unavailable()
    if why:
        unavailable(why)
    probe = subprocess.run(
        [PY, "-c", "import corral.agent.cli"],
        env={
            "PATH": JOB_PATH,
            "PYTHONPATH": f"{Path(corral.__file__).resolve().parents[1]}:"
            f"{sysconfig.get_paths()['purelib']}",
        },
        capture_output=True,
        text=True,
        user="nobody",
        check=False,
    )
    if probe.returncode != 0:
        why = f"the system Python cannot import corral as nobody: {probe.stderr[-300:]}"
        unavailable(why)
    base = Path(tempfile.mkdtemp(prefix="corral-nonroot-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        with Cluster(base / "c") as c:
            server = c.server()
            agent = _start_agent(c, server, base, "nb1")
            client = c.client(server)
            c.wait_agents_running(client, 1, timeout=60)
            yield c, server, agent, client
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_agent_reports_what_it_cannot_isolate_once(nonroot):
    _c, server, _agent, client = nonroot
    (inst,) = client.instances()
    assert inst.sandbox == "subreaper; limits off; namespaces", inst.sandbox
    r = cli(server, "instances", "--json")
    assert '"sandbox": "subreaper; limits off; namespaces"' in r.stdout, r.stdout
    warns = [e for e in client.events(level="warning") if e.kind == "instance.sandbox"]
    assert any("no cgroup v2 group for attempts" in e.message for e in warns), warns
    assert any("--memory and --cpus not enforced" in e.message for e in warns), warns
    assert len(warns) == 2


def test_a_hostile_job_of_an_agent_that_is_not_root_finds_no_secret(nonroot):
    _c, server, agent, client = nonroot
    jobfiles = Path(tempfile.mkdtemp(prefix="corral-jobfiles-", dir="/var/tmp"))
    jobfiles.chmod(0o777)
    try:
        ident = agent.data_dir / "identity.json"
        token_file = agent.data_dir.parent / "nb1.join-token"
        victim = client.submit([PY, "-c", VICTIM], cpus=0.5)
        wait_for(lambda: client.job(victim.id).state == "running", 30, "the victim to run")
        vspec = agent.data_dir / "attempts" / f"{victim.id}-1" / "spec.json"
        secrets = {
            "agent credential": json.loads(ident.read_text())["credential"],
            "join token": server.join_token,
            "victim's attempt token": json.loads(vspec.read_text())["token"],
        }
        paths = [str(ident), str(token_file), f"/proc/{agent.pid}/environ", str(vspec)]
        gate = jobfiles / "gate"
        job = client.submit(
            [PY, "-c", HOSTILE, json.dumps(paths), str(agent.data_dir / "attempts"), str(gate)],
            cpus=0.5,
        )
        wait_for(lambda: client.job(job.id).state == "running", 30, "the hostile job to run")
        hspec = agent.data_dir / "attempts" / f"{job.id}-1" / "spec.json"
        secrets["its own attempt token"] = json.loads(hspec.read_text())["token"]
        text = wait_for(
            lambda: (t := "".join(_log_chunks(client, job.id))) and t.endswith("\n") and t,
            30,
            "the hostile job's report",
        )
        gate.touch()
        client.cancel(victim.id)
        assert ended(client, job.id).state == "succeeded"
        report = json.loads(text)
        report["uid"] = report["uid"] or -1  # the agent's own user here, not root
        _assert_nothing_leaked(report, secrets, [str(ident), f"/proc/{agent.pid}/environ"])
        # the job sees its own pid namespace only: no process of the agent or host
        pids = {k.split("/")[0] for k in report["proc"]}
        assert str(agent.pid) not in pids and len(pids) < 10, sorted(pids)
    finally:
        shutil.rmtree(jobfiles, ignore_errors=True)


DAEMON = textwrap.dedent("""
    import os, sys, time
    n, job = os.environ["CORRAL_ATTEMPT"], os.environ["CORRAL_JOB_ID"]
    if n != "1":
        print(f"attempt {n} ran", flush=True)
        sys.exit(0)
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execvp("sleep", ["sleep", f"4321.{job}"])
        os._exit(0)
    print("daemon started", flush=True)
    time.sleep(600)
""")


def _daemons(job_id: int) -> list[psutil.Process]:
    want = ["sleep", f"4321.{job_id}"]
    return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == want]


def test_a_daemon_in_the_namespace_dies_with_its_runner(nonroot):
    _c, server, agent, client = nonroot
    (inst,) = client.instances()
    job = client.submit([PY, "-c", DAEMON], max_attempts=2)
    wait_for(lambda: _daemons(job.id), 30, "the daemon to start")
    runner_pid = json.loads(
        (agent.data_dir / "attempts" / f"{job.id}-1" / "runner.pid").read_text()
    )["pid"]
    agent.kill()
    os.kill(runner_pid, signal.SIGKILL)
    wait_for(lambda: not _daemons(job.id), 15, "the daemon to die with its runner's namespace")
    agent.start()
    final = ended(client, job.id, timeout=60)
    assert (final.state, final.attempt) == ("succeeded", 2), final
    assert {a.instance_id for a in final.attempts} == {inst.id}
    r = cli(server, "job", str(job.id))
    assert r.returncode == 0
