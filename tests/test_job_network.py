"""A root agent's attempts each have a network of their own: their own loopback,
other machines through the host's NAT, never the host itself, never each other.

The report: a job of a root agent reached everything listening on its host. On a
`corral up` with PostgreSQL (trust authentication on 127.0.0.1, as on this project's
own machines), `psql -h 127.0.0.1` from a job could rewrite the fleet's database.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
from jobkit import ended, output, unavailable
from netkit import listener

from corral.agent.libc import libc
from corral.agent.sandbox.network import (
    CLONE_NEWNET,
    JOB_SUBNET,
    LINK_PREFIX,
    AttemptNetwork,
    forget_kept,
    ruleset,
    slot_addresses,
    sockets_open,
)
from corral.domain.sandbox import SandboxFacts, describe
from corral.testing import Cluster, job_python, wait_for

PY = job_python()


# ---- the addresses and the rules (pure) ---------------------------------------------------


def test_each_slot_has_its_own_slash_30_inside_the_job_subnet():
    seen: set[ipaddress.IPv4Address] = set()
    for slot in (0, 1, 2, 4095):
        host, job, prefix = slot_addresses(slot)
        net = ipaddress.ip_interface(f"{host}/{prefix}").network
        assert prefix == 30 and net.subnet_of(JOB_SUBNET)
        assert ipaddress.ip_address(job) in net and host != job
        assert not {ipaddress.ip_address(host), ipaddress.ip_address(job)} & seen
        seen |= {ipaddress.ip_address(host), ipaddress.ip_address(job)}
    assert slot_addresses(1)[0] == "10.213.0.5"
    with pytest.raises(ValueError):
        slot_addresses(JOB_SUBNET.num_addresses // 4)
    with pytest.raises(ValueError):
        slot_addresses(-1)


def test_the_rules_drop_what_jobs_send_the_host_and_each_other():
    rules = ruleset()
    jobs = f'"{LINK_PREFIX}*"'
    assert f"iifname {jobs} drop" in rules  # input: the host's own addresses
    assert f"iifname {jobs} oifname {jobs} drop" in rules  # forward: job to job
    assert f"iifname {jobs} ip daddr 169.254.0.0/16 drop" in rules  # instance metadata
    assert f"ip saddr {JOB_SUBNET} oifname != {jobs} masquerade" in rules
    # one transaction that replaces the table: a second agent's start changes nothing
    assert rules.index("delete table") < rules.index("chain input")


# ---- real agents ---------------------------------------------------------------------------

e2e = pytest.mark.e2e

# Tries each host:port given (2 s each) and says what happened; then proves its own
# loopback works: listens on 127.0.0.1 and connects to itself.
PROBE = textwrap.dedent("""
    import socket, sys
    for target in sys.argv[1:]:
        host, port = target.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            print(target, "connected", flush=True)
        except OSError as exc:
            print(target, "unreachable", type(exc).__name__, flush=True)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    c = socket.create_connection(srv.getsockname(), timeout=2)
    a, _ = srv.accept()
    c.sendall(b"own loopback")
    print(a.recv(100).decode(), "works", flush=True)
