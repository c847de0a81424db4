"""What this host lets the agent do for its attempts, found once at agent start:
cgroups (detected, never assumed), the job user (root agents), or user, mount and pid
namespaces through bubblewrap (agents that are not root). The result travels in each
attempt's spec, so a runner never detects anything itself."""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from corral.agent.sandbox import cgroups, network
from corral.agent.sandbox.jobuser import USER_SLOTS_DIR, ensure_job_user
from corral.domain.sandbox import (
    DEFAULT_JOB_NETWORK,
    DEFAULT_JOB_USER,
    DEFAULT_MAX_PIDS,
    SandboxFacts,
    describe,
    loopback_resolvers,
)

JOBS_TMP = Path("/var/tmp")  # noqa: S108 - a root-owned 0711 directory is made in it


class SandboxError(Exception):
    """The agent cannot set up what it must (e.g. a job user for a root agent)."""


@dataclass
class Host:
    mode: str  # "user": root, jobs as the job user | "namespaces": bwrap | "plain"
    jobs_dir: str
    user: str
    uid: int
    gid: int
    cgroups: cgroups.Cgroups | None = None
    bwrap: str | None = None
    hide: list[str] = field(default_factory=list)
    setpriv: str | None = None  # util-linux setpriv, checked to drop to the job user
    # where each attempt claims a job user of its own (`user`-N, jobuser.claim_job_user);
    # None: every attempt runs as `user`
    user_slots: str | None = None
    # "isolated": each attempt in a network namespace of its own (network.AttemptNetwork,
    # needs user_slots); "host": the host's network
    network: str = "host"
    description: str = ""
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "jobs_dir": self.jobs_dir,
            "user": self.user,
            "uid": self.uid,
            "gid": self.gid,
            "cgroups": self.cgroups.to_json() if self.cgroups else None,
            "bwrap": self.bwrap,
            "hide": self.hide,
            "setpriv": self.setpriv,
            "user_slots": self.user_slots,
            "network": self.network,
        }

    @classmethod
    def from_json(cls, d: dict) -> Host:
        return cls(
            mode=d["mode"],
            jobs_dir=d["jobs_dir"],
            user=d["user"],
            uid=d["uid"],
            gid=d["gid"],
            cgroups=cgroups.Cgroups.from_json(d.get("cgroups")),
            bwrap=d.get("bwrap"),
            hide=list(d.get("hide") or []),
            setpriv=d.get("setpriv"),
            user_slots=d.get("user_slots"),
            network=d.get("network") or "host",
        )

    def close(self) -> None:
        if self.cgroups is not None:
            self.cgroups.close()
        try:
            os.rmdir(self.jobs_dir)  # only when no attempt's directory is left
        except OSError:
            pass


def default_jobs_dir(data_dir: Path, root: bool) -> Path:
    """Where attempts' private directories go. A root agent's data dir stays 0700, so
    its jobs live in a root-owned, traverse-only directory of their own; an agent
    that is not root hides its data dir from jobs with a mount namespace instead."""
    if root:
        return JOBS_TMP / f"{cgroups.agent_key(data_dir)}-jobs"
    return data_dir / "jobs"


