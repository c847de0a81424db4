"""A multi-host test bed on one Linux machine, for tests of SSH fleets and of
everything corral does across hosts (peer copies, drains, partitions, upgrades).

    with TestBed(tmp_path / "bed", hosts=3) as bed:
        server = cluster.server(host=bed.server_addr)   # the server on the bridge
        bed.hosts[0].partition()                        # its veth goes down
        bed.hosts[0].heal()
        bed.hosts[0].block(bed.hosts[1])                # these two cannot reach each other

Each host is a network namespace with its own address on a bridge (a veth pair each),
running the distribution's OpenSSH server (`sshd -D` inside `ip netns exec`) with a host
key the bed generates and one authorized key (the bed's client key), root login by key
only, in a config of its own. The root namespace holds the bridge's first address,
where the server listens. Nothing is routed anywhere else: traffic stays on the bridge.

Namespaces share the filesystem, so each host has its own install prefix and data dir
under the bed's directory. Every name starts with a tag (`crl` + the owning pid +
random), so `close()` removes exactly what it made (processes in the namespaces,
namespaces, links, bridge), also after a failure, and `clean_stale()` removes what a
crashed run left behind (its pid is gone).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

import corral

TAG = "crl"
SSHD = "/usr/sbin/sshd"
_PID36 = 5  # base-36 digits of the owning pid in every name


def _b36(n: int, width: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out.rjust(width, "0")[-width:]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r


def unavailable() -> str | None:
    """Why a bed cannot be built on this machine, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "no `ip` command (install iproute2)"
    if not os.access(SSHD, os.X_OK):
        return f"no OpenSSH server at {SSHD} (install openssh-server)"
    probe = f"{TAG}{_b36(os.getpid(), _PID36)}pr"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def clean_stale() -> list[str]:
    """Remove the namespaces, links and processes of beds whose owner died."""

    def owner_gone(name: str) -> bool:
        try:
            pid = int(name[len(TAG) : len(TAG) + _PID36], 36)
        except ValueError:
            return False
        return not psutil.pid_exists(pid) or pid == 0

    removed = []
    for ns in _netns_names():
        if ns.startswith(TAG) and owner_gone(ns):
            _kill_in(ns)
            _ip("netns", "del", ns, check=False)
            removed.append(ns)
    for link in _link_names():
        if link.startswith(TAG) and owner_gone(link):
            _ip("link", "del", link, check=False)
            removed.append(link)
    return removed


def _netns_names() -> list[str]:
    r = _ip("-j", "netns", "list", check=False)
    try:
        return [n["name"] for n in json.loads(r.stdout or "[]")]
    except ValueError:
        return []


def _link_names() -> list[str]:
    r = _ip("-j", "link", "show", check=False)
    try:
        return [link["ifname"] for link in json.loads(r.stdout or "[]")]
    except ValueError:
        return []


