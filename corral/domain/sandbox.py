"""The attempt sandbox's pure decisions: where this host's cgroups are, which
controllers an attempt's limits go through, how the sandbox is described to people,
what the kernel's counters say about an attempt, how a job's environment is built,
and how a log is cut at its limit. No I/O: the agent reads the files and passes
their text in."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_LOG_LIMIT = 64 * 2**20
DEFAULT_JOB_USER = "corral-job"
LIMIT_CONTROLLERS = ("memory", "cpu")  # the limits a job asks for (--memory, --cpus)
# and the one every attempt gets: a ceiling on its processes and threads, so a fork
# bomb takes down its own attempt, not the host (the agent's own group has one too)
PIDS = "pids"
CGROUP_CONTROLLERS = (*LIMIT_CONTROLLERS, PIDS)
DEFAULT_MAX_PIDS = 4096  # per attempt: threads count (PyTorch's pools included)
# a root agent's attempts: "isolated" (a network namespace each, other machines through
# the host's NAT, never the host itself) or "host" (the host's own network)
JOB_NETWORKS = ("isolated", "host")
DEFAULT_JOB_NETWORK = "isolated"
CPU_PERIOD_US = 100_000


# ---- where the cgroups are -----------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    mountpoint: str
    fstype: str
    super_options: frozenset[str]


def _unescape(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    out, i = [], 0
    while i < len(path):
        code = path[i + 1 : i + 4]
        if path[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """/proc/self/mountinfo: `id parent maj:min root mountpoint opts [tags] - fstype src
    superopts`."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        mounts.append(Mount(_unescape(fields[4]), rest[0], frozenset(rest[2].split(","))))
    return mounts


def slow_group_moves(mounts: Iterable[Mount]) -> bool:
    """Whether moving a process into a cgroup waits for an RCU grace period here: the
    kernel's cgroup-wide lock for moves is cheap to take only while a cgroup2 mount has
    `favordynmods` (Linux 6.0+); otherwise the first move after a quiet spell waits
    (8-30 ms measured), and every attempt's command starts that much later."""
    return any(m.fstype == "cgroup2" and "favordynmods" not in m.super_options for m in mounts)


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/self/cgroup: `0::/path` (the v2 group, key "") and `N:ctrl,ctrl:/path`
    (v1 hierarchies, one key per controller; `name=systemd` is skipped)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            out[""] = path
            continue
        for c in controllers.split(","):
            if c and not c.startswith("name="):
                out[c] = path
    return out


@dataclass(frozen=True)
class CgroupLayout:
    """This process's own groups: its v2 group's directory (None without a cgroup2
    mount) and, per v1 controller, its group's directory in that hierarchy."""

    v2_dir: str | None
    v1_dirs: Mapping[str, str] = field(default_factory=dict)

    @property
    def hybrid(self) -> bool:
        return self.v2_dir is not None and bool(self.v1_dirs)


def _join(mountpoint: str, path: str) -> str:
    path = path.strip("/")
    return mountpoint.rstrip("/") + ("/" + path if path else "") or "/"


def cgroup_layout(mountinfo: str | list[Mount], proc_cgroup: str) -> CgroupLayout:
    """`mountinfo`: its text, or its mounts parsed already."""
    own = parse_proc_cgroup(proc_cgroup)
    v2_dir = None
    v1: dict[str, str] = {}
    mounts = parse_mountinfo(mountinfo) if isinstance(mountinfo, str) else mountinfo
    for m in mounts:
        if m.fstype == "cgroup2" and v2_dir is None and "" in own:
            v2_dir = _join(m.mountpoint, own[""])
        elif m.fstype == "cgroup":
            for c in CGROUP_CONTROLLERS:
                if c in m.super_options and c in own and c not in v1:
                    v1[c] = _join(m.mountpoint, own[c])
    return CgroupLayout(v2_dir, v1)


def parse_controllers(text: str) -> frozenset[str]:
    """cgroup.controllers / cgroup.subtree_control: space-separated names."""
    return frozenset(text.split())


@dataclass(frozen=True)
class LimitPlan:
    """Where each limit goes: "v2", "v1", or None (not enforceable here)."""

    memory: str | None
    cpu: str | None
    pids: str | None = None

    def enforced(self, memory_mb: int, cpus: float) -> str:
        """What an attempt asking for `memory_mb` and `cpus` actually gets, for its
        record ("memory, cpu", "cpu", or "none: ..." saying why)."""
        parts = []
        if memory_mb and self.memory:
            parts.append("memory")
        if cpus and self.cpu:
            parts.append("cpu")
        if parts:
            return ", ".join(parts)
        if not memory_mb and not cpus:
            return "none requested"
        return "none: no usable memory or cpu cgroup controller"


