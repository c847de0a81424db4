"""Cgroups for attempts: an agent-owned parent group, one child per attempt.

In the v2 tree (a unified host's /sys/fs/cgroup, or a hybrid host's
/sys/fs/cgroup/unified) the attempt's group is what kills it (`cgroup.kill`, or
freeze + SIGKILL + thaw where that file is absent) and what counts its CPU time.
Limits go through whichever controllers the host lets the agent use: v2 `memory.max`
and `cpu.max` when the agent can enable them for its subtree, else the v1 `memory`
and `cpu` hierarchies of a hybrid host (a group of the same name in each); the same
for the `pids` ceiling every attempt gets (and the agent's parent group, so the host
keeps process ids of its own whatever the attempts do). Every
path is derived from the agent's data dir, so an agent that restarts finds its
attempts' groups again and adopts or kills them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from corral.domain.sandbox import (
    CGROUP_CONTROLLERS,
    DEFAULT_MAX_PIDS,
    PIDS,
    CgroupLayout,
    LimitPlan,
    Mount,
    attempts_memory_ceiling,
    cgroup_layout,
    cpu_max_v2,
    cpu_quota_v1,
    parse_controllers,
    parse_flat_keyed,
    parse_mountinfo,
    pids_ceilings,
    plan_limits,
)

ATTEMPT_PREFIX = "a-"
T = TypeVar("T")


class CgroupMoveError(OSError):
    """This process could not leave an attempt's group again after a spawn."""


def agent_key(data_dir: Path) -> str:
    """A short name for this agent's groups (and job directories), from its data dir."""
    return "corral-" + hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:12]


def attempt_name(job_id: int, attempt: int) -> str:
    return f"{ATTEMPT_PREFIX}{job_id}-{attempt}"


def parse_attempt_name(name: str) -> tuple[int, int] | None:
    if not name.startswith(ATTEMPT_PREFIX):
        return None
    job, _, n = name[len(ATTEMPT_PREFIX) :].partition("-")
    return (int(job), int(n)) if job.isdigit() and n.isdigit() else None