def probe_bwrap() -> tuple[str | None, str | None]:
    """(bwrap path, None) if user, mount and pid namespaces work; else (None, why)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None, "bubblewrap (bwrap) is not installed"
    try:
        r = subprocess.run(
            [bwrap, *namespace_args([]), "--", "true"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"bwrap does not run: {exc}"
    if r.returncode != 0:
        return None, f"the kernel refuses unprivileged namespaces: {r.stderr.strip()[:300]}"
    return bwrap, None


def setpriv_args(setpriv: str, uid: int, gid: int) -> list[str]:
    """The prefix that runs a command as uid/gid with no supplementary group (real,
    effective and saved ids alike: it cannot become root again)."""
    return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]


def probe_setpriv(uid: int, gid: int) -> str | None:
    """setpriv's path if it drops a root process to uid/gid as the job needs (all
    three ids of each, no group left); else None: the runner drops the user itself
    between fork and exec (a full fork of the runner per command)."""
    setpriv = shutil.which("setpriv") or shutil.which("setpriv", path="/usr/bin:/bin")
    if setpriv is None:
        return None
    cat = shutil.which("cat", path="/usr/bin:/bin")
    if cat is None:
        return None
    try:
        r = subprocess.run(
            [*setpriv_args(setpriv, uid, gid), cat, "/proc/self/status"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    status = dict(line.split(":", 1) for line in r.stdout.splitlines() if line.count(":") >= 1)
    ok = (
        r.returncode == 0
        and status.get("Uid", "").split() == [str(uid)] * 4
        and status.get("Gid", "").split() == [str(gid)] * 4
        and status.get("Groups", "").split() == []
        and int(status.get("CapEff", "1").strip() or "1", 16) == 0
    )
    return setpriv if ok else None


def namespace_args(hide: list[str]) -> list[str]:
    """bubblewrap options for a job: its own user, pid, ipc and uts namespaces, the
    host's files read-only, a private /tmp, /proc of its own pid namespace, the
    agent's directories hidden; it dies with its runner."""
    args = [
        "--die-with-parent",
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",  # noqa: S108 - a private tmpfs inside the namespace
    ]
    for path in hide:
        if os.path.isdir(path):
            args += ["--tmpfs", path]
        elif os.path.exists(path):  # a file (e.g. the join token's): an empty one instead
            args += ["--ro-bind", "/dev/null", path]
    return args


def _own_dir(path: Path, mode: int) -> None:
    """Make `path` a directory this process owns, with `mode`, refusing a symlink or
    a directory someone else made (e.g. planted in /var/tmp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise SandboxError(f"{path} is not a directory owned by this user; remove it")
    os.chmod(path, mode)


def _loopback_resolvers() -> tuple[str, ...]:
    try:
        return loopback_resolvers(Path("/etc/resolv.conf").read_text())
    except OSError:
        return ()


def detect(
    data_dir: Path,
    job_user: str = DEFAULT_JOB_USER,
    jobs_dir: Path | None = None,
    hide: list[Path] | None = None,
    max_pids: int = DEFAULT_MAX_PIDS,
    job_network: str = DEFAULT_JOB_NETWORK,
    memory_mb: int = 0,
) -> Host:
    root = os.geteuid() == 0
    os.chmod(data_dir, 0o700)  # nothing of the agent is for jobs to read
    cg, cg_error = cgroups.detect(cgroups.agent_key(data_dir), max_pids, memory_mb)
    contained = SandboxFacts(  # what the cgroups give, whoever the agent runs as
        root=root,
        cgroup=cg is not None,
        cgroup_kill=cg.kill_file if cg else True,
        limits=cg.limits if cg else cgroups.LimitPlan(None, None),
        shared_memory_mb=cg.memory_mb if cg else 0,
        cgroup_error=cg_error,
    )
    jobs = jobs_dir or default_jobs_dir(data_dir, root)
    if root:
        try:
            user = ensure_job_user(job_user)
        except Exception as exc:
            raise SandboxError(str(exc)) from None
        _own_dir(jobs, 0o711)  # the job user may enter its own directory, list nothing
        host = Host("user", str(jobs), user.name, user.uid, user.gid, cg)
        host.setpriv = probe_setpriv(user.uid, user.gid)
        host.user_slots = USER_SLOTS_DIR
        net_error = network.setup_host() if job_network == "isolated" else None
        host.network = "isolated" if job_network == "isolated" and net_error is None else "host"
        isolated = host.network == "isolated"
        facts = dataclasses.replace(
            contained,
            job_user=f"{user.name}-N",
            network=host.network,
            network_error=net_error,
            loopback_resolvers=_loopback_resolvers() if isolated else (),
            forward_blocked_by=tuple(network.forward_blockers()) if isolated else (),
        )
    else:
        _own_dir(jobs, 0o700)
        bwrap, ns_error = probe_bwrap()
        import pwd

        me = pwd.getpwuid(os.getuid()).pw_name
        hidden = sorted({str(Path(p).resolve()) for p in [data_dir, *(hide or [])]})
        host = Host(
            "namespaces" if bwrap else "plain",
            str(jobs),
            me,
            os.getuid(),
            os.getgid(),
            cg,
            bwrap=bwrap,
            hide=hidden,
        )
        facts = dataclasses.replace(
            contained,
            namespaces=bwrap is not None,
            namespace_error=ns_error,
        )
    host.description, host.warnings = describe(facts)
    return host