def plan_limits(v2_enabled: frozenset[str], v1_usable: frozenset[str]) -> LimitPlan:
    """v2 controllers enabled for the agent's attempts win; the v1 hierarchies of a
    hybrid host are next; otherwise a limit is recorded as not enforced."""

    def pick(c: str) -> str | None:
        if c in v2_enabled:
            return "v2"
        if c in v1_usable:
            return "v1"
        return None

    return LimitPlan(memory=pick("memory"), cpu=pick("cpu"), pids=pick(PIDS))


def pids_ceilings(pid_max: int, per_attempt: int) -> tuple[int, int]:
    """(all of an agent's attempts together, one attempt): the host keeps half of its
    process ids whatever the jobs do; an attempt gets `per_attempt` of them, or the
    agent's whole share when `per_attempt` is 0 or more than that."""
    total = max(1, pid_max // 2)
    return total, min(per_attempt, total) if per_attempt > 0 else total


def attempts_memory_ceiling(host_mb: int, offered_mb: int) -> int:
    """What all of an agent's attempts together may use (MB): the memory the agent
    offers to jobs (`--memory`), and never more than the host less what its own
    processes need (a tenth, at least 512 MB): a job that set no --memory is OOM-killed
    inside the attempts' group instead of the host's OOM killer choosing among the
    agent, the server and the database."""
    keep = max(512, host_mb // 10)
    return max(64, min(offered_mb or host_mb, host_mb - keep))


# ---- how the sandbox is described ------------------------------------------------------------


@dataclass(frozen=True)
class SandboxFacts:
    """What the agent found at start."""

    root: bool
    cgroup: bool  # an agent-owned v2 group with one child per attempt
    cgroup_kill: bool = True  # cgroup.kill exists (else freeze, SIGKILL, thaw)
    limits: LimitPlan = LimitPlan(None, None)
    shared_memory_mb: int = 0  # all attempts together (attempts_memory_ceiling)
    job_user: str | None = None
    namespaces: bool = False  # user, mount and pid namespaces (bubblewrap)
    cgroup_error: str | None = None
    namespace_error: str | None = None
    network: str | None = None  # "isolated": a namespace per attempt | "host" (root agents)
    network_error: str | None = None  # why attempts share the host's network
    # the host's resolvers, when every one is on its loopback (out of an isolated job's reach)
    loopback_resolvers: tuple[str, ...] = ()
    # other firewalls' forward chains that drop by default (isolated jobs' traffic out)
    forward_blocked_by: tuple[str, ...] = ()


def describe(f: SandboxFacts) -> tuple[str, list[str]]:
    """A one-line description for `corral instances`, and the warnings an operator
    must see once (what this host cannot isolate)."""
    parts = []
    if f.cgroup:
        parts.append("cgroup v2" if f.cgroup_kill else "cgroup v2 (freeze+kill)")
    else:
        parts.append("subreaper")
    limits = [f"{c} {getattr(f.limits, c)}" for c in CGROUP_CONTROLLERS if getattr(f.limits, c)]
    parts.append("limits " + (",".join(limits) if limits else "off"))
    if f.shared_memory_mb:
        parts.append(f"jobs share {f.shared_memory_mb} MB")
    if f.job_user:
        parts.append(f"user {f.job_user}")
    if f.namespaces:
        parts.append("namespaces")
    if f.network:
        parts.append(f"network {f.network}")
    warnings = []
    if not f.cgroup:
        warnings.append(
            "no cgroup v2 group for attempts"
            + (f" ({f.cgroup_error})" if f.cgroup_error else "")
            + (
                ": attempts are contained by their pid namespace (all of it dies with its "
                "runner) and a subreaper runner"
                if f.namespaces
                else ": attempts are contained by a subreaper runner only; after a runner "
                "crash, a process that left its session can survive it"
            )
        )
    missing = [c for c in LIMIT_CONTROLLERS if not getattr(f.limits, c)]
    if missing:
        warnings.append(
            f"--{' and --'.join('memory' if c == 'memory' else 'cpus' for c in missing)} "
            f"not enforced: no usable {' or '.join(missing)} cgroup controller"
        )
    if f.cgroup and not f.limits.pids:
        warnings.append(
            "no usable pids cgroup controller: an attempt's processes are not capped "
            "(a fork bomb can use up this host's process ids)"
        )
    if not f.root and not f.namespaces:
        warnings.append(
            "jobs run as the agent's own user without namespaces"
            + (f" ({f.namespace_error})" if f.namespace_error else "")
            + ": a job can read the agent's data dir (its credential, other attempts' "
            "tokens and outputs) and see and signal its processes"
        )
    if f.network == "host":
        warnings.append(
            "jobs share the host's network"
            + (f" ({f.network_error})" if f.network_error else " (--job-network host)")
            + ": what listens on this host (its database, the server, other jobs) is "
            "within a job's reach"
        )
    if f.network == "isolated" and f.loopback_resolvers:
        warnings.append(
            "jobs cannot resolve names: /etc/resolv.conf names only resolvers on this "
            f"host's loopback ({', '.join(f.loopback_resolvers)}), which an isolated job "
            "cannot reach; name the upstream resolvers there (e.g. systemd-resolved's "
            "/run/systemd/resolve/resolv.conf) or use --job-network host"
        )
    if f.network == "isolated" and f.forward_blocked_by:
        warnings.append(
            "jobs may reach no other machine: another firewall drops forwarded packets by "
            f"default ({', '.join(f.forward_blocked_by)}, e.g. Docker's); accept what comes "
            "in from the jobs' links there (interfaces cj-*) or use --job-network host"
        )
    return "; ".join(parts), warnings


def loopback_resolvers(resolv_conf: str) -> tuple[str, ...]:
    """The nameservers of a resolv.conf when all of them are loopback addresses (an
    isolated job's 127.0.0.1 is its own), else ()."""
    servers = []
    for line in resolv_conf.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            servers.append(fields[1])
    try:
        if servers and all(ipaddress.ip_address(s.split("%")[0]).is_loopback for s in servers):
            return tuple(servers)
    except ValueError:
        return ()
    return ()


# ---- what the kernel says about an attempt ---------------------------------------------------


def parse_flat_keyed(text: str) -> dict[str, int]:
    """`key value` lines (memory.events, cpu.stat, memory.oom_control, memory.stat)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def oom_reason(limit_mb: int) -> str:
    return f"killed: out of memory (limit {limit_mb} MB)"


def not_found_reason(command: str, path: str) -> str:
    """Why a command did not start, and what to do. The job's PATH is shown only when it
    is the minimal default (one the job set may have come from a secret)."""
    if "/" in command:
        return f"command not found: {command} (no such file)"
    where = f"the job's PATH, {path}" if path == MINIMAL_PATH else "the job's PATH"
    return f"command not found: {command} (not on {where}; give its full path, or set PATH with -e)"


def command_result(
    returncode: int, oom_kills: int, memory_limit_mb: int, shared_mb: int = 0
) -> tuple[int, str | None]:
    """(exit code, reason) of a command from its wait status (negative: the signal
    that killed it) and the cgroup's OOM-kill count. `shared_mb`: what all of the
    agent's attempts together may use (0: nothing caps them but the host)."""
    code = returncode if returncode >= 0 else 128 - returncode
    if oom_kills and memory_limit_mb and code != 0:
        return code, oom_reason(memory_limit_mb)
    if oom_kills and code != 0 and shared_mb:
        return code, (
            f"killed: out of memory (the job set no --memory; this instance's jobs "
            f"share {shared_mb} MB)"
        )
    if oom_kills and code != 0:  # the kernel's OOM killer, for the host's memory
        return code, "killed: out of memory (the host's: the job set no --memory)"
    if returncode < 0:
        return code, f"killed by signal {signal_name(-returncode)}"
    return code, None


def signal_name(n: int) -> str:
    import signal

    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def cpu_max_v2(cpus: float) -> str:
    return f"{max(1000, round(cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}"


def cpu_quota_v1(cpus: float) -> int:
    return max(1000, round(cpus * CPU_PERIOD_US))


# ---- the job's environment ------------------------------------------------------------------


def job_environment(
    job_env: Mapping[str, str], corral_vars: Mapping[str, str], home: str, user: str
) -> dict[str, str]:
    """Built from scratch: a minimal PATH, HOME, LANG and TMPDIR, the job's own
    variables (which may override those), then the CORRAL_* job variables (which
    nothing overrides). Never the agent's environment."""
    base = {
        "PATH": MINIMAL_PATH,
        "HOME": home,
        "LANG": "C.UTF-8",
        "TMPDIR": home.rstrip("/") + "/tmp",  # noqa: S108 - the job's private dir
        "USER": user,
        "LOGNAME": user,
    }
    return {**base, **dict(job_env), **dict(corral_vars)}


# ---- logs -------------------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def log_marker(limit: int) -> bytes:
    return f"[corral: log truncated after {human_bytes(limit)}]\n".encode()


def cut_log(used: int, limit: int, data: bytes) -> tuple[bytes, bool]:
    """What of `data` an attempt's log keeps after `used` bytes: all of it while it
    fits; at the limit, what fits plus the marker; after that, nothing. Returns
    (kept, cut): `cut` once the log ends with the marker. `used` counts the marker once
    it is written, so a log that filled its limit exactly (`used == limit`) has no
    marker yet: the next byte past it brings the marker."""
    if used > limit:
        return b"", True
    if used == limit:
        return (log_marker(limit), True) if data else (b"", False)
    room = limit - used
    if len(data) <= room:
        return data, False
    return data[:room] + log_marker(limit), True


# ---- text a job hands in ----------------------------------------------------------------------


def text_problem(value: str) -> str | None:
    """Why `value` cannot be passed to a process (argv, environment), or None."""
    if "\0" in value:
        return "contains a NUL byte"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    return None