def _read(path: Path | str) -> str:
    """A cgroup file's text, or "" (gone, or not there on this kernel)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    except OSError:
        return ""
    finally:
        os.close(fd)


def v2_populated(group: Path | str) -> bool:
    """Whether the v2 group at `group` has a process in it or below (False once gone)."""
    return parse_flat_keyed(_read(Path(group) / "cgroup.events")).get("populated", 0) == 1


def _write(path: Path | str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


_mounts: list[Mount] | None = None


def cgroup_mounts() -> list[Mount]:
    """This host's mounts, read once per process (cgroup hierarchies do not move;
    a zygote reads them before it forks, so its runners never do)."""
    global _mounts
    if _mounts is None:
        _mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    return _mounts


@dataclass
class Cgroups:
    """Where this agent's attempts' groups live; serialisable into an attempt's spec
    so the runner (a separate process, later a forked child) needs no detection."""

    v2: str | None  # the agent's parent group in the v2 tree
    v1: dict[str, str] = field(default_factory=dict)  # controller -> parent group
    limits: LimitPlan = field(default_factory=lambda: LimitPlan(None, None))
    kill_file: bool = True
    pids_max: int = 0  # each attempt's ceiling on its processes and threads (0: none)
    memory_mb: int = 0  # all attempts together (attempts_memory_ceiling; 0: none set)

    def to_json(self) -> dict:
        return {
            "v2": self.v2,
            "v1": self.v1,
            "memory": self.limits.memory,
            "cpu": self.limits.cpu,
            "pids": self.limits.pids,
            "kill_file": self.kill_file,
            "pids_max": self.pids_max,
            "memory_mb": self.memory_mb,
        }

    @classmethod
    def from_json(cls, d: dict | None) -> Cgroups | None:
        if not d:
            return None
        return cls(
            d["v2"],
            d["v1"],
            LimitPlan(d["memory"], d["cpu"], d.get("pids")),  # an older agent's spec: none
            d["kill_file"],
            d.get("pids_max", 0),
            d.get("memory_mb", 0),
        )

    def attempt(self, job_id: int, attempt: int) -> AttemptGroup:
        return AttemptGroup(self, attempt_name(job_id, attempt))

    def attempts(self) -> list[tuple[int, int]]:
        """The attempt groups that exist now (in any of the agent's hierarchies)."""
        found = set()
        for parent in [self.v2, *self.v1.values()]:
            if parent is None:
                continue
            with contextlib.suppress(OSError):
                for d in os.scandir(parent):
                    key = parse_attempt_name(d.name) if d.is_dir() else None
                    if key is not None:
                        found.add(key)
        return sorted(found)

    def close(self) -> None:
        """Remove the parent groups if no attempt is left in them (a stopping agent;
        with attempts still running, e.g. a crash, they stay for the next one)."""
        for parent in [self.v2, *self.v1.values()]:
            if parent is not None:
                with contextlib.suppress(OSError):
                    os.rmdir(parent)


def detect(
    key: str, max_pids: int = DEFAULT_MAX_PIDS, memory_mb: int = 0
) -> tuple[Cgroups | None, str | None]:
    """Create (or find) this agent's parent groups. Returns (cgroups, why not): the
    v2 group is what contains attempts; without it there are no cgroups at all.
    `max_pids`: each attempt's ceiling on its processes (0: only the agent's own);
    `memory_mb`: what the agent offers to jobs (all its attempts' ceiling with the
    host's own reserve, attempts_memory_ceiling)."""
    try:
        layout = cgroup_layout(
            Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text()
        )
    except OSError as exc:
        return None, f"cannot read this process's cgroups: {exc}"
    if layout.v2_dir is None:
        return None, "no cgroup v2 hierarchy is mounted"
    v2 = Path(layout.v2_dir) / key
    try:
        v2.mkdir(exist_ok=True)
    except OSError as exc:
        return None, f"cannot create {v2}: {exc.strerror or exc}"
    enabled = _enable_v2_controllers(Path(layout.v2_dir), v2)
    v1 = _v1_parents(layout, key, skip=enabled)
    plan = plan_limits(enabled, frozenset(v1))
    v1 = {c: p for c, p in v1.items() if getattr(plan, c) == "v1"}
    per_attempt = 0
    if plan.pids:
        total, per_attempt = pids_ceilings(_pid_max(), max_pids)
        try:
            _write(Path(v2 if plan.pids == "v2" else v1[PIDS]) / "pids.max", str(total))
        except OSError:  # no ceiling can be set here: say so rather than pretend
            plan = LimitPlan(plan.memory, plan.cpu, None)
            v1.pop(PIDS, None)
            per_attempt = 0
    shared = 0
    if plan.memory:
        shared = attempts_memory_ceiling(_host_memory_mb(), memory_mb)
        parent = v2 if plan.memory == "v2" else Path(v1["memory"])
        try:
            _write(
                parent / ("memory.max" if plan.memory == "v2" else "memory.limit_in_bytes"),
                str(shared * 2**20),
            )
        except OSError:  # not settable here: nothing but the host caps them
            shared = 0
    groups = Cgroups(
        str(v2),
        v1,
        plan,
        kill_file=(v2 / "cgroup.kill").exists(),
        pids_max=per_attempt,
        memory_mb=shared,
    )
    return groups, None


def _host_memory_mb() -> int:
    import psutil

    return int(psutil.virtual_memory().total // 2**20)


def _pid_max() -> int:
    try:
        return int(_read("/proc/sys/kernel/pid_max").strip())
    except ValueError:
        return 32768  # the kernel's default


def _enable_v2_controllers(base: Path, parent: Path) -> frozenset[str]:
    """Enable memory, cpu and pids for the attempts under `parent`, if the host has them
    there. The agent's own group must pass them down first, which cgroup v2 allows
    only when that group holds no process (the root group excepted)."""
    want = [
        c for c in CGROUP_CONTROLLERS if c in parse_controllers(_read(base / "cgroup.controllers"))
    ]
    if not want:
        return frozenset()
    mine = parse_controllers(_read(base / "cgroup.subtree_control"))
    todo = [c for c in want if c not in mine]
    if todo:
        try:
            _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in todo))
        except OSError as exc:
            if exc.errno != errno.EBUSY or not _move_self_to_leaf(base, parent.name):
                return frozenset()
            try:
                _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in todo))
            except OSError:
                return frozenset()
    try:
        _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in want))
    except OSError:
        return frozenset()
    return frozenset(want) & parse_controllers(_read(parent / "cgroup.subtree_control"))


