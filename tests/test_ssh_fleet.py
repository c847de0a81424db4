"""SSH fleets on a multi-host test bed (corral.testbed): every host is a network
namespace on a bridge running the distribution's OpenSSH server; the server (a real
`corral server`) listens on the bridge and provisions real agents on the hosts over
SSH with the bootstrap script. One provisioned fleet of three hosts is shared by the
tests of this module, in order; each test that uses it starts by waiting for three
running instances, so it also passes alone.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from netkit import listener
from outputs import submit, verify_all_outputs

from corral.agent.sandbox.network import JOB_SUBNET
from corral.client.sdk import Client
from corral.testbed import Host, TestBed, agent_build, keypair, unavailable
from corral.testing import Cluster, ServerProc, job_python, wait_for

pytestmark = pytest.mark.e2e

FLEET = "ssh"
# Fast retries; an agent grace above Cluster.FAST's 4 s, since an agent switching
# builds on a loaded 2-core machine can be silent for longer than that.
SERVER_OPTIONS = [
    "--provision-backoff",
    "1",
    "--provision-cap",
    "3",
    "--register-timeout",
    "60",
    "--agent-grace",
    "8",
]

# A job that tells a listener on another machine its job id (the listener sees which
# address it came from), says its own address, then waits for its gate file.
WHERE = textwrap.dedent("""
    import os, socket, sys, time
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    s.sendall(os.environ["CORRAL_JOB_ID"].encode() + b"\\n")
    print(s.getsockname()[0], flush=True)
    s.close()
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.05)
""")

# A job that records its attempt, waits for its own gate and exits 40+N.
GATED = textwrap.dedent("""
    import os, sys, time
    n = os.environ["CORRAL_ATTEMPT"]
    d = sys.argv[1]
    open(os.path.join(d, f"started-{n}"), "w").close()
    while not os.path.exists(os.path.join(d, f"gate-{n}")):
        time.sleep(0.05)
    sys.exit(40 + int(n))
""")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass
class Fleet:
    bed: TestBed
    cluster: Cluster
    server: ServerProc
    client: Client
    work: Path
    empty_before: bool
    version: str = "1.0.0"  # the agent build rolled out

    @property
    def hosts(self) -> list[Host]:
        return self.bed.hosts[:3]

    def host_of(self, instance) -> Host:
        return next(h for h in self.bed.hosts if h.ref == instance.backend_ref)

    def running(self, n: int = 3, timeout: float = 120) -> list:
        """The fleet's n instances once they run, their provisioning is recorded as
        ready, and their agents run the rolled-out build."""

        def ready():
            rows = [
                i
                for i in self.client.instances()
                if i.fleet == FLEET
                and i.state == "running"
                and not i.lost
                and i.provision_state == "ready"
                and i.agent_version == self.version
            ]
            return rows if len(rows) == n else None

        return wait_for(ready, timeout, f"{n} running instances of fleet {FLEET}", interval=0.2)

    def instance(self, iid: str):
        return next(i for i in self.client.instances(include_terminated=True) if i.id == iid)

    def warnings(self, instance_id: str | None = None) -> list:
        return [
            e
            for e in self.client.events(level="warning", limit=1000)
            if instance_id is None or e.instance_id == instance_id
        ]


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    why = unavailable()
    if why:
        if _in_ci():
            pytest.fail(f"the SSH test bed cannot be built here: {why}")
        pytest.skip(f"the SSH test bed cannot be built here: {why}")
    # h1-h3: the fleet; h4-h8: hosts that fail in the ways provisioning reports
    with TestBed(tmp_path_factory.mktemp("bed"), hosts=8) as b:
        b.hosts[4].stop_sshd()  # h5: nothing listens (unreachable)
        yield b
    assert b.leftovers() == []


@pytest.fixture(scope="module")
def site(bed: TestBed, tmp_path_factory):
    """A server on the bed's bridge with an agent build rolled out; no fleet yet."""
    base = tmp_path_factory.mktemp("cluster")
    with Cluster(base) as c:
        server = c.server(host=bed.server_addr, extra=SERVER_OPTIONS)
        client = c.client(server)
        empty_before = client.instances(include_terminated=True) == [] and not any(
            h.prefix.exists() or h.data_root.exists() for h in bed.hosts
        )
        build = base / "corral-agent"
        build.write_bytes(agent_build("1.0.0"))
        stored = client.upload(build)  # the hosts download it from the server
        client.publish("agent", "1.0.0", stored["url"], stored["sha256"], stored["size"])
        client.rollout("agent", "1.0.0")
        # scripts, gates and outputs of jobs: where a root agent's unprivileged job
        # user can read and write (pytest's tmp dirs are 0700 under /tmp)
        work = Path(tempfile.mkdtemp(prefix="corral-ssh-work-", dir="/var/tmp"))
        work.chmod(0o777)
        try:
            yield Fleet(bed, c, server, client, work, empty_before)
        finally:
            shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def fleet(site: Fleet):
    """The fleet of three hosts (h1-h3), provisioned from nothing by `corral fleet
    apply` of a fleet file, as a person would."""
    hosts = "".join(
        f"  - {{host: {h.addr}, user: root, identity_file: {site.bed.client_key}, "
        f"cpus: 1, prefix: {h.prefix}, data_dir: {h.data_root}}}\n"
        for h in site.hosts
    )
    fleet_file = site.work / "fleet.yml"
    fleet_file.write_text(f"name: {FLEET}\nbackend: ssh\nmin: 3\nmax: 3\nhosts:\n{hosts}")
    r = corral_cli(site, "fleet", "apply", str(fleet_file))
    assert r.returncode == 0, r.stderr
    assert f"fleet {FLEET}: ssh, 3..3 instances on 3 host(s)" in r.stdout
    try:
        site.running(3)
    except AssertionError:
        print(site.server.log()[-6000:])
        for h in site.hosts:
            for log in h.data_root.glob("*/agent.log"):
                print(log, log.read_text()[-2000:])
        raise
    return site


