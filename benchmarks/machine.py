"""Describe the machine a benchmark ran on, for the JSON it prints."""

from __future__ import annotations

import os
import platform

import psutil

from corral.domain.sandbox import parse_mountinfo, slow_group_moves


def describe() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        # the machine may be shared: how busy it was when the figures were taken
        "loadavg_1m": round(os.getloadavg()[0], 2),
        # whether moving a command into its attempt's cgroups may wait for the kernel
        # (README, "How fast a command starts")
        "cgroup2_favordynmods": _favordynmods(),
    }


def _favordynmods() -> bool | None:
    try:
        with open("/proc/self/mountinfo") as f:
            mounts = parse_mountinfo(f.read())
    except OSError:
        return None
    if not any(m.fstype == "cgroup2" for m in mounts):
        return None
    return not slow_group_moves(mounts)
