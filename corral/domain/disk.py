"""When the disk the jobs write to runs low, which attempt is ended (pure).

Nothing caps one job's disk space (no quota works on every filesystem), so the
agent keeps a reserve free on the filesystem of its jobs' directories, as kubelet
evicts pods below `nodefs.available`: once free space falls below it, the attempt
holding the most (its directory, and what its user owns in the places every user
may write) is killed and fails with the reason, before the disk is full for the
jobs beside it, the agent's outputs and the host."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

MiB = 2**20
DEFAULT_RESERVE_SHARE = 0.05  # of the filesystem
DEFAULT_RESERVE_CAP_MB = 2048


def disk_reserve_bytes(total_bytes: int, configured_mb: int | None) -> int:
    """What is kept free: `--disk-reserve` when given (0: nothing, the guard is off),
    else 5% of the filesystem, at most 2 GiB."""
    if configured_mb is not None:
        return max(0, configured_mb) * MiB
    return min(int(total_bytes * DEFAULT_RESERVE_SHARE), DEFAULT_RESERVE_CAP_MB * MiB)


def choose_eviction(free_bytes: int, reserve_bytes: int, usage: Mapping[K, int]) -> K | None:
    """The attempt to end now: the one holding the most, once free space is below the
    reserve, if it holds a real part of it (a quarter of the reserve at least: a disk
    filled by something else is no job's fault, and killing a job holding kilobytes
    would give nothing back); None otherwise."""
    if free_bytes >= reserve_bytes or not usage:
        return None
    victim = max(usage, key=lambda k: usage[k])
    return victim if usage[victim] >= max(1, reserve_bytes // 4) else None


def eviction_reason(held_bytes: int, free_bytes: int, reserve_bytes: int) -> str:
    return (
        f"killed: the disk was nearly full ({free_bytes // MiB} MiB free, "
        f"{reserve_bytes // MiB} MiB kept free); this attempt held {held_bytes // MiB} MiB, "
        "the most of any on its instance"
    )
