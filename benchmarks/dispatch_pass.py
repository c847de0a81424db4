"""What one dispatcher pass costs as the fleet grows, and the placement inside it next
to its specification (every instance tried for every job) in the same run. Prints JSON.

A pass runs on every wake (each registration, submit and attempt end) and once a
second on its own, so at a thousand instances its cost is paid many times a second.
Measured here: the placement alone (200 jobs on 1,000 instances idle, full, or of
another fleet), and whole passes through the store (`dispatch.lock_jobs`, the paged
kind and the kind that explains waiting jobs) over idle instances with a queue of
jobs none of them can hold, so every pass finds the same and changes nothing.

    python benchmarks/dispatch_pass.py [--instances 1000] [--db postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import describe
from benchmarks.pg import throwaway_database
from corral.api import JobSubmit
from corral.domain.placement import Capacity, JobDemand, place, place_exhaustively
from corral.store import dispatch, instances
from corral.store import jobs as repo
from corral.store.db import Database
from corral.store.migrate import migrate

NOW = 1_800_000_000.0


def _ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 3)


def placement(n: int, runs: int) -> dict:
    def room(used: float) -> list[Capacity]:
        return [Capacity(f"i{k:05d}", "cpu", 4, 8192, used_cpus=used, order=(k,)) for k in range(n)]

    cases = {
        "idle_fleet": (0.0, None),
        "full_fleet": (4.0, None),
        "jobs_of_another_fleet": (0.0, "gpu"),
    }
    out = {}
    for name, (used, fleet) in cases.items():
        jobs = [JobDemand(k, 1, 0, fleet) for k in range(200)]

        def fast_run(used: float = used, jobs: list[JobDemand] = jobs) -> object:
            return place(jobs, room(used))

        def spec_run(used: float = used, jobs: list[JobDemand] = jobs) -> object:
            return place_exhaustively(jobs, room(used))

        assert fast_run() == spec_run()
        fast, spec = _ms(fast_run, runs), _ms(spec_run, runs)
        out[name] = {"place_ms": fast, "trying_everything_ms": spec, "ratio": round(spec / fast, 1)}
    return out


async def passes(url: str, n: int, runs: int) -> dict:
    db = Database(url)
    await migrate(db)
    try:
        for k in range(n):
            await db.transact(
                instances.register,
                name=f"n{k:05d}",
                instance_id=None,
                cpus=4,
                memory_mb=8000,
                host="h",
                agent_version="bench",
                fleet=None,
                peer_url=None,
                now=NOW + k,
            )
        # jobs no instance can hold: each pass reads, plans and places nothing
        await db.transact(repo.submit_many, [JobSubmit(command=["true"], cpus=64)] * 100, NOW)
        out = {}
        for explain in (False, True):
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                placed = await db.transact(dispatch.lock_jobs, db, NOW + n, explain=explain)
                times.append((time.perf_counter() - t) * 1000)
                assert placed == []
            out["explaining_pass_ms" if explain else "paged_pass_ms"] = round(
                statistics.median(times), 2
            )
        return out
    finally:
        await db.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--db", help="also on PostgreSQL (a throwaway database on this server)")
    args = ap.parse_args()
    result: dict = {
        "benchmark": "dispatch_pass",
        "machine": describe(),
        "instances": args.instances,
        "placement_200_jobs": placement(args.instances, args.runs),
    }
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'corral.db'}"
        result["sqlite"] = asyncio.run(passes(url, args.instances, args.runs))
    if args.db:
        with contextlib.ExitStack() as stack:
            url = stack.enter_context(throwaway_database(args.db))
            result["postgresql"] = asyncio.run(passes(url, args.instances, args.runs))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