def corral_cli(site: Fleet, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "CORRAL_SERVER": site.server.url,
        "CORRAL_TOKEN": site.server.admin_token,
        "COLUMNS": "400",
    }
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ssh_provisions_three_hosts_from_empty_and_runs_jobs_on_all(fleet: Fleet):
    client, bed = fleet.client, fleet.bed
    assert fleet.empty_before  # no instance, nothing installed on any host
    insts = fleet.running(3)
    assert sorted(i.backend_ref for i in insts) == sorted(h.ref for h in fleet.hosts)
    assert all(i.provision_state == "ready" and i.provision_error is None for i in insts)
    kinds = [e.kind for e in client.events(limit=1000)]
    assert kinds.count("instance.provisioned") >= 3

    # first contact recorded each host's real key in the server's known_hosts
    known = (fleet.server.data_dir / "known_hosts").read_text()
    for h in fleet.hosts:
        assert h.known_hosts_line() in known

    token = fleet.server.join_token
    for i in insts:
        h = fleet.host_of(i)
        assert len(agent_processes(h, i.name)) == 1, f"no agent of {i.name} in {h.name}"
        assert h.processes("supervise.sh"), f"no supervisor in {h.name}"
        # the join token reached the host as a 0600 file, never on a command line
        token_file = h.data_dir(i.name) / "join.token"
        assert token_file.read_text().strip() == token
        assert token_file.stat().st_mode & 0o777 == 0o600
        for pid in h.pids():
            assert token not in " ".join(_cmdline(pid)), f"token on a command line in {h.name}"

    script = fleet.work / "where.py"
    script.write_text(WHERE)
    gate = fleet.work / "where-gate"
    isolated = all("network isolated" in (i.sandbox or "") for i in insts)
    if not isolated and _in_ci():
        pytest.fail(f"the hosts' attempts are not isolated: {[i.sandbox for i in insts]}")
    with listener(bed.server_addr) as (port, seen):
        jobs = [
            client.submit(
                [job_python(), str(script), bed.server_addr, str(port), str(gate)], cpus=1
            ).id
            for _ in range(3)
        ]
        on = wait_for(
            lambda: (
                len({j.instance_id for j in (client.job(x) for x in jobs) if j.state == "running"})
                == 3
                and [client.job(x).instance_id for x in jobs]
            ),
            60,
            "one job running on each of the three hosts",
        )
        gate.touch()
        by_id = {i.id: i for i in insts}
        for job_id, iid in zip(jobs, on, strict=True):
            out: list[bytes] = []
            page = client.follow(job_id, on_output=lambda _s, d, out=out: out.append(d))
            assert page.job_state == "succeeded"
            host_addr = fleet.host_of(by_id[iid]).addr
            # the job ran on that host: the other machine saw it come from the host's
            # address, while the job had an address of its own network's
            assert (host_addr, str(job_id)) in seen, seen
            own = ipaddress.ip_address(b"".join(out).decode().strip())
            assert own in JOB_SUBNET if isolated else str(own) == host_addr

    # `corral run` streams the job's output and exits with its exit code
    r = corral_cli(fleet, "run", "--", job_python(), "-c", "print('ran'); raise SystemExit(7)")
    assert r.returncode == 7, r.stderr
    assert r.stdout.strip() == "ran"


