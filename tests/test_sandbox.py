"""The attempt sandbox with real processes (and real cgroups where the machine has
them): containment of whatever a job forks, isolation from the fleet's secrets,
trusted output collection, limits, and bad input.

Each test here started as a reproduction of a report against the code before the
sandbox: a `setsid` daemon that kept the per-job lock after a crash, a job reading
the agent's credential and other attempts' tokens, a symlinked output dir emptying
its target, NUL bytes crashing the runner, an unbounded log, a full disk.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import httpx
import psutil
import pytest
from jobkit import ended, in_ci, output, unavailable

from corral.testing import Cluster, corral_cmd, job_python, wait_for

pytestmark = pytest.mark.e2e

PY = job_python()


def cli(server, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "CORRAL_SERVER": server.url, "CORRAL_TOKEN": server.admin_token}
    return subprocess.run(
        corral_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout
    )


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---- containment ---------------------------------------------------------------------------

# Attempt 1 double-forks a daemon into its own session (it inherits every fd the
# command had, as daemons that do not close fds do), records the pids, and waits.
# Later attempts just succeed.
DAEMON = textwrap.dedent("""
    import os, sys, time
    d, n = sys.argv[1], os.environ["CORRAL_ATTEMPT"]
    if n != "1":
        print(f"attempt {n} ran", flush=True)
        sys.exit(0)
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(w, str(os.getpid()).encode())
            while True:
                time.sleep(1)
        os._exit(0)
    daemon = int(os.read(r, 20))
    tmp = os.path.join(d, f"pids-{os.environ['CORRAL_JOB_ID']}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()} {daemon}")
    os.rename(tmp, tmp[:-4])
    time.sleep(600)
""")


def _daemon_pids(jobfiles: Path, job_id: int) -> list[int]:
    f = jobfiles / f"pids-{job_id}"
    return [int(x) for x in f.read_text().split()] if f.exists() else []


def test_a_setsid_daemon_dies_with_its_attempt_and_never_blocks_the_next(
    cluster: Cluster, jobfiles: Path
):
    server = cluster.server()
    agent = cluster.agent(server, name="a1")
    client = cluster.client(server)
    (inst,) = cluster.wait_agents_running(client, 1)

    # cancel: nothing of the attempt is left, daemon included
    job = client.submit([PY, "-c", DAEMON, str(jobfiles)])
    pids = wait_for(lambda: _daemon_pids(jobfiles, job.id), 30, "the daemon to start")
    assert all(_alive(p) for p in pids)
    r = cli(server, "cancel", str(job.id))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not any(_alive(p) for p in pids), 20, f"attempt processes {pids} to die")

    # SIGKILL agent and runner: the restarted agent kills the daemon through the
    # attempt's cgroup, and the next attempt starts and succeeds on the same instance
    job = client.submit([PY, "-c", DAEMON, str(jobfiles)], max_attempts=2)
    pids = wait_for(lambda: _daemon_pids(jobfiles, job.id), 30, "the daemon to start")
    runner_pid = json.loads(
        (agent.data_dir / "attempts" / f"{job.id}-1" / "runner.pid").read_text()
    )["pid"]
    agent.kill()
    os.kill(runner_pid, signal.SIGKILL)
    wait_for(lambda: not _alive(runner_pid), 10, "the runner to die")
    assert _alive(pids[1]), "the daemon outlived its runner, as it would after a crash"
    agent.start()
    final = ended(client, job.id, timeout=45)
    assert (final.state, final.attempt) == ("succeeded", 2), final
    assert {a.instance_id for a in final.attempts} == {inst.id}
    assert final.attempts[0].state == "lost"
    assert "attempt 2 ran" in output(client, job.id)
    wait_for(lambda: not any(_alive(p) for p in pids), 10, "attempt 1's daemon to be dead")


# ---- isolation -----------------------------------------------------------------------------

# What a hostile job tries: read every file named on its command line and its own
# attempt's spec, every /proc/*/cmdline and /proc/*/environ it can, and its env.
HOSTILE = textwrap.dedent("""
    import json, os, sys, time
    paths = json.loads(sys.argv[1])
    me = f"{os.environ['CORRAL_JOB_ID']}-{os.environ['CORRAL_ATTEMPT']}"
    paths.append(os.path.join(sys.argv[2], me, "spec.json"))
    report = {"uid": os.getuid(), "env": dict(os.environ), "files": {}, "proc": {}}
    for p in paths:
        try:
            with open(p, "rb") as f:
                report["files"][p] = "read: " + f.read(8192).decode(errors="replace")
        except OSError as e:
            report["files"][p] = type(e).__name__
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            for what in ("cmdline", "environ"):
                try:
                    with open(f"/proc/{pid}/{what}", "rb") as f:
                        report["proc"][f"{pid}/{what}"] = f.read().decode(errors="replace")
                except OSError:
                    pass
    print(json.dumps(report), flush=True)
    gate = sys.argv[3]
    while not os.path.exists(gate):
        time.sleep(0.05)