def _move_self_to_leaf(base: Path, key: str) -> bool:
    """An agent alone in its group (systemd's `Delegate=yes` unit) moves itself into a
    leaf child so its group may pass controllers down."""
    procs = _read(base / "cgroup.procs").split()
    if procs != [str(os.getpid())]:
        return False
    leaf = base / f"{key}-agent"
    try:
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", "0")
    except OSError:
        return False
    return True


def _v1_parents(layout: CgroupLayout, key: str, skip: frozenset[str]) -> dict[str, str]:
    out = {}
    for c, own in layout.v1_dirs.items():
        if c in skip:
            continue
        parent = Path(own) / key
        try:
            parent.mkdir(exist_ok=True)
        except OSError:
            continue
        out[c] = str(parent)
    return out


@dataclass
class Stats:
    cpu_seconds: float | None = None
    peak_memory_mb: int | None = None
    oom_kills: int = 0


class AttemptGroup:
    """One attempt's groups (the v2 group and, on hybrid hosts, its v1 twins)."""

    def __init__(self, cgroups: Cgroups, name: str):
        self.cgroups = cgroups
        self.name = name
        self.v2 = Path(cgroups.v2) / name if cgroups.v2 else None
        self.v1 = {c: Path(p) / name for c, p in cgroups.v1.items()}

    def dirs(self) -> list[Path]:
        return [d for d in [self.v2, *self.v1.values()] if d is not None]

    def create(self, cpus: float, memory_mb: int) -> str:
        """Create the groups and set the limits; returns what is enforced."""
        for d in self.dirs():
            d.mkdir(exist_ok=True)
        plan = self.cgroups.limits
        if memory_mb and plan.memory == "v2" and self.v2:
            limit = str(memory_mb * 2**20)
            _write(self.v2 / "memory.max", limit)
            for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                with contextlib.suppress(OSError):
                    _write(self.v2 / name, value)
        elif memory_mb and plan.memory == "v1":
            mem = self.v1["memory"]
            limit = str(memory_mb * 2**20)
            _write(mem / "memory.limit_in_bytes", limit)
            with contextlib.suppress(OSError):  # only with swap accounting
                _write(mem / "memory.memsw.limit_in_bytes", limit)
        if cpus and plan.cpu == "v2" and self.v2:
            _write(self.v2 / "cpu.max", cpu_max_v2(cpus))
        elif cpus and plan.cpu == "v1":
            _write(self.v1["cpu"] / "cpu.cfs_quota_us", str(cpu_quota_v1(cpus)))
        pids = self.v2 if plan.pids == "v2" else self.v1.get(PIDS)
        if pids is not None and self.cgroups.pids_max:
            _write(pids / "pids.max", str(self.cgroups.pids_max))
        return plan.enforced(memory_mb, cpus)

    def open_for_joining(self) -> list[int]:
        """Write-only fds of every `cgroup.procs`, opened now with this process's
        privileges; a child writes "0" to each before it execs, so it and everything
        it ever starts are inside from the first instruction."""
        fds: list[int] = []
        try:
            for d in self.dirs():
                fds.append(os.open(d / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))  # noqa: PERF401
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def spawn_inside(self, start: Callable[[], T]) -> T:
        """Call `start` (which starts the command) with this process inside the
        attempt's groups, then move this process back where it was: the command is
        born inside (from its first instruction, as with `open_for_joining`), and the
        caller may start it without running code between fork and exec (so Python's
        subprocess takes its vfork path instead of copying this process). Raises
        CgroupMoveError if this process cannot get out again (it must not stay:
        killing the group would kill it)."""
        layout = cgroup_layout(cgroup_mounts(), Path("/proc/self/cgroup").read_text())
        homes: list[str] = []
        if self.v2 is not None:
            if layout.v2_dir is None:
                raise OSError(errno.ENOENT, "this process has no cgroup v2 group")
            homes.append(layout.v2_dir)
        for c in self.v1:
            if c not in layout.v1_dirs:
                raise OSError(errno.ENOENT, f"this process has no {c} group")
            homes.append(layout.v1_dirs[c])
        back: list[int] = []
        into: list[int] = []
        try:
            for home in homes:
                back.append(os.open(os.path.join(home, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC))  # noqa: PERF401
            into = self.open_for_joining()
            try:
                for fd in into:
                    os.write(fd, b"0")
                return start()
            finally:
                for fd in back:
                    try:
                        os.write(fd, b"0")
                    except OSError as exc:
                        raise CgroupMoveError(
                            exc.errno, f"cannot leave the attempt's group: {exc.strerror}"
                        ) from exc
        finally:
            for fd in back + into:
                os.close(fd)

    def pids(self) -> list[int]:
        out: set[int] = set()
        for d in self.dirs():
            out.update(int(p) for p in _read(d / "cgroup.procs").split() if p.isdigit())
        return sorted(out)

    def populated(self) -> bool:
        if self.v2 is not None and self.v2.exists():
            return v2_populated(self.v2)
        return bool(self.pids())

    def kill(self, grace: float = 0.0) -> bool:
        """SIGTERM every process, wait up to `grace`, then kill whatever is left, sessions
        and double forks included. True when the group is empty."""
        if grace > 0 and self.populated():
            self._signal_all(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.populated() and time.monotonic() < deadline:
                time.sleep(0.05)
        deadline = time.monotonic() + 10
        while self.populated():
            if self.v2 is not None and self.cgroups.kill_file:
                with contextlib.suppress(OSError):
                    _write(self.v2 / "cgroup.kill", "1")
            else:
                self._freeze_and_kill()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _signal_all(self, sig: int) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def _freeze_and_kill(self) -> None:
        """Without cgroup.kill: freeze (nothing can fork meanwhile), SIGKILL every
        member, thaw so the signals are delivered."""
        frozen = False
        if self.v2 is not None and (self.v2 / "cgroup.freeze").exists():
            with contextlib.suppress(OSError):
                _write(self.v2 / "cgroup.freeze", "1")
                frozen = True
        self._signal_all(signal.SIGKILL)
        if frozen and self.v2 is not None:
            with contextlib.suppress(OSError):
                _write(self.v2 / "cgroup.freeze", "0")

    def stats(self) -> Stats:
        st = Stats()
        if self.v2 is not None:
            usage = parse_flat_keyed(_read(self.v2 / "cpu.stat")).get("usage_usec")
            if usage is not None:
                st.cpu_seconds = usage / 1e6
            peak = _read(self.v2 / "memory.peak").strip()
            if peak.isdigit():
                st.peak_memory_mb = int(peak) // 2**20
            st.oom_kills = parse_flat_keyed(_read(self.v2 / "memory.events")).get("oom_kill", 0)
        mem = self.v1.get("memory")
        if mem is not None:
            peak = _read(mem / "memory.max_usage_in_bytes").strip()
            if peak.isdigit():
                st.peak_memory_mb = int(peak) // 2**20
            st.oom_kills = max(
                st.oom_kills, parse_flat_keyed(_read(mem / "memory.oom_control")).get("oom_kill", 0)
            )
        return st

    def remove(self) -> None:
        """rmdir every group (they must be empty); a group whose last process is
        still exiting is retried briefly."""
        for d in self.dirs():
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        break
                    time.sleep(0.02)


def cleanup_agent_groups(key: str) -> None:
    """Kill and remove every group an agent with this key left behind (tests and
    `corral up` call this after its agent is gone)."""
    found, _why = _existing(key)
    if found is None:
        return
    for job_id, n in found.attempts():
        g = found.attempt(job_id, n)
        g.kill()
        g.remove()
    for parent in [found.v2, *found.v1.values()]:
        if parent is not None:
            with contextlib.suppress(OSError):
                os.rmdir(Path(parent).parent / f"{key}-agent")
    found.close()


def _existing(key: str) -> tuple[Cgroups | None, str | None]:
    try:
        layout = cgroup_layout(
            Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text()
        )
    except OSError as exc:
        return None, str(exc)
    v2 = Path(layout.v2_dir) / key if layout.v2_dir else None
    v1 = {c: str(Path(d) / key) for c, d in layout.v1_dirs.items() if (Path(d) / key).is_dir()}
    if (v2 is None or not v2.is_dir()) and not v1:
        return None, None
    return (
        Cgroups(
            str(v2) if v2 is not None and v2.is_dir() else None,
            v1,
            kill_file=v2 is not None and (v2 / "cgroup.kill").exists(),
        ),
        None,
    )