def test_ssh_partitioned_host_loses_its_attempts_and_its_stale_runner_is_refused(fleet: Fleet):
    client = fleet.client
    before = {i.id: i for i in fleet.running(3)}
    known = {i.id for i in client.instances(include_terminated=True)}
    script = fleet.work / "gated.py"
    script.write_text(GATED)
    work = fleet.work / "partition"
    work.mkdir(mode=0o777)
    work.chmod(0o777)  # the job user writes its marks here
    job = client.submit([job_python(), str(script), str(work)], cpus=1)
    wait_for((work / "started-1").exists, 60, "attempt 1 to start")
    cut = before[client.job(job.id).instance_id]
    host = fleet.host_of(cut)
    agent_log = host.data_dir(cut.name) / "agent.log"

    host.partition()
    try:
        wait_for(lambda: client.job(job.id).attempt == 2, 60, "the requeue after the grace")
        assert any(e.kind == "instance.lost" and e.instance_id == cut.id for e in fleet.warnings())
        wait_for((work / "started-2").exists, 60, "attempt 2 on another host")
        assert client.job(job.id).instance_id != cut.id
        (work / "gate-1").touch()  # the cut-off attempt finishes and tries to report
    finally:
        host.heal()
    # the agent logs how each attempt's runner ended (its done.json is removed with the
    # attempt's directory as soon as the agent has reaped it)
    ended = re.compile(rf"attempt {job.id}/1 ended: (\S+)(.*)")
    status, reason = wait_for(
        lambda: (m := ended.search(agent_log.read_text(errors="replace"))) and m.groups(),
        90,
        "the stale runner to hear its token is refused",
    )
    # stale: a server answered its token with a refusal (401/403/404/409), once healed
    assert status == "stale", (status, reason)
    assert "409" in reason or "refused" in reason, reason
    back = wait_for(
        lambda: (i := fleet.instance(cut.id)).state == "running" and not i.lost and i,
        60,
        f"{cut.name} to be reachable again",
    )
    assert back.incarnation == cut.incarnation  # the same agent, not a new worker

    (work / "gate-2").touch()
    final = wait_for(
        lambda: (j := client.job(job.id)).state == "failed" and j, 60, "attempt 2 to finish"
    )
    assert (final.exit_code, final.result_attempt, final.attempt) == (42, 2, 2)
    assert [(a.state, a.exit_code) for a in final.attempts] == [("lost", None), ("failed", 42)]
    # no resurrection: no instance joined as a new worker; the cut-off one is the same
    assert {i.id for i in client.instances(include_terminated=True)} == known