""")


def _require_isolated(inst) -> None:
    if os.geteuid() != 0:
        pytest.skip("a root agent's job network: run the tests as root")
    if "network isolated" not in (inst.sandbox or ""):
        unavailable(f"attempts are not isolated here: {inst.sandbox}")


def _host_addresses() -> list[str]:
    """This host's own IPv4 addresses (jobs' veth ends aside)."""
    return sorted(
        a.address
        for name, addrs in psutil.net_if_addrs().items()
        if not name.startswith(LINK_PREFIX)
        for a in addrs
        if a.family == socket.AF_INET
    )


def _job_links() -> list[str]:
    return [n for n in psutil.net_if_addrs() if n.startswith(LINK_PREFIX)]


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("jobnet") / "c") as c:
        server = c.server()
        c.agent(server, name="iso")
        client = c.client(server)
        (inst,) = c.wait_agents_running(client, 1)
        yield c, server, client, inst


@e2e
def test_a_job_reaches_nothing_listening_on_its_host_but_its_own_loopback_works(isolated):
    _c, server, client, inst = isolated
    _require_isolated(inst)
    with listener("0.0.0.0") as (port, peers):
        targets = [f"{addr}:{port}" for addr in _host_addresses()]
        server_port = server.url.rsplit(":", 1)[1].rstrip("/")
        targets.append(f"127.0.0.1:{server_port}")  # the corral server itself
        pg = urlsplit(os.environ.get("CORRAL_TEST_PG_URL") or "")
        if pg.hostname:  # a PostgreSQL with trust authentication on 127.0.0.1
            targets.append(f"{pg.hostname}:{pg.port or 5432}")
        # the second job takes the namespace the first one's slot kept: no less isolated
        for _ in range(2):
            job = client.submit([PY, "-c", PROBE, *targets], max_attempts=1)
            final = ended(client, job.id)
            out = output(client, job.id)
            assert final.state == "succeeded", (final.reason, out)
            for target in targets:
                assert f"{target} unreachable" in out, out
            assert "own loopback works" in out, out
            assert _job_links(), "the slot's namespace (and its veth pair) is kept"
        assert peers == []  # nothing of either job arrived


@e2e
def test_a_job_reaches_another_machine_through_its_hosts_address_but_no_metadata_service(
    isolated,
):
    """Another machine: a network namespace of this test's own behind a veth pair, which
    also answers at a link-local address routed through it, as a cloud's instance
    metadata service answers at 169.254.169.254 with the machine's credentials (not that
    address itself: the machine running the tests may need its own)."""
    _c, _server, client, inst = isolated
    _require_isolated(inst)
    ns = f"corral-t-{secrets.token_hex(3)}"
    outer, inner = f"ct{secrets.token_hex(3)}a", f"ct{secrets.token_hex(3)}b"
    here, there, metadata = "192.168.213.1", "192.168.213.2", "169.254.213.2"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    ip("netns", "add", ns)
    server = None
    try:
        ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
        ip("addr", "add", f"{here}/30", "dev", outer)
        ip("link", "set", outer, "up")
        ip("route", "add", f"{metadata}/32", "via", there)  # goes with the link
        ip("-n", ns, "addr", "add", f"{there}/30", "dev", inner)
        ip("-n", ns, "addr", "add", f"{metadata}/32", "dev", inner)
        ip("-n", ns, "link", "set", inner, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        # the other machine's service: tells each caller the address it came from
        server = subprocess.Popen(
            [
                "ip", "netns", "exec", ns, sys.executable, "-c",
                "import socket; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(); "
                "print(s.getsockname()[1], flush=True)\n"
                "while True:\n"
                "    c, a = s.accept(); c.sendall(a[0].encode()); c.close()",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert server.stdout is not None
        port = int(server.stdout.readline())
        # the host itself reaches both addresses
        for addr in (there, metadata):
            with socket.create_connection((addr, port), timeout=10) as c:
                assert c.recv(100).decode() == here
        job = client.submit([PY, "-c", PROBE_SEEN, there, metadata, str(port)], max_attempts=1)
        final = ended(client, job.id)
        out = output(client, job.id)
        assert final.state == "succeeded", (final.reason, out)
        assert f"{there} seen as {here}" in out, out  # the host's address: NAT
        assert f"{metadata} unreachable" in out, out
    finally:
        if server is not None:
            server.kill()
            server.wait(10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", outer], capture_output=True, timeout=30)


# Connects to each address (the port last) and prints what the service says of it.
PROBE_SEEN = textwrap.dedent("""
    import socket, sys
    *addrs, port = sys.argv[1:]
    for addr in addrs:
        try:
            c = socket.create_connection((addr, int(port)), timeout=3)
            print(addr, "seen as", c.recv(100).decode(), flush=True)
        except OSError as exc:
            print(addr, "unreachable", type(exc).__name__, flush=True)