""")

VICTIM = "import time\nwhile True: time.sleep(1)\n"


def _hostile_run(client, agent_dir: Path, secrets: dict[str, str], paths, jobfiles: Path):
    """Run a victim job and the hostile job side by side; return the hostile job's
    report and every secret it must not have seen (the fencing tokens included)."""
    victim = client.submit([PY, "-c", VICTIM], cpus=0.5)
    wait_for(lambda: client.job(victim.id).state == "running", 30, "the victim to run")
    vspec = agent_dir / "attempts" / f"{victim.id}-1" / "spec.json"
    secrets = {**secrets, "victim's attempt token": json.loads(vspec.read_text())["token"]}
    gate = jobfiles / "gate"
    job = client.submit(
        [
            PY,
            "-c",
            HOSTILE,
            json.dumps([*paths, str(vspec)]),
            str(agent_dir / "attempts"),
            str(gate),
        ],
        cpus=0.5,
    )
    wait_for(lambda: client.job(job.id).state == "running", 30, "the hostile job to run")
    hspec = agent_dir / "attempts" / f"{job.id}-1" / "spec.json"
    secrets["its own attempt token"] = json.loads(hspec.read_text())["token"]
    text = wait_for(
        lambda: (t := "".join(_log_chunks(client, job.id))) and t.endswith("\n") and t,
        30,
        "the hostile job's report",
    )
    gate.touch()
    client.cancel(victim.id)
    assert ended(client, job.id).state == "succeeded"
    return json.loads(text), secrets


def _log_chunks(client, job_id: int) -> list[str]:
    page = client.logs(job_id, attempt=1)
    return [base64.b64decode(c.data).decode(errors="replace") for c in page.chunks]


def _assert_nothing_leaked(report: dict, secrets: dict[str, str], files: list[str]) -> None:
    assert report["uid"] != 0, "a job of a root agent must not run as root"
    for path, result in report["files"].items():
        assert not result.startswith("read: "), f"the job read {path}: {result[:200]}"
    blob = json.dumps(report)
    for what, value in secrets.items():
        assert value and value not in blob, f"the job found the {what}"
    for f in files:
        assert report["files"][f] in ("PermissionError", "FileNotFoundError"), (f, report)


def test_a_hostile_job_of_a_root_agent_finds_no_secret(cluster: Cluster, jobfiles: Path):
    server = cluster.server()
    agent = cluster.agent(server, name="a1")
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1)
    ident = agent.data_dir / "identity.json"
    # The server may list the instance before the agent has saved the reply.
    wait_for(ident.exists, 10, "the agent's identity file")
    secrets = {
        "agent credential": json.loads(ident.read_text())["credential"],
        "join token": server.join_token,
        "admin token": server.admin_token,
    }
    paths = [
        str(ident),
        str(server.data_dir / "join.token"),
        str(server.data_dir / "admin.token"),
        f"/proc/{agent.pid}/environ",
    ]
    report, secrets = _hostile_run(client, agent.data_dir, secrets, paths, jobfiles)
    _assert_nothing_leaked(report, secrets, paths)
    env = report["env"]
    assert not any(k.startswith("CORRAL_") and "TOKEN" in k for k in env)
    assert set(env) >= {"PATH", "HOME", "LANG", "CORRAL_JOB_ID", "CORRAL_OUTPUT_DIR"}
    assert "PYTEST_CURRENT_TEST" not in env  # nothing of the agent's environment


def test_a_hostile_job_under_corral_up_finds_no_secret(cluster: Cluster, jobfiles: Path):
    server = cluster.up(agents=1)
    client = cluster.client(server)
    (inst,) = cluster.wait_agents_running(client, 1)
    agent_dir = server.data_dir / "agents" / inst.name
    ident = agent_dir / "identity.json"
    # the server lists the instance once its registration commits; the agent writes its
    # credential when the reply reaches it, a moment later
    wait_for(ident.exists, 15, "the agent to save its identity")
    agent_pid = next(
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if "agent" in (p.info["cmdline"] or []) and str(agent_dir) in p.info["cmdline"]
    )
    secrets = {
        "agent credential": json.loads(ident.read_text())["credential"],
        "join token": server.join_token,
        "admin token": server.admin_token,
    }
    paths = [
        str(ident),
        str(server.data_dir / "join.token"),
        str(server.data_dir / "admin.token"),
        f"/proc/{agent_pid}/environ",
    ]
    report, secrets = _hostile_run(client, agent_dir, secrets, paths, jobfiles)
    _assert_nothing_leaked(report, secrets, paths)


# ---- one agent shared by the tests below ---------------------------------------------------


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("sandbox") / "c") as c:
        server = c.server()
        agent = c.agent(server, name="a1")
        client = c.client(server)
        c.wait_agents_running(client, 1)
        yield c, server, agent, client


SYMLINKED = textwrap.dedent("""
    import os, shutil, sys
    out = os.environ["CORRAL_OUTPUT_DIR"]
    shutil.rmtree(out)
    os.symlink(sys.argv[1], out)   # ln -sfn /data/results $CORRAL_OUTPUT_DIR