def test_ssh_rolling_agent_upgrade_across_three_hosts(fleet: Fleet):
    client = fleet.client
    insts = fleet.running(3)
    work = fleet.work / "upgrade"
    work.mkdir(mode=0o777)
    work.chmod(0o777)  # the job user writes its marks here
    script = fleet.work / "gated.py"
    script.write_text(GATED)
    job = client.submit([job_python(), str(script), str(work)], cpus=1)
    wait_for((work / "started-1").exists, 60, "a job to run through the upgrade")

    build = fleet.work / "corral-agent-2"
    build.write_bytes(agent_build("2.0.0"))
    stored = client.upload(build)
    client.publish("agent", "2.0.0", stored["url"], stored["sha256"], stored["size"])
    rollout = client.rollout("agent", "2.0.0", max_unavailable=1)
    in_flight: list[int] = []

    def upgraded():
        r = next(x for x in client.rollouts() if x.id == rollout.id)
        in_flight.append(r.progress.in_flight)
        versions = {i.id: i.agent_version for i in client.instances() if i.fleet == FLEET}
        return r.state == "completed" and set(versions.values()) == {"2.0.0"} and r

    wait_for(upgraded, 120, "every host to run agent 2.0.0", interval=0.2)
    fleet.version = "2.0.0"
    assert max(in_flight) <= 1  # one host at a time
    after = fleet.running(3)
    assert {i.id for i in after} == {i.id for i in insts}  # same instances, upgraded in place
    for i in after:
        h = fleet.host_of(i)
        (agent,) = agent_processes(h, i.name)
        assert agent.environ().get("CORRAL_AGENT_VERSION") == "2.0.0"
    (work / "gate-1").touch()
    final = wait_for(
        lambda: (j := client.job(job.id)).state == "failed" and j, 60, "the job to finish"
    )
    assert (final.exit_code, final.attempt) == (41, 1)  # it ran through the upgrade


def test_ssh_drain_copies_unique_outputs_across_hosts_and_returns_the_host(
    fleet: Fleet, writer: str, tmp_path: Path
):
    client = fleet.client
    fleet.running(3)
    files = {"model.bin": 3_000_000, "metrics.json": 1234}
    job_id = submit(client, writer, files, hold=0.2)
    job = wait_for(
        lambda: (j := client.job(job_id)).state == "succeeded" and j, 60, "the writer job"
    )
    leaving = fleet.instance(job.instance_id)
    host = fleet.host_of(leaving)

    client.drain(leaving.name)
    wait_for(
        lambda: fleet.instance(leaving.id).state == "terminated", 90, f"{leaving.name} terminated"
    )
    for o in client.outputs(job_id):
        present = [r for r in client.object(o.sha256).replicas if r.state == "present"]
        assert present and all(r.instance_id != leaving.id for r in present)
        assert all(r.instance_state == "running" for r in present)
    # downloaded byte for byte from the host it was copied to
    assert verify_all_outputs(client, {job_id: files}, tmp_path / "got") == 2

    # terminated over SSH: the agent exited as retired (its supervisor did not restart
    # it), nothing of it runs on the host, the token file is gone, its data dir is kept
    data = host.data_dir(leaving.name)
    assert "the agent retired (exit 3); not restarting it" in (data / "agent.log").read_text()
    assert (data / "tombstone.json").exists() and not (data / "join.token").exists()
    assert not host.processes(str(data))
    # the host went back to the pool: a new instance now runs there, in a new data dir
    again = fleet.running(3)
    successor = next(i for i in again if i.backend_ref == host.ref)
    assert successor.name != leaving.name and successor.id != leaving.id
    assert host.processes(str(host.data_dir(successor.name)))


