"""The agent's guard on the disk its jobs write to (the I/O half of
corral.domain.disk): free space on the jobs directory's filesystem, and what each live
attempt holds there once it runs low."""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

from corral.agent.sandbox.jobuser import disk_usage, owned_entries
from corral.domain.disk import choose_eviction, disk_reserve_bytes, eviction_reason

K = TypeVar("K", bound=Hashable)


class DiskGuard:
    def __init__(self, jobs_dir: str, reserve_mb: int | None):
        self.jobs_dir = jobs_dir
        self.reserve_mb = reserve_mb  # None: the default share of the filesystem

    def check(self, attempts: Callable[[], Mapping[K, str]]) -> tuple[K, str] | None:
        """`attempts`: each live attempt's directory (asked only when space is low).
        The attempt to end now and why, or None while enough is free."""
        try:
            st = os.statvfs(self.jobs_dir)
            device = os.stat(self.jobs_dir).st_dev
        except OSError:
            return None
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        reserve = disk_reserve_bytes(total, self.reserve_mb)
        if free >= reserve:
            return None
        usage = {key: self.held(job_dir, device) for key, job_dir in attempts().items()}
        victim = choose_eviction(free, reserve, usage)
        if victim is None:
            return None
        return victim, eviction_reason(usage[victim], free, reserve)

    @staticmethod
    def held(job_dir: str, device: int) -> int:
        """What an attempt holds on `device`: its directory, and what its own job user
        (not the agent's, nor a user other attempts share) owns where every user may
        write."""
        used = disk_usage(job_dir, device)
        try:
            uid = os.lstat(job_dir).st_uid
        except OSError:
            return used
        if uid in (0, os.geteuid()):
            return used
        return used + sum(disk_usage(path, device) for path, _st in owned_entries(uid))