""")

MIXED = textwrap.dedent("""
    import os, sys
    out = os.environ["CORRAL_OUTPUT_DIR"]
    with open(os.path.join(out, "real.txt"), "w") as f:
        f.write("mine")
    os.symlink("/etc/passwd", os.path.join(out, "passwd"))
    os.symlink(sys.argv[1], os.path.join(out, "results"))
""")


def test_a_symlinked_output_dir_leaves_its_target_alone(one, jobfiles: Path):
    _c, _server, _agent, client = one
    victim = jobfiles / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "a.txt").write_text("precious")
    (victim / "sub" / "b.txt").write_text("also precious")
    victim.chmod(0o777)
    before = sorted((p.relative_to(victim), p.stat().st_mode) for p in victim.rglob("*"))

    j = ended(client, client.submit([PY, "-c", SYMLINKED, str(victim)]).id)
    assert j.state == "succeeded", j
    assert client.outputs(j.id) == []
    assert j.notes == ["skipped the output dir: it is a symlink"], j.notes
    j2 = ended(client, client.submit([PY, "-c", MIXED, str(victim)]).id)
    assert j2.state == "succeeded", j2
    assert [o.path for o in client.outputs(j2.id)] == ["real.txt"]
    assert j2.notes == ["skipped 2 outputs: passwd is a symlink; results is a symlink"]
    after = sorted((p.relative_to(victim), p.stat().st_mode) for p in victim.rglob("*"))
    assert after == before
    assert (victim / "a.txt").read_text() == "precious"


def test_bad_input_is_refused_naming_the_field(one):
    _c, server, _agent, client = one
    h = {"Authorization": f"Bearer {server.admin_token}", "Content-Type": "application/json"}
    api = server.url + "/api/v1/jobs"
    cases = [
        ({"command": ["echo", "a\u0000b"]}, "command"),
        ({"command": ["echo"], "env": {"K": "v\u0000"}}, "env"),
        ({"command": ["echo"], "env": {"K\u0000": "v"}}, "env"),
        ({"command": ["echo"], "name": "n\u0000"}, "name"),
    ]
    for body, field in cases:
        r = httpx.post(api, json=body, headers=h)
        assert r.status_code == 422, (body, r.text)
        err = r.json()["error"]
        assert err["fields"][0]["field"].startswith(field), err
        assert "NUL" in err["message"], err
    # raw bytes that are not UTF-8 inside a JSON string
    before = len(client.jobs())
    raw = b'{"command": ["echo", "caf\\u00e9", "\xff\xfe"]}'
    r = httpx.post(api, content=raw, headers=h)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["fields"][0]["field"].startswith("command"), err
    assert "UTF-8" in err["message"], err
    assert len(client.jobs()) == before  # nothing half-written


def test_a_job_printing_100_mib_is_cut_at_the_log_limit_and_goes_on(one):
    _c, server, _agent, client = one
    loud = (
        "import sys\n"
        "chunk = b'x' * 1023 + b'\\n'\n"
        "for _ in range(100 * 1024): sys.stdout.buffer.write(chunk)\n"
        "sys.stdout.flush()\n"
        "open(__import__('os').environ['CORRAL_OUTPUT_DIR'] + '/done', 'w').write('ok')\n"
    )
    r = cli(server, "run", "--log-limit", "4M", "--", PY, "-c", loud, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    marker = "[corral: log truncated after 4 MiB]"
    assert r.stdout.endswith(marker + "\n"), r.stdout[-200:]
    assert len(r.stdout) == 4 * 2**20 + len(marker) + 1
    job = client.jobs()[0]
    assert [o.path for o in client.outputs(job.id)] == ["done"]  # it went on to the end


def test_a_job_past_its_memory_limit_is_killed_and_says_so(one):
    _c, server, _agent, client = one
    hog = textwrap.dedent("""
        import time
        t = time.process_time()
        while time.process_time() - t < 0.6:
            pass
        blocks = [bytes([i % 251]) * 2**20 for i in range(400)]
        print("survived", len(blocks))
    """)
    job = client.submit([PY, "-c", hog], memory_mb=64, max_attempts=1)
    final = ended(client, job.id)
    (a,) = final.attempts
    if a.limits_enforced is not None and "memory" not in a.limits_enforced:
        if in_ci():
            pytest.fail(f"this machine enforced no memory limit: {a.limits_enforced}")
        pytest.skip(f"no usable memory controller here: {a.limits_enforced}")
    assert final.state == "failed"
    assert final.reason == "killed: out of memory (limit 64 MB)", final.reason
    assert a.cpu_seconds is not None and a.cpu_seconds >= 0.5, a
    assert a.peak_memory_mb is not None and a.peak_memory_mb >= 32, a
    r = cli(server, "job", str(job.id))
    assert "out of memory (limit 64 MB)" in r.stdout and "cpu" in r.stdout.lower(), r.stdout


def _agent_that_can(cluster: Cluster, options: list[str], shows: str, controller: str):
    """A server and one agent started with `options`, whose sandbox description shows
    `shows` (else the machine lacks the cgroup controller); its client."""
    server = cluster.server()
    cluster.agent(server, name="limited", extra=options)
    client = cluster.client(server)
    (inst,) = cluster.wait_agents_running(client, 1)
    if shows not in (inst.sandbox or ""):
        unavailable(f"no usable {controller} cgroup controller here: {inst.sandbox}")
    return client


def test_a_job_without_memory_limit_is_held_to_what_its_agent_offers(cluster: Cluster):
    """A job that set no --memory used to be bounded by the host alone: its OOM killer
    then chose among the job, the agent, the server and the database. All of an
    agent's attempts together are held to the memory it offers (`--memory`)."""
    client = _agent_that_can(cluster, ["--memory", "300"], "limits memory", "memory")
    hog = "blocks = [bytes([i % 251]) * 2**20 for i in range(600)]; print('survived')"
    job = client.submit([PY, "-c", hog], max_attempts=1)
    final = ended(client, job.id)
    assert final.state == "failed", (final.state, final.reason)
    assert final.reason == (
        "killed: out of memory (the job set no --memory; this instance's jobs share 300 MB)"
    ), final.reason
    # the agent lives on and runs the next job
    ok = client.submit([PY, "-c", "print('after')"], max_attempts=1)
    assert ended(client, ok.id).state == "succeeded"