def test_ssh_hosts_cut_off_from_each_other_during_a_replication_lose_nothing(
    fleet: Fleet, writer: str, tmp_path: Path
):
    client = fleet.client
    fleet.running(3)
    files = {"weights.bin": 2_000_000}
    job_id = submit(client, writer, files, hold=0.2)
    job = wait_for(
        lambda: (j := client.job(job_id)).state == "succeeded" and j, 60, "the writer job"
    )
    insts = {i.id: i for i in fleet.running(3)}
    a = insts.pop(job.instance_id)
    b, c = insts.values()
    ha, hb, hc = fleet.host_of(a), fleet.host_of(b), fleet.host_of(c)
    (out,) = client.outputs(job_id)

    hc.partition()  # c is lost: b is the only recipient, and b cannot reach a
    try:
        wait_for(lambda: fleet.instance(c.id).lost, 60, f"{c.name} to count as lost")
        ha.block(hb)
        client.drain(a.name)

        def failed_on_b():
            reps = client.object(out.sha256).replicas
            return any(r.instance_id == b.id and r.state == "failed" for r in reps)

        wait_for(failed_on_b, 60, "the copy to the cut-off host to fail")
        assert fleet.instance(a.id).state == "draining"  # it waits: nothing is lost
    finally:
        hc.heal()
    wait_for(
        lambda: fleet.instance(a.id).state in ("retired", "terminated"),
        120,
        f"{a.name} to retire once {c.name} is back",
    )
    present = {r.instance_id: r for r in client.object(out.sha256).replicas if r.state == "present"}
    assert c.id in present and b.id not in present  # the copy went elsewhere
    assert present[c.id].created_at <= fleet.instance(a.id).retired_at
    ha.unblock(hb)
    assert verify_all_outputs(client, {job_id: files}, tmp_path / "got") == 1


def _retry_delays(events) -> list[float]:
    return [
        float(m.group(1))
        for e in sorted(events, key=lambda e: e.id)
        if (m := re.search(r"retrying in ([0-9.]+)s", e.message))
    ]


def test_ssh_host_without_python_is_retried_then_a_changed_host_key_is_refused(site: Fleet):
    fleet = site
    client, h4 = fleet.client, fleet.bed.hosts[3]
    spec = {"name": "keyed", "backend": "ssh", "min": 1, "max": 1}
    client.apply_fleet({**spec, "hosts": [h4.fleet_host(python="/nonexistent/python3")]})
    inst = wait_for(
        lambda: next(
            (i for i in client.instances() if i.fleet == "keyed" and i.provision_state == "failed"),
            None,
        ),
        60,
        "provisioning on the host without Python to be given up",
    )
    assert inst.provision_attempts == 3 and "no Python" in inst.provision_error
    events = fleet.warnings(inst.id)
    assert [e.kind for e in sorted(events, key=lambda e: e.id)] == [
        "instance.provision_failed",
        "instance.provision_failed",
        "instance.provision_gave_up",
    ]
    delays = _retry_delays(events)
    assert len(delays) == 2 and 0.8 <= delays[0] <= 1.0 and 1.6 <= delays[1] <= 2.0  # backoff
    assert h4.logins() == 3 and not h4.prefix.exists()  # three tries, nothing installed
    assert h4.known_hosts_line() in (fleet.server.data_dir / "known_hosts").read_text()

    # the machine is reinstalled (or replaced by an impostor): a new host key
    h4.stop_sshd()
    h4.rekey()
    h4.start_sshd()
    client.apply_fleet({**spec, "hosts": [h4.fleet_host()]})  # Python fixed: tried again
    refused = wait_for(
        lambda: [e for e in fleet.warnings(inst.id) if "host key" in e.message],
        60,
        "the changed host key to be refused",
    )
    assert h4.addr in refused[0].message and "refusing to provision" in refused[0].message
    row = fleet.instance(inst.id)
    assert row.provision_state == "failed" and "host_key_changed" in row.provision_error
    assert row.state == "pending" and h4.logins() == 3  # nothing was sent to it
    assert row.provision_attempts == 1 and not h4.prefix.exists()  # and it is not retried


def test_ssh_unreachable_host_is_retried_with_backoff_and_reported(site: Fleet):
    fleet = site
    client, h5 = fleet.client, fleet.bed.hosts[4]
    client.apply_fleet(
        {"name": "far", "backend": "ssh", "min": 1, "max": 1, "hosts": [h5.fleet_host()]}
    )
    inst = wait_for(
        lambda: next(
            (i for i in client.instances() if i.fleet == "far" and i.provision_state == "failed"),
            None,
        ),
        60,
        "provisioning of the unreachable host to be given up",
    )
    assert inst.provision_attempts == 3 and "cannot reach" in inst.provision_error
    delays = _retry_delays(fleet.warnings(inst.id))
    assert len(delays) == 2 and delays[0] < delays[1]
    # `corral instances` shows the host's provisioning state and last error
    shown = corral_cli(fleet, "instances")
    line = next(x for x in shown.stdout.splitlines() if inst.name in x)
    assert "failed" in line and "cannot reach" in line and h5.addr in line


