"""The limit: a bare fork/exec pool of `width` slots running `true` `jobs` times.

No scheduler, no database, no network: what any system that starts a process per job
on this machine cannot beat. Prints JSON.

    python benchmarks/bare.py [--jobs 2000] [--width 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import describe


def _cpu() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def run_bare(jobs: int, width: int, command: str = "true") -> dict:
    """Keep `width` children running `command` until `jobs` have finished."""
    exe = shutil.which(command) or command
    argv = [exe]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    cpu0 = _cpu()
    t0 = time.perf_counter()
    started = finished = failed = 0
    while finished < jobs:
        while started < jobs and started - finished < width:
            os.posix_spawn(exe, argv, env)
            started += 1
        _pid, status = os.wait()
        finished += 1
        if os.waitstatus_to_exitcode(status) != 0:
            failed += 1
    wall = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    return {
        "jobs": jobs,
        "width": width,
        "failed": failed,
        "throughput_jobs_per_s": round(jobs / wall, 1),
        "cpu_seconds_per_job": round(cpu / jobs, 5),
        "wall_s": round(wall, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--width", type=int, default=16)
    args = ap.parse_args()
    result = {"benchmark": "bare", **run_bare(args.jobs, args.width), "machine": describe()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