def _pids_in(ns: str) -> list[int]:
    r = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def _kill_in(ns: str, timeout: float = 10.0) -> None:
    """Kill every process in the namespace and wait until they are gone (a zombie,
    dead but not yet reaped by its parent, counts as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in _pids_in(ns):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE:
                    proc.kill()
                    alive.append(pid)
        if not alive or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0/13 that no address or route here overlaps."""
    used: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for args in (("-4", "-j", "addr", "show"), ("-4", "-j", "route", "show", "table", "all")):
        try:
            rows = json.loads(_ip(*args, check=False).stdout or "[]")
        except ValueError:
            rows = []
        for row in rows:
            used.extend(
                ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", False)
                for info in row.get("addr_info", [])
            )
            dst = row.get("dst")
            if dst and dst != "default":
                with contextlib.suppress(ValueError):
                    used.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", False))
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.{random.randint(200, 207)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.200.0.0/13 subnet for the test bed")


def keypair(path: Path) -> str:
    """An ed25519 key (OpenSSH format) at `path`; returns its public line."""
    import asyncssh

    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    os.chmod(path, 0o600)
    public = key.export_public_key().decode().split()[:2]
    path.with_suffix(".pub").write_text(" ".join(public) + "\n")
    return " ".join(public)


def agent_build(version: str) -> bytes:
    """An agent build for the bed's hosts: it runs this interpreter's corral (the code
    under test), like the wrapper a real fleet would publish."""
    root = Path(corral.__file__).resolve().parent.parent
    return (
        f"#!/bin/sh\n# corral agent {version} (test bed build)\n"
        f"export PYTHONPATH={root}\n"
        f'exec {sys.executable} -m corral.agent "$@"\n'
    ).encode()


class Host:
    """One host of the bed: a network namespace with sshd on its own address."""

    def __init__(self, bed: TestBed, index: int, addr: str):
        self.bed = bed
        self.index = index
        self.name = f"h{index}"
        self.ns = f"{bed.tag}n{index}"
        self.veth = f"{bed.tag}v{index}"  # the root namespace's end
        self.addr = addr
        self.dir = bed.base / "hosts" / self.name
        self.prefix = self.dir / "bin"  # where the agent build is installed
        self.data_root = self.dir / "data"  # one data dir per instance under it
        self.etc = self.dir / "ssh"
        self.sshd: subprocess.Popen | None = None
        self.host_key_line = ""
        self.blocked: set[str] = set()

    # -- the fleet file and known_hosts ----------------------------------------------------

    def fleet_host(self, **settings) -> dict:
        """This host as an entry of an SSH fleet file's `hosts`."""
        return {
            "host": self.addr,
            "user": "root",
            "identity_file": str(self.bed.client_key),
            "prefix": str(self.prefix),
            "data_dir": str(self.data_root),
            **settings,
        }

    @property
    def ref(self) -> str:
        return f"ssh:root@{self.addr}:22"

    def known_hosts_line(self) -> str:
        return f"{self.addr} {self.host_key_line}"

    def data_dir(self, instance: str) -> Path:
        return self.data_root / instance

    # -- processes ---------------------------------------------------------------------------

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, *argv],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def pids(self) -> list[int]:
        """Processes living in this host's namespace (sshd, agents, runners, jobs)."""
        out = []
        for pid in _pids_in(self.ns):
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
        return out

    def processes(self, word: str) -> list[psutil.Process]:
        """Live processes in the namespace whose command line contains `word`."""
        out = []
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if word in " ".join(p.cmdline()):
                    out.append(p)
        return out

    def write_sshd_config(self) -> Path:
        self.etc.mkdir(parents=True, exist_ok=True)
        authorized = self.etc / "authorized_keys"
        authorized.write_text(self.bed.client_public + "\n")
        os.chmod(authorized, 0o600)
        config = self.etc / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.addr}",
                    "Port 22",
                    f"HostKey {self.etc / 'host_key'}",
                    f"PidFile {self.etc / 'sshd.pid'}",
                    f"AuthorizedKeysFile {authorized}",
                    "AllowUsers root",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "PrintMotd no",
                    "AllowTcpForwarding yes",
                    "X11Forwarding no",
                    "LogLevel VERBOSE",
                    "Subsystem sftp internal-sftp",
                    "",
                ]
            )
        )
        return config

    def rekey(self) -> str:
        """A new host key (as a reinstalled machine, or an impostor, would have);
        takes effect at the next start of sshd."""
        key = self.etc / "host_key"
        key.unlink(missing_ok=True)
        key.with_suffix(".pub").unlink(missing_ok=True)
        self.host_key_line = keypair(key)
        return self.host_key_line

    def start_sshd(self) -> None:
        config = self.write_sshd_config()
        if not (self.etc / "host_key").exists():
            self.rekey()
        check = self.run(SSHD, "-t", "-f", str(config))
        if check.returncode != 0:
            raise RuntimeError(f"sshd config of {self.name}: {check.stderr.strip()}")
        log = open(self.etc / "sshd.log", "ab")  # noqa: SIM115 - the child keeps it
        self.sshd = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, SSHD, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 15
        while True:
            if self.sshd.poll() is not None:
                raise RuntimeError(f"sshd of {self.name} exited: {self.sshd_log()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection((self.addr, 22), 0.5):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd of {self.name} does not listen on {self.addr}:22")
            time.sleep(0.05)

    def stop_sshd(self) -> None:
        if self.sshd is not None and self.sshd.poll() is None:
            self.sshd.send_signal(signal.SIGTERM)
            try:
                self.sshd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.sshd.kill()
                self.sshd.wait(timeout=10)
        self.sshd = None

    def sshd_log(self) -> str:
        try:
            return (self.etc / "sshd.log").read_text(errors="replace")
        except OSError:
            return ""

    def logins(self) -> int:
        """Successful SSH logins to this host so far (from sshd's log)."""
        return self.sshd_log().count("Accepted publickey for root")

    # -- partitions ----------------------------------------------------------------------------

    def partition(self) -> None:
        """Cut this host off from everything (its veth goes down)."""
        _ip("link", "set", self.veth, "down")

    def heal(self) -> None:
        _ip("link", "set", self.veth, "up")

    def block(self, other: Host) -> None:
        """This host and `other` can no longer reach each other (both still reach
        the server and the rest)."""
        for a, b in ((self, other), (other, self)):
            _ip("-n", a.ns, "route", "add", "prohibit", f"{b.addr}/32")
            a.blocked.add(b.addr)

    def unblock(self, other: Host) -> None:
        for a, b in ((self, other), (other, self)):
            _ip("-n", a.ns, "route", "del", "prohibit", f"{b.addr}/32", check=False)
            a.blocked.discard(b.addr)