# ---- jobs side by side -----------------------------------------------------------------------

# Waits for its gate, marking that it runs; its secret is in its environment.
GATED_VICTIM = textwrap.dedent("""
    import os, sys, time
    open(sys.argv[1], "w").close()
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.05)
    print("victim survived", flush=True)
""")
# Looks for the victim's secret in every process's environment, then signals every
# process it may (Linux spares the caller itself).
NOSY = textwrap.dedent("""
    import os, signal, sys
    seen = 0
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/environ", "rb") as f:
                    seen += sys.argv[1].encode() in f.read()
            except OSError:
                pass
    print("secret seen", seen, flush=True)
    try:  # 0 even when every process it met refused (EPERM): the victim's fate tells
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass
    print("kill -9 -1 sent", flush=True)
""")


def test_a_job_cannot_read_or_kill_another_job_on_its_instance(one, jobfiles: Path):
    """Two attempts on one instance at once: neither runs as the other's user, so the
    one cannot read the other's environment (its secrets) nor signal its processes
    (`kill -9 -1` ended every job on the machine when all ran as one user)."""
    _c, _server, _agent, client = one
    started, gate = jobfiles / "victim-started", jobfiles / "victim-gate"
    secret = "victims-secret-" + base64.b32encode(os.urandom(10)).decode()
    victim = client.submit(
        [PY, "-c", GATED_VICTIM, str(started), str(gate)],
        secret_env={"VICTIM_KEY": secret},
        max_attempts=1,
    )
    wait_for(started.exists, 30, "the victim to run")
    nosy = ended(client, client.submit([PY, "-c", NOSY, secret], max_attempts=1).id)
    chunks: list[bytes] = []
    client.follow(nosy.id, on_output=lambda _s, d: chunks.append(d))
    out = b"".join(chunks).decode()
    assert nosy.state == "succeeded", (nosy.reason, out)
    assert "secret seen 0" in out and "kill -9 -1 sent" in out, out
    gate.touch()
    final = ended(client, victim.id)
    assert final.state == "succeeded", final.reason  # not killed by the nosy job


