"""Each attempt's own network (a root agent's, `--job-network isolated`, the default
where the kernel and nftables allow it): a network namespace of the attempt's own,
with its own loopback, reaching other machines through a veth pair and the host's
NAT, and never the host itself.

Without it, a job reached everything that listens on the host: a PostgreSQL with
`trust` authentication on 127.0.0.1 (corral's own database, in the default set-up),
the server's API, the agent's ports and any other job's. In its namespace, 127.0.0.1
is the job's own; the host's addresses are behind an nftables rule that drops what
comes in from a job's veth, and jobs on one host cannot reach each other.

Each attempt's addresses come from its job user's slot (`jobuser.claim_job_user`: no
two live attempts on the host share one): slot N is the /30 at 10.213.0.0 + 4N, the
host's end .1, the job's .2.

A slot's namespace is kept for the slot's next attempt (pinned by a bind mount in
KEPT_DIR, root's only, named by the host's own network namespace and the slot, as `ip
netns` pins one): making a namespace, its veth pair, addresses and route cost the runner
about 2.3 ms of CPU per attempt (well under 1 ms to check and enter a kept one), and the
kernel more to tear it down again. Reuse is as clean as a new one: a slot is claimed
only once the last attempt's cgroup has no process left (so nothing of it holds a socket
there), and what outlives processes in a namespace (links, addresses, routes, rules,
sysctls) needs CAP_NET_ADMIN over it, which no job has. A kept namespace is checked
before use (both ends of its veth pair there, no socket left in it by the kernel's
count: a job could hand one to a process outside its cgroup) and made anew when it is
not so. Without a v2 cgroup for the attempt (no proof its processes are gone), the
namespace is the attempt's own and goes with its last process. `forget_kept` unpins them
(the agent does not: a kept namespace holds a veth pair and nothing else)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from corral.agent.libc import errno_error, libc
from corral.agent.sandbox.ifioctl import LinkIoctl
from corral.agent.sandbox.netlink import Netlink

T = TypeVar("T")

JOB_SUBNET = ipaddress.IPv4Network("10.213.0.0/16")
TABLE = "corral_jobs"  # the nftables table (family inet) on each host the agent runs on
LINK_PREFIX = "cj-"  # the host's end of an attempt's veth pair: cj-<slot>
JOB_LINK = "eth0"  # the attempt's end, inside its namespace
LOOPBACK = "lo"
CLONE_NEWNET = 0x40000000
KEPT_DIR = "/run/corral-job-netns"  # root's (0700): one bind mount per kept namespace
MS_BIND = 0x1000
MNT_DETACH = 0x2


class NetworkError(OSError):
    """The attempt's network could not be made (the attempt must not run without it)."""


def slot_addresses(slot: int, subnet: ipaddress.IPv4Network = JOB_SUBNET) -> tuple[str, str, int]:
    """(the host's end, the job's end, prefix length) of slot's /30 in `subnet`."""
    base = int(subnet.network_address) + 4 * slot
    if slot < 0 or base + 3 > int(subnet.broadcast_address):
        raise ValueError(f"slot {slot} is outside {subnet}")
    return str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2)), 30


def host_link(slot: int) -> str:
    return f"{LINK_PREFIX}{slot}"


def ruleset(subnet: ipaddress.IPv4Network = JOB_SUBNET) -> str:
    """The host's rules, as one nft transaction (replacing the table atomically): what
    a job sends to any of the host's own addresses is dropped (but its answers to what
    the host itself opened, e.g. an operator's curl to a job's server), jobs cannot reach each
    other nor a link-local address (a cloud's instance metadata service, which hands
    out the machine's credentials, at 169.254.169.254), and what they send elsewhere
    leaves with the host's address."""
    jobs = f'"{LINK_PREFIX}*"'
    return f"""
table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
    chain input {{
        type filter hook input priority filter - 10; policy accept;
        iifname {jobs} ct state established,related accept
        iifname {jobs} drop
    }}
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        iifname {jobs} oifname {jobs} drop
        iifname {jobs} ip daddr 169.254.0.0/16 drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {subnet} oifname != {jobs} masquerade
    }}
}}
"""


def _setns(fd: int) -> None:
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise errno_error("setns")


def _own_netns() -> int:
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


@contextmanager
def _inside(target: int) -> Iterator[None]:
    """This thread in the namespace `target` for the block, then back home."""
    home = _own_netns()
    try:
        _setns(target)
        try:
            yield
        finally:
            _go_home(home)
    finally:
        os.close(home)


def _go_home(home: int) -> None:
    """Back to this thread's own namespace; a thread that cannot get back must not go
    on (its next request would leave from the job's namespace): the process ends."""
    try:
        _setns(home)
    except OSError:
        os._exit(70)


