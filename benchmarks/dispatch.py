"""Dispatch throughput: submit N trivial jobs to a local fleet of real agents and
measure jobs/s and submit-to-start latency. Not a test; prints JSON.

Two phases: `idle` submits jobs one at a time to an idle fleet (the latency a person
sees for `corral run`); `burst` submits N jobs at once from several clients (the
throughput, and the latency of a queue being worked off).

    python benchmarks/dispatch.py [--jobs 2000] [--agents 2] [--slots 8] [--db URL]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import describe
from benchmarks.pg import throwaway_database
from corral.testing import Cluster, wait_for

ACTIVE = ["queued", "locked", "running"]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = max(0, min(len(values) - 1, round(q / 100 * (len(values) - 1))))
    return values[k]


def cpu_of(procs) -> float:
    total = 0.0
    for p in procs:
        t = psutil.Process(p.pid).cpu_times()
        total += t.user + t.system + t.children_user + t.children_system
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--idle-jobs", type=int, default=20)
    ap.add_argument("--agents", type=int, default=2)
    ap.add_argument("--slots", type=float, default=8, help="concurrent jobs per agent")
    ap.add_argument(
        "--db",
        default=None,
        help="database URL (default: SQLite); on PostgreSQL a "
        "throwaway database is created on that server",
    )
    ap.add_argument("--submitters", type=int, default=8, help="concurrent submitting clients")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()

    with contextlib.ExitStack() as stack:
        db_url = stack.enter_context(throwaway_database(args.db)) if args.db else None
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="corral-bench-"))
        c = stack.enter_context(Cluster(Path(tmp)))
        server = c.server(db_url=db_url, fast=False)
        for k in range(args.agents):
            c.agent(server, name=f"bench{k + 1}", cpus=args.slots)
        client = c.client(server)
        c.wait_agents_running(client, args.agents)

        # idle: one job at a time
        idle = []
        for _ in range(args.idle_jobs):
            job = client.submit(["true"])
            done = wait_for(
                lambda job=job: (j := client.job(job.id)).state == "succeeded" and j,
                60,
                "an idle-phase job",
            )
            idle.append(done.started_at - done.created_at)

        # burst: N jobs at once
        cpu0 = psutil.cpu_times()
        srv0, ag0 = cpu_of(c.servers), cpu_of(c.agents)
        t0 = time.time()
        clients = [c.client(server) for _ in range(args.submitters)]
        with ThreadPoolExecutor(args.submitters) as pool:
            ids = set(
                pool.map(lambda k: clients[k % len(clients)].submit(["true"]).id, range(args.jobs))
            )
        submitted = time.time()
        wait_for(
            lambda: not client.jobs(states=ACTIVE, limit=1),
            args.timeout,
            f"{args.jobs} jobs to finish",
            interval=0.5,
        )
        cpu1 = psutil.cpu_times()
        busy = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        cpu = {
            "total": busy,
            "server": cpu_of(c.servers) - srv0,
            "agents_runners_commands": cpu_of(c.agents) - ag0,
        }
        cpu["benchmark_clients"] = busy - cpu["server"] - cpu["agents_runners_commands"]
        jobs = [j for j in client.jobs(limit=args.jobs + args.idle_jobs) if j.id in ids]
        first = min(j.created_at for j in jobs)
        last = max(j.finished_at for j in jobs)
        lat = [j.started_at - j.created_at for j in jobs if j.started_at]
        result = {
            "benchmark": "dispatch",
            "database": "postgresql" if args.db else "sqlite",
            "agents": args.agents,
            "slots_per_agent": args.slots,
            "idle": {
                "jobs": args.idle_jobs,
                "submit_to_start_p50_s": round(percentile(idle, 50), 3),
                "submit_to_start_p99_s": round(percentile(idle, 99), 3),
            },
            "burst": {
                "jobs": args.jobs,
                "succeeded": sum(j.state == "succeeded" for j in jobs),
                "submit_rate_jobs_per_s": round(args.jobs / (submitted - t0), 1),
                "throughput_jobs_per_s": round(args.jobs / (last - first), 1),
                "submit_to_start_p50_s": round(percentile(lat, 50), 3),
                "submit_to_start_p99_s": round(percentile(lat, 99), 3),
                "wall_s": round(last - first, 1),
                "cpu_seconds_per_job": {k: round(v / args.jobs, 4) for k, v in cpu.items()},
            },
            "machine": describe(),
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