# Leaves a private file where every user may write (what a program's temporary file
# or a cache does), then exits.
LEAVES = textwrap.dedent("""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.shmget(int(os.environ["SHM_KEY"]), 4096, 0o1000 | 0o600) < 0:  # IPC_CREAT
        sys.exit("shmget: " + os.strerror(ctypes.get_errno()))
    for path in sys.argv[1:]:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"left by the first job")
        os.close(fd)
    print("left", len(sys.argv) - 1, "as", os.getuid(), flush=True)
""")

# Tries to read each path given.
READS = textwrap.dedent("""
    import ctypes, os, sys
    print("reading as", os.getuid(), flush=True)
    libc = ctypes.CDLL(None, use_errno=True)
    found = libc.shmget(int(os.environ["SHM_KEY"]), 0, 0)
    print("segment", "found" if found >= 0 else os.strerror(ctypes.get_errno()), flush=True)
    for path in sys.argv[1:]:
        try:
            print(path, "read:", open(path).read(), flush=True)
        except OSError as exc:
            print(path, "not readable:", type(exc).__name__, flush=True)
""")


def test_what_a_job_leaves_in_tmp_is_gone_before_its_user_is_given_to_another(one):
    """Attempts one after another get the same job user (the lowest free one): a 0600
    file the first left in /tmp or /dev/shm, or a System V shared memory segment, was
    the next job's to read. (Which user the next job gets depends on what else runs on
    the host, other test workers' agents included: what the first left is looked for
    on the host itself, then by a second job.)"""
    _c, _server, _agent, client = one
    marker = "corral-left-" + base64.b32encode(os.urandom(5)).decode().lower()
    paths = [f"/tmp/{marker}", f"/dev/shm/{marker}", f"/var/tmp/{marker}/nested/file"]
    key = int.from_bytes(os.urandom(3), "big") + 1
    env = {"SHM_KEY": str(key)}
    first = ended(client, client.submit([PY, "-c", LEAVES, *paths], env=env, max_attempts=1).id)
    left = output(client, first.id)
    assert first.state == "succeeded", (first.reason, left)
    assert "left 3 as " in left, left

    def segment_exists() -> bool:
        table = Path("/proc/sysvipc/shm").read_text().splitlines()
        return any(line.split()[0] == str(key) for line in table[1:] if line.split())

    # removed once the attempt's runner let go of its user (just after the result)
    wait_for(
        lambda: (
            not any(os.path.lexists(p) for p in [*paths, f"/var/tmp/{marker}"])
            and not segment_exists()
        ),
        20,
        "what the first job left to be removed",
    )
    second = ended(client, client.submit([PY, "-c", READS, *paths], env=env, max_attempts=1).id)
    out = output(client, second.id)
    assert second.state == "succeeded", (second.reason, out)
    assert "read:" not in out and "segment found" not in out, out
    assert "segment No such file or directory" in out, out
    for path in paths:
        assert f"{path} not readable: FileNotFoundError" in out, out


