"""CPU meters for benchmarks: what a set of process trees spent, and nothing else.

The machine is shared, so system-wide CPU time says little. `CgroupMeter` puts each
process tree in its own cgroup v2 group: the benchmark moves itself into the group
before starting the tree (children are born there, and the agents' attempt groups
nest under their agent's), and reads `cpu.stat` (hierarchical, counts every process
that ever lived there). Without a writable cgroup v2 hierarchy it falls back to
sampling the trees with psutil (misses short-lived processes no tree member waited
for; the JSON says which method was used). `PgMeter` samples the PostgreSQL backends
serving one database.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil

CGROUP2_CANDIDATES = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")


def _own_cgroup2() -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    rel = next((line[3:] for line in lines if line.startswith("0::")), None)
    if rel is None:
        return None
    for base in CGROUP2_CANDIDATES:
        if (Path(base) / "cgroup.procs").exists() and (Path(base) / "cgroup.controllers").exists():
            return Path(base) / rel.lstrip("/")
    return None


class CgroupMeter:
    """Named groups of processes, each with its CPU time. Use as a context manager."""

    def __init__(self) -> None:
        self.home = _own_cgroup2()
        self.root: Path | None = None
        self.why_not: str | None = None
        if self.home is None:
            self.why_not = "no cgroup v2 hierarchy"
            return
        root = self.home / f"corral-bench-{secrets.token_hex(4)}"
        try:
            root.mkdir()
            (root / "bench").mkdir()
            (root / "bench" / "cgroup.procs").write_text("0")
            (self.home / "cgroup.procs").write_text("0")
        except OSError as exc:
            self.why_not = f"cannot use {root}: {exc.strerror or exc}"
            with contextlib.suppress(OSError):
                (root / "bench").rmdir()
                root.rmdir()
            return
        self.root = root
        self.pids: dict[str, list[int]] = {}

    @property
    def method(self) -> str:
        return "cgroup2 cpu.stat" if self.root else f"psutil sampling ({self.why_not})"

    def __enter__(self) -> CgroupMeter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def inside(self, name: str) -> Iterator[None]:
        """Processes started in this block belong to group `name`."""
        if self.root is None:
            yield
            return
        group = self.root / name
        group.mkdir(exist_ok=True)
        (group / "cgroup.procs").write_text("0")
        try:
            yield
        finally:
            (self.root / "bench" / "cgroup.procs").write_text("0")

    def seconds(self, name: str, pids: list[int] | None = None) -> float:
        """CPU seconds spent so far by group `name` (or, without cgroups, by the
        process trees of `pids`)."""
        if self.root is not None:
            try:
                for line in (self.root / name / "cpu.stat").read_text().splitlines():
                    key, value = line.split()
                    if key == "usage_usec":
                        return int(value) / 1e6
            except OSError:
                return 0.0
            return 0.0
        return tree_cpu(pids or [])

    def close(self) -> None:
        if self.root is None:
            return
        if self.home is not None:
            with contextlib.suppress(OSError):
                (self.home / "cgroup.procs").write_text("0")
        # deepest first; groups whose processes are gone (agents clean up their own)
        for d in sorted(self.root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if d.is_dir():
                with contextlib.suppress(OSError):
                    d.rmdir()
        with contextlib.suppress(OSError):
            self.root.rmdir()
        self.root = None


def tree_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
    return total


class PgMeter:
    """CPU of the PostgreSQL backends serving database `dbname` (sampled every
    `every` s; a backend that lived between two samples is missed)."""

    def __init__(self, dbname: str | None, every: float = 0.25) -> None:
        self.dbname = dbname
        self.every = every
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        if not self.dbname:
            return
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if not cmd.startswith("postgres:") or f" {self.dbname} " not in f"{cmd} ":
                continue
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                self.first.setdefault(p.pid, 0.0 if self._thread else t.user + t.system)
                self.last[p.pid] = t.user + t.system

    def start(self) -> PgMeter:
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def stop(self) -> float:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._sample()
        return sum(self.last[pid] - self.first.get(pid, 0.0) for pid in self.last)


def dbname_of(url: str | None) -> str | None:
    return url.rsplit("/", 1)[1].split("?")[0] if url else None


def clock_ticks() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def own_group_seconds() -> float | None:
    """CPU seconds of the cgroup v2 group this process is in (all its members, ever)."""
    group = _own_cgroup2()
    if group is None:
        return None
    try:
        for line in (group / "cpu.stat").read_text().splitlines():
            key, value = line.split()
            if key == "usage_usec":
                return int(value) / 1e6
    except OSError:
        return None
    return None