""")


# Listens on every address of its namespace, says where (the address its packets to
# the world would leave from), and waits for its gate.
LISTENING = textwrap.dedent("""
    import os, socket, sys, time
    s = socket.socket(); s.bind(("0.0.0.0", 0)); s.listen()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.connect(("192.0.2.99", 9))
    print(f"{u.getsockname()[0]}:{s.getsockname()[1]}", flush=True)
    open(sys.argv[1], "w").write(f"{u.getsockname()[0]}:{s.getsockname()[1]}")
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.05)
""")


@e2e
def test_jobs_on_one_host_cannot_reach_each_other_but_the_host_reaches_them(
    isolated, jobfiles: Path
):
    _c, _server, client, inst = isolated
    _require_isolated(inst)
    where, gate = jobfiles / "where", jobfiles / "gate"
    listening = client.submit([PY, "-c", LISTENING, str(where), str(gate)], max_attempts=1)
    try:
        wait_for(lambda: where.exists() and where.read_text(), 30, "the listening job")
        target = where.read_text()
        assert ipaddress.ip_address(target.split(":")[0]) in JOB_SUBNET
        probe = client.submit([PY, "-c", PROBE, target], max_attempts=1)
        final = ended(client, probe.id)
        out = output(client, probe.id)
        assert final.state == "succeeded", (final.reason, out)
        assert f"{target} unreachable" in out, out
        # while the host itself reaches a job's server (an operator's curl to it): the
        # job's answers to a connection the host opened pass
        addr, port = target.split(":")
        with socket.create_connection((addr, int(port)), timeout=5):
            pass
    finally:
        gate.touch()
    assert ended(client, listening.id).state == "succeeded"


@e2e
def test_the_host_network_when_the_operator_asks_for_it(cluster: Cluster):
    server = cluster.server()
    cluster.agent(server, name="hostnet", extra=["--job-network", "host"])
    client = cluster.client(server)
    (inst,) = cluster.wait_agents_running(client, 1)
    assert "network isolated" not in (inst.sandbox or ""), inst.sandbox
    with listener("127.0.0.1") as (port, peers):
        job = client.submit([PY, "-c", PROBE, f"127.0.0.1:{port}"], max_attempts=1)
        final = ended(client, job.id)
        out = output(client, job.id)
        assert final.state == "succeeded", (final.reason, out)
        assert f"127.0.0.1:{port} connected" in out, out
        wait_for(lambda: [p for p, _ in peers] == ["127.0.0.1"], 10, "the job's connection")


# ---- one attempt's network, made and let go (root) -----------------------------------------


def _ip_in(fd: int, *args: str) -> str:
    """`ip ARGS` run in the namespace held by this process's fd. Its netlink socket
    counts in the namespace until the kernel frees it (an RCU grace period after
    `ip` closed it): waited for, so that it does not keep the namespace from being
    handed on."""
    out = subprocess.run(
        ["nsenter", f"--net=/proc/{os.getpid()}/fd/{fd}", "ip", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    wait_for(lambda: not sockets_open(fd), 10, "ip's netlink socket to be freed")
    return out


@pytest.fixture
def slot() -> int:
    if os.geteuid() != 0:
        pytest.skip("network namespaces and veth pairs: run the tests as root")
    return 4000 + os.getpid() % 90  # far above the slots the e2e tests' agents claim


def test_an_attempts_network_is_its_own_and_goes_when_let_go(slot: int):
    net = AttemptNetwork(slot)
    net.create()
    try:
        assert net.fd is not None
        inside = _ip_in(net.fd, "-4", "-o", "addr")
        assert f"{net.job_ip}/30" in inside and "127.0.0.1/8" in inside
        assert "default via " + net.host_ip in _ip_in(net.fd, "route")
        assert "state UP" in _ip_in(net.fd, "link", "show", "eth0")
        here = subprocess.run(
            ["ip", "-4", "-o", "addr", "show", "dev", net.link],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"{net.host_ip}/30" in here
    finally:
        net.close()
    # nothing holds the namespace now: it goes, and the host's end with it
    wait_for(lambda: net.link not in _job_links(), 20, "the host's end to go")


def test_a_slots_namespace_is_kept_for_its_next_attempt_until_forgotten(slot: int, tmp_path):
    kept = str(tmp_path / "kept")
    first = AttemptNetwork(slot, kept_dir=kept)
    try:
        first.create()
        assert first.fd is not None and not first.reused
        made = os.fstat(first.fd).st_ino
        first.close()  # nothing runs in it now: kept all the same
        second = AttemptNetwork(slot, kept_dir=kept)
        second.create()
        try:
            assert second.fd is not None and second.reused
            assert os.fstat(second.fd).st_ino == made
            assert f"{second.job_ip}/30" in _ip_in(second.fd, "-4", "-o", "addr")
            assert "default via " + second.host_ip in _ip_in(second.fd, "route")
        finally:
            second.close()
    finally:
        assert forget_kept(kept, [slot]) == 1
    wait_for(lambda: first.link not in _job_links(), 20, "the host's end to go")
    assert os.listdir(kept) == []


def test_a_kept_namespace_that_is_not_whole_is_made_anew(slot: int, tmp_path):
    kept = str(tmp_path / "kept")
    first = AttemptNetwork(slot, kept_dir=kept)
    try:
        first.create()
        made = os.fstat(first.fd).st_ino
        first.close()
        # someone removed the host's end (and with it the pair): the kept one is broken
        subprocess.run(["ip", "link", "del", first.link], check=True, timeout=30)
        second = AttemptNetwork(slot, kept_dir=kept)
        second.create()
        try:
            assert not second.reused and os.fstat(second.fd).st_ino != made
            assert f"{second.job_ip}/30" in _ip_in(second.fd, "-4", "-o", "addr")
        finally:
            second.close()
        third = AttemptNetwork(slot, kept_dir=kept)
        third.create()  # and the new one is kept in its place
        third.close()
        assert third.reused
    finally:
        forget_kept(kept, [slot])
    wait_for(lambda: first.link not in _job_links(), 20, "the host's end to go")


def _tcp_listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def _udp_bound() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def _abstract_unix_listener() -> socket.socket:
    # an abstract name belongs to the network namespace: the next job could connect to it
    s = socket.socket(socket.AF_UNIX)
    s.bind(f"\0corral-test-{os.getpid()}")
    s.listen(1)
    return s


def _open_inside(netns_fd: int, make: Callable[[], socket.socket]) -> socket.socket:
    """A socket made by `make` in the namespace held by `netns_fd` (on a thread of its
    own that enters it: the socket stays there, the thread ends)."""
    made: list[socket.socket] = []

    def inside() -> None:
        if libc.setns(netns_fd, CLONE_NEWNET) != 0:
            raise OSError("setns failed")
        made.append(make())

    t = threading.Thread(target=inside)
    t.start()
    t.join(timeout=10)
    (sock,) = made
    return sock


@pytest.mark.parametrize("make", [_tcp_listener, _udp_bound, _abstract_unix_listener])
def test_a_kept_namespace_where_a_socket_is_still_open_is_not_handed_on(
    slot: int, tmp_path, make: Callable[[], socket.socket]
):
    """A job may hand a socket of its namespace to a process outside its cgroup (another
    job's, over a unix socket), to listen on the loopback of whoever gets the slot next:
    such a namespace is never handed on."""
    kept = str(tmp_path / "kept")
    first = AttemptNetwork(slot, kept_dir=kept)
    held = None
    try:
        first.create()
        made = os.fstat(first.fd).st_ino
        held = _open_inside(first.fd, make)  # what another process was handed
        first.close()
        second = AttemptNetwork(slot, kept_dir=kept)
        second.create()
        second.close()
        assert not second.reused
        (pin,) = os.listdir(kept)
        assert os.stat(os.path.join(kept, pin)).st_ino != made  # a new one is kept
        held.close()
        held = None
        third = AttemptNetwork(slot, kept_dir=kept)
        third.create()  # the new one, with nothing open in it, is handed on
        third.close()
        assert third.reused
    finally:
        if held is not None:
            held.close()
        forget_kept(kept, [slot])
    wait_for(lambda: first.link not in _job_links(), 20, "the host's end to go")


def test_a_slots_leftover_link_is_replaced(slot: int):
    """The host's end of a slot's earlier namespace that the kernel has not torn down
    yet must not stop the slot's next attempt."""
    first, second = AttemptNetwork(slot), AttemptNetwork(slot)
    first.create()
    try:
        second.create()  # the first's link is still there: replaced
        assert second.fd is not None
        assert f"{second.job_ip}/30" in _ip_in(second.fd, "-4", "-o", "addr")
    finally:
        first.close()
        second.close()
    wait_for(lambda: first.link not in _job_links(), 20, "the host's end to go")


# ---- another firewall that drops forwarded packets (Docker's FORWARD policy) --------------


def test_forward_chains_that_drop_by_default_are_found_in_nfts_listing():
    from corral.agent.sandbox.network import TABLE, dropping_forward_chains

    listing = json.dumps(
        {
            "nftables": [
                {"metainfo": {"version": "1.0.6"}},
                {"chain": {"family": "ip", "table": "filter", "name": "FORWARD",
                           "hook": "forward", "policy": "drop", "prio": 0}},
                {"chain": {"family": "ip", "table": "filter", "name": "DOCKER-USER"}},
                {"chain": {"family": "inet", "table": "fw", "name": "fwd",
                           "hook": "forward", "policy": "accept", "prio": 0}},
                {"chain": {"family": "inet", "table": TABLE, "name": "forward",
                           "hook": "forward", "policy": "drop", "prio": -10}},
            ]
        }
    )  # fmt: skip
    assert dropping_forward_chains(listing) == ["ip filter FORWARD"]
    assert dropping_forward_chains("not json") == []
    facts = SandboxFacts(root=True, cgroup=True, network="isolated", forward_blocked_by=("x",))
    assert any("may reach no other machine" in w for w in describe(facts)[1])


def test_a_dropping_forward_chain_on_the_host_is_found(slot: int):
    """In a namespace of this test's own: its firewall is its own."""
    ns = f"corral-t-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)

    def blockers() -> list[str]:
        r = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c",
             "import json; from corral.agent.sandbox.network import forward_blockers; "
             "print(json.dumps(forward_blockers()))"],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        return json.loads(r.stdout)

    try:
        assert blockers() == []
        rules = (  # Docker's: the FORWARD policy of iptables (nft backend) is DROP
            "table ip filter {\n chain FORWARD {\n"
            "  type filter hook forward priority 0; policy drop;\n }\n}\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True,
            check=True, timeout=30,
        )  # fmt: skip
        assert blockers() == ["ip filter FORWARD"]
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