# ---- a fork bomb ---------------------------------------------------------------------------

# Forks children (each sleeps, marked by argv[1]) until the kernel refuses or 300 are
# up; prints how many it got. Bounded: never a real bomb, even where nothing caps it.
FORKER = textwrap.dedent("""
    import os, sys, time
    got = 0
    for _ in range(300):
        try:
            pid = os.fork()
        except OSError as exc:
            print("refused:", exc.errno, flush=True)
            break
        if pid == 0:
            time.sleep(120)
            os._exit(0)
        got += 1
    print("forked", got, flush=True)
""")


def test_a_fork_bomb_is_stopped_at_its_attempts_ceiling(cluster: Cluster):
    client = _agent_that_can(cluster, ["--max-pids", "40"], "pids", "pids")
    marker = "fork-bomb-of-this-test"
    job = client.submit([PY, "-c", FORKER, marker], max_attempts=1)
    final = ended(client, job.id)
    chunks: list[bytes] = []
    client.follow(job.id, on_output=lambda _s, d: chunks.append(d))
    out = b"".join(chunks).decode()
    assert final.state == "succeeded", (final.reason, out)
    assert "refused: 11" in out, out  # EAGAIN: the attempt's pids.max, not the host's
    got = int(out.split("forked", 1)[1].split()[0])
    assert 10 <= got < 40, out
    # the attempt's end took every child with it
    wait_for(
        lambda: (
            not any(marker in (p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))
        ),
        10,
        "the forked children to be gone",
    )
    # and a job with a thread pool far below the ceiling is untouched
    pool = "from concurrent.futures import ThreadPoolExecutor as P; list(P(20).map(abs, range(99)))"
    ok = client.submit([PY, "-c", pool], max_attempts=1)
    assert ended(client, ok.id).state == "succeeded"