class TestBed:
    """N hosts on a bridge; `close()` (or leaving the `with`) removes everything."""

    __test__ = False  # not a pytest test class

    def __init__(self, base: Path, hosts: int = 3):
        self.base = Path(base)
        self.count = hosts
        self.tag = f"{TAG}{_b36(os.getpid(), _PID36)}{_b36(random.randrange(36**2), 2)}"
        self.bridge = f"{self.tag}b"
        self.hosts: list[Host] = []
        self.subnet: ipaddress.IPv4Network | None = None
        self.server_addr = ""
        self.client_key = self.base / "client_key"
        self.client_public = ""

    def __enter__(self) -> TestBed:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        why = unavailable()
        if why:
            raise RuntimeError(why)
        clean_stale()
        self.base.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        self.client_public = keypair(self.client_key)
        self.subnet = _free_subnet()
        addrs = list(self.subnet.hosts())
        self.server_addr = str(addrs[0])
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.server_addr}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(1, self.count + 1):
            self.add_host(str(addrs[9 + i]))

    def add_host(self, addr: str | None = None) -> Host:
        if self.subnet is None:
            raise RuntimeError("the bed is not started")
        index = len(self.hosts) + 1
        host = Host(self, index, addr or str(list(self.subnet.hosts())[9 + index]))
        self.hosts.append(host)
        peer = f"{self.tag}p{index}"
        _ip("netns", "add", host.ns)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", host.ns)
        _ip("link", "set", host.veth, "master", self.bridge, "up")
        _ip("-n", host.ns, "link", "set", peer, "name", "eth0")
        _ip("-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
        _ip("-n", host.ns, "link", "set", "eth0", "up")
        _ip("-n", host.ns, "link", "set", "lo", "up")
        host.start_sshd()
        return host

    def known_hosts(self, path: Path, hosts: list[Host] | None = None) -> Path:
        """Write a known_hosts file with these hosts' keys (default: all)."""
        path.write_text("".join(h.known_hosts_line() + "\n" for h in hosts or self.hosts))
        return path

    def close(self) -> None:
        """Kill every process in the bed's namespaces, delete them, their links and
        the bridge. Safe to call more than once, and after a partial start."""
        for host in self.hosts:
            host.stop_sshd()
        for host in self.hosts:
            _kill_in(host.ns)
            _ip("netns", "del", host.ns, check=False)
        # the agents killed with their hosts leave their attempts' cgroups and their
        # root-owned jobs directories outside the bed (/var/tmp)
        from corral.testing import remove_agent_sandbox

        for host in self.hosts:
            if host.data_root.is_dir():
                for d in host.data_root.iterdir():
                    if d.is_dir():
                        remove_agent_sandbox(d, keep_under=host.data_root)
        for link in _link_names():
            if link.startswith(self.tag):
                _ip("link", "del", link, check=False)
        for ns in _netns_names():
            if ns.startswith(self.tag):
                _ip("netns", "del", ns, check=False)

    def leftovers(self) -> list[str]:
        """Namespaces and links of this bed that still exist (none after close)."""
        return [n for n in _netns_names() + _link_names() if n.startswith(self.tag)]