class AttemptNetwork:
    """One attempt's namespace: made by `create` (in the runner, before the command),
    entered by `run_inside` while the command is started, let go by `close`."""

    def __init__(
        self,
        slot: int,
        subnet: ipaddress.IPv4Network = JOB_SUBNET,
        kept_dir: str | None = None,
    ):
        """`kept_dir`: keep the slot's namespace there for its next attempt, and take
        the one kept there (None: the attempt's own, gone with its last process)."""
        self.slot = slot
        self.host_ip, self.job_ip, self.prefix = slot_addresses(slot, subnet)
        self.link = host_link(slot)
        self.kept_dir = kept_dir
        self.fd: int | None = None
        self.reused = False  # the namespace was the slot's kept one

    def create(self) -> None:
        pin = _pin_path(self.kept_dir, self.slot) if self.kept_dir else None
        if pin is not None:
            self.fd = self._kept(pin)
            if self.fd is not None:
                self.reused = True
                return
        self._make()
        if pin is not None and self.fd is not None:
            _keep(self.fd, pin)  # not kept (no mount here): the next attempt makes its own

    def _kept(self, pin: str) -> int | None:
        """The slot's kept namespace when it is whole (both ends of its veth pair are
        there) and no socket in it is open (an earlier job may have handed one to a
        process outside its cgroup, to listen on the next job's loopback); else None,
        and the kept one is unpinned (it goes once that socket is closed)."""
        try:
            fd = os.open(pin, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            with _inside(fd):  # one trip there: the count, then a socket of its own
                if _sockets_here():
                    raise OSError("a socket of an earlier attempt is still open in it")
                inner = LinkIoctl()  # its socket stays in the kept namespace
            with inner, LinkIoctl() as outer:
                inner.index(JOB_LINK)
                outer.index(self.link)
            return fd
        except OSError:  # not a namespace (a file left by a failed mount), or not whole
            os.close(fd)
            _unpin(pin)
            return None

    def _make(self) -> None:
        try:
            fd, inner = self._new_netns()
        except OSError as exc:
            raise NetworkError(f"cannot make the attempt's network: {exc}") from None
        try:
            with inner, Netlink() as rtnl, LinkIoctl() as outer:
                try:
                    rtnl.add_veth(self.link, JOB_LINK, fd)
                except FileExistsError:
                    # the end of an earlier attempt of this slot whose namespace the
                    # kernel has not torn down yet (its processes are gone: the slot
                    # was free)
                    rtnl.delete_link(self.link)
                    rtnl.add_veth(self.link, JOB_LINK, fd)
                outer.add_address(self.link, self.host_ip, self.prefix)
                outer.set_up(self.link)
                inner.add_address(JOB_LINK, self.job_ip, self.prefix)
                inner.set_up(JOB_LINK)
                inner.add_default_route(self.host_ip)
        except OSError as exc:
            os.close(fd)
            raise NetworkError(f"cannot make the attempt's network: {exc}") from None
        self.fd = fd

    @staticmethod
    def _new_netns() -> tuple[int, LinkIoctl]:
        """A new network namespace, held by the returned fd only, with its loopback up
        and no IPv6 on links made in it; and a socket of its own for the links' set-up
        (a socket stays in the namespace it was made in: one trip of this thread there)."""
        home = _own_netns()
        try:
            if libc.unshare(CLONE_NEWNET) != 0:
                raise errno_error("unshare(CLONE_NEWNET)")
            try:
                fd = _own_netns()
                try:
                    inner = LinkIoctl()
                except OSError:
                    os.close(fd)
                    raise
                try:
                    inner.set_up(LOOPBACK)
                    with (
                        contextlib.suppress(OSError),  # no IPv6 in this kernel
                        open("/proc/sys/net/ipv6/conf/default/disable_ipv6", "w") as f,
                    ):
                        f.write("1")
                except OSError:
                    inner.close()
                    os.close(fd)
                    raise
                return fd, inner
            finally:
                _go_home(home)
        finally:
            os.close(home)

    def run_inside(self, start: Callable[[], T]) -> T:
        """Call `start` (which starts the command) with this thread in the attempt's
        namespace: the command is born in it."""
        if self.fd is None:
            raise NetworkError("the attempt's network was not made")
        with _inside(self.fd):
            return start()

    def close(self) -> None:
        """The runner lets go; the namespace lives on while the attempt's processes do
        (and, kept, for the slot's next attempt)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def sockets_open(netns_fd: int) -> bool:
    """Whether any socket exists in the network namespace held by `netns_fd`."""
    with _inside(netns_fd):
        return _sockets_here()


def _sockets_here() -> bool:
    """Whether any socket exists in this thread's network namespace: the kernel counts
    the sockets of each namespace (`sockets: used` of its sockstat), held by a process
    or closing down (a netlink socket counts until an RCU grace period after its
    close). Listing the socket tables instead costs milliseconds: reading them walks
    the host's whole TCP hash table, however few sockets the namespace has."""
    with open("/proc/thread-self/net/sockstat", "rb") as f:
        first = f.readline().split()  # b"sockets: used N"
    if first[:2] != [b"sockets:", b"used"]:
        raise OSError(f"unexpected sockstat line: {b' '.join(first)!r}")
    return int(first[2]) != 0


def _pin_path(kept_dir: str, slot: int) -> str:
    """Where slot's kept namespace is pinned: named by this host's network namespace
    too (hosts of a test bed share one file system, each with a namespace of its own)."""
    return os.path.join(kept_dir, f"{os.stat('/proc/thread-self/ns/net').st_ino}-{slot}")


def _keep(fd: int, pin: str) -> bool:
    """Pin the namespace held by `fd` at `pin` (a bind mount, as `ip netns add`)."""
    try:
        os.makedirs(os.path.dirname(pin), mode=0o700, exist_ok=True)
        os.close(os.open(pin, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except OSError:
        return False
    source = f"/proc/self/fd/{fd}".encode()
    if libc.mount(source, pin.encode(), None, MS_BIND, None) != 0:
        with contextlib.suppress(OSError):
            os.unlink(pin)
        return False
    return True


def _unpin(pin: str) -> None:
    libc.umount2(pin.encode(), MNT_DETACH)  # not a mount (a failed pin's file): nothing
    with contextlib.suppress(OSError):
        os.unlink(pin)


def forget_kept(kept_dir: str = KEPT_DIR, slots: Iterable[int] | None = None) -> int:
    """Unpin kept namespaces (every one in `kept_dir`, of any host, or this host's of
    `slots`); each goes, with its veth pair, once no process is in it. Returns how
    many were unpinned."""
    if slots is not None:
        names = [os.path.basename(_pin_path(kept_dir, n)) for n in slots]
    else:
        try:
            names = os.listdir(kept_dir)
        except OSError:
            return 0
    gone = 0
    for name in names:
        pin = os.path.join(kept_dir, name)
        if os.path.lexists(pin):
            _unpin(pin)
            gone += 1
    return gone


def setup_host(subnet: ipaddress.IPv4Network = JOB_SUBNET) -> str | None:
    """Make this host ready for isolated attempts (root; once at agent start): the
    nftables table, IPv4 forwarding, and a trial namespace with a veth pair. Returns
    None when attempts can be isolated, else why not."""
    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if nft is None:
        return "nftables (nft) is not installed"
    try:
        r = subprocess.run(
            [nft, "-f", "-"],
            input=ruleset(subnet),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nft does not run: {exc}"
    if r.returncode != 0:
        return f"nft refuses the rules: {r.stderr.strip()[:300]}"
    try:
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")
    except OSError as exc:
        return f"cannot turn on IPv4 forwarding: {exc}"
    trial = AttemptNetwork(_trial_slot(subnet), subnet)
    trial.link = f"{LINK_PREFIX}t{os.getpid() % 10**8}"
    try:
        trial.create()
    except NetworkError as exc:
        return str(exc)
    finally:
        trial.close()
    return None


def forward_blockers() -> list[str]:
    """The host's other firewalls that drop forwarded packets by default (Docker sets
    its FORWARD policy to DROP): what an isolated job sends other machines is forwarded,
    and a drop in any table's forward hook is final whatever this agent's table says."""
    found: list[str] = []
    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if nft is not None:
        r = subprocess.run(
            [nft, "-j", "list", "chains"], capture_output=True, text=True, timeout=30, check=False
        )
        if r.returncode == 0:
            found += dropping_forward_chains(r.stdout)
    iptables = shutil.which("iptables-legacy") or shutil.which(
        "iptables-legacy", path="/usr/sbin:/sbin"
    )
    if iptables is not None:  # a legacy (xtables) FORWARD chain, which nft does not list
        r = subprocess.run(
            [iptables, "-S", "FORWARD"], capture_output=True, text=True, timeout=30, check=False
        )
        if r.returncode == 0 and "-P FORWARD DROP" in r.stdout.splitlines():
            found.append("iptables-legacy FORWARD")
    return found


def dropping_forward_chains(nft_json: str) -> list[str]:
    """`family table chain` of each base chain on the forward hook whose policy is drop,
    from `nft -j list chains` (this agent's own table aside)."""
    import json

    try:
        items = json.loads(nft_json).get("nftables", [])
    except (ValueError, AttributeError):
        return []
    out = []
    for item in items:
        chain = item.get("chain") if isinstance(item, dict) else None
        if not isinstance(chain, dict) or chain.get("table") == TABLE:
            continue
        if chain.get("hook") == "forward" and chain.get("policy") == "drop":
            out.append(f"{chain.get('family')} {chain.get('table')} {chain.get('name')}")
    return out


def _trial_slot(subnet: ipaddress.IPv4Network) -> int:
    """The subnet's last /30, which no job user's slot reaches (MAX_USER_SLOTS)."""
    return subnet.num_addresses // 4 - 1


def remove_host_rules() -> None:
    """Remove the nftables table (tests, and hosts that give up isolated attempts)."""
    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if nft is not None:
        subprocess.run([nft, "delete", "table", "inet", TABLE], capture_output=True, check=False)