# ---- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "corral-test", str(d)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        unavailable(f"cannot mount a 16 MB tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_a_full_disk_fails_the_attempt_cleanly_and_the_agent_goes_on(
    small_disk: Path, tmp_path: Path
):
    with Cluster(tmp_path / "c") as c:
        server = c.server()
        agent = c.agent(server, name="small", data_dir=small_disk / "agent")
        client = c.client(server)
        (inst,) = c.wait_agents_running(client, 1)
        big = (
            "import os\n"
            "with open(os.environ['CORRAL_OUTPUT_DIR'] + '/big.bin', 'wb') as f:\n"
            "    f.write(os.urandom(32 * 2**20))\n"
        )
        j = ended(client, client.submit([PY, "-c", big], max_attempts=1).id)
        assert j.state == "failed"
        assert j.reason == "no space left on device while writing outputs", j.reason
        assert agent.alive()
        beat = client.instances()[0].last_heartbeat_at
        wait_for(
            lambda: client.instances()[0].last_heartbeat_at > beat,
            10,
            "the agent to heartbeat after the full disk",
        )
        assert not client.instances()[0].lost
        ok = ended(client, client.submit(["sh", "-c", "echo fine"]).id)
        assert ok.state == "succeeded" and ok.instance_id == inst.id


# ---- a job that fills the disk -------------------------------------------------------------

# Writes its working directory full (1 MiB at a time, at most 64), then holds what it
# wrote (a job that keeps a disk full), 20 s at most.
HOG = textwrap.dedent("""
    import errno, os, sys, time
    written = 0
    with open("fill.bin", "wb") as f:
        try:
            for _ in range(64):
                f.write(b"x" * 2**20)
                f.flush()
                written += 1
        except OSError as exc:
            print("stopped:", errno.errorcode.get(exc.errno), flush=True)
    print("wrote", written, "MiB; holding it", flush=True)
    time.sleep(20)
""")

# Writes 2 MiB, waits for its gate, writes 2 MiB more.
NEIGHBOR = textwrap.dedent("""
    import os, sys, time
    open("a.bin", "wb").write(b"n" * 2 * 2**20)
    open(sys.argv[1], "w").close()
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.05)
    open("b.bin", "wb").write(b"n" * 2 * 2**20)
    print("neighbor done", flush=True)
""")


@pytest.fixture
def small_jobs_disk():
    """A 32 MiB filesystem the job users may enter (tmpfs, mode 0711)."""
    d = Path(f"/var/tmp/corral-test-disk-{os.urandom(4).hex()}")
    d.mkdir(mode=0o711)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m,mode=0711", "corral-test", str(d)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        d.rmdir()
        unavailable(f"cannot mount a 32 MiB tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "--lazy", str(d)], check=False)
        d.rmdir()


def test_a_job_filling_the_disk_is_killed_before_its_neighbours_are_starved(
    small_jobs_disk: Path, cluster: Cluster, jobfiles: Path
):
    if os.geteuid() != 0:
        pytest.skip("the jobs directory on a filesystem of the test's own: run as root")
    server = cluster.server()
    cluster.agent(
        server,
        name="smalldisk",
        extra=["--jobs-dir", str(small_jobs_disk / "jobs"), "--disk-reserve", "8"],
    )
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1)
    started, gate = jobfiles / "neighbor-started", jobfiles / "neighbor-gate"
    neighbor = client.submit([PY, "-c", NEIGHBOR, str(started), str(gate)], max_attempts=1)
    wait_for(started.exists, 30, "the neighbour's first write")
    hog = ended(client, client.submit([PY, "-c", HOG], max_attempts=1).id, timeout=90)
    out = output(client, hog.id)
    assert hog.state == "failed", (hog.state, hog.reason, out)
    assert (hog.reason or "").startswith("killed: the disk was nearly full ("), hog.reason
    assert "kept free); this attempt held" in hog.reason, hog.reason
    gate.touch()  # the neighbour writes again, in the space the hog held
    final = ended(client, neighbor.id)
    assert final.state == "succeeded", (final.reason, output(client, neighbor.id))
    assert "neighbor done" in output(client, neighbor.id)