def test_ssh_fleet_settings_are_checked_by_the_server_too(site: Fleet):
    """The API refuses what the CLI refuses (a client that skips the model gets the
    same answer), with a 422 naming the field, and writes nothing."""
    url, auth = site.server.url, {"Authorization": f"Bearer {site.server.admin_token}"}
    cases = [
        ({"name": "bad", "backend": "aws"}, "backend", "known backends: local, ssh"),
        (
            {"name": "bad", "backend": "ssh", "max_size": 2, "hosts": [{"host": "a", "prot": 1}]},
            "hosts.0",
            "unknown setting(s) prot",
        ),
        ({"name": "bad", "backend": "ssh", "max_size": 1}, "", "needs at least one host"),
    ]
    for body, field, message in cases:
        r = httpx.put(f"{url}/api/v1/fleets/bad", json=body, headers=auth, timeout=10)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_request" and message in error["message"]
        assert any(f["field"] == field for f in error["fields"]) or not field, error
    assert "bad" not in {f.name for f in site.client.fleets()}


def test_ssh_refused_key_full_disk_and_failing_bootstrap_are_retried_and_reported(
    site: Fleet, tmp_path: Path
):
    """Three more ways a host fails, each its own fleet, provisioned at once: a key the
    host does not accept, too little free disk (reached through a jump host), and a
    bootstrap that cannot install. Each is tried three times with backoff, reported
    with its reason, and then given up."""
    client, bed = site.client, site.bed
    h1, h6, h7, h8 = bed.hosts[0], bed.hosts[5], bed.hosts[6], bed.hosts[7]
    stranger = tmp_path / "stranger_key"
    keypair(stranger)  # a key no host authorizes
    cases = {
        "denied": ({"hosts": [h6.fleet_host(identity_file=str(stranger))]}, "auth: ", "refused"),
        "full": (
            {
                "hosts": [h7.fleet_host(proxy_jump=f"root@{h1.addr}")],
                "min_free_mb": 10**9,  # more than any disk here
            },
            "disk_full: ",
            "MB free at",
        ),
        "broken": (
            {"hosts": [h8.fleet_host(prefix="/proc/corral-bin")]},
            "bootstrap: ",
            "cannot create directory '/proc/corral-bin'",
        ),
    }
    logins_before = h1.logins()
    for name, (spec, _kind, _why) in cases.items():
        client.apply_fleet({"name": name, "backend": "ssh", "min": 1, "max": 1, **spec})

    def given_up():
        rows = {i.fleet: i for i in client.instances() if i.fleet in cases}
        done = [i for i in rows.values() if i.provision_state == "failed"]
        return rows if len(done) == len(cases) else None

    rows = wait_for(given_up, 90, "provisioning of the three failing hosts to be given up")
    for name, (_spec, kind, why) in cases.items():
        inst = rows[name]
        assert inst.provision_attempts == 3, inst
        assert inst.provision_error.startswith(kind) and why in inst.provision_error, inst
        warned = site.warnings(inst.id)
        assert len(warned) == 3 and all(why in e.message for e in warned), warned
        assert len(_retry_delays(warned)) == 2  # two retries, then given up
    assert not h6.data_root.exists() and not h7.data_root.exists()  # nothing was written
    # the full host was reached through the jump host, three times
    assert h1.logins() - logins_before >= 3
    assert h7.sshd_log().count(f"Connection from {h1.addr} ") >= 3


def agent_processes(host: Host, instance: str) -> list:
    """The agent process of that instance, living in the host's namespace."""
    return [
        p for p in host.processes(str(host.data_dir(instance))) if "corral.agent" in p.cmdline()
    ]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return []
