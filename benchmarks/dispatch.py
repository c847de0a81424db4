"""Dispatch throughput: submit N trivial jobs to a local fleet of real agents and
measure jobs/s, CPU per job and submit-to-start latency, next to a bare fork/exec pool
of the same width run in the same invocation (`ratio_to_bare`). Not a test; prints JSON.

Two phases: `idle` submits jobs one at a time to an idle fleet (the latency a person
sees for `corral run`); `burst` submits N jobs at once from several clients (the
throughput, and the latency of a queue being worked off).

CPU is metered per process tree (cgroup v2 groups when the benchmark may create them):
the servers, the agents with their runners and commands, the PostgreSQL backends of
the benchmark's database, and the benchmark's own clients.

    python benchmarks/dispatch.py [--jobs 2000] [--agents 2] [--slots 8]
        [--db postgresql://postgres@127.0.0.1:5432/postgres] [--servers 2]
        [--submit each|array]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import re
import shlex
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bare import run_bare
from benchmarks.cpumeter import CgroupMeter, PgMeter, dbname_of
from benchmarks.machine import describe
from benchmarks.pg import throwaway_database
from corral.api import JobView
from corral.domain.jobs import FINAL_JOB_STATES
from corral.testing import Cluster, ServerProc

ACTIVE = ["queued", "locked", "running"]
IDLE_FIRST_LOOK = 0.1  # seconds after an idle-phase submit (wait_ended)
IDLE_LOOK_EVERY = 0.02


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = max(0, min(len(values) - 1, round(q / 100 * (len(values) - 1))))
    return values[k]


_SAMPLE = re.compile(
    r"^(corral_http_requests_total|corral_db_statements_total|corral_dispatch_pass_seconds_count)"
    r'(?:\{route="([^"]*)"\})? (\S+)$'
)


def own_cpu(pids: list[int]) -> float:
    """User + system CPU seconds of these processes themselves (not their children)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def zygote_pids(agents: list) -> list[int]:
    """The agents' pre-forked runner parents (from DATA_DIR/zygote.pid)."""
    out = []
    for a in agents:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            text = (a.data_dir / "zygote.pid").read_text()
            out.append(int(json.loads(text)["pid"]) if text.lstrip().startswith("{") else int(text))
    return out


def server_counts(servers: list[ServerProc]) -> dict[str, float]:
    """HTTP requests by route and database statements, summed over the servers (from
    their /metrics; empty on a build that does not count them)."""
    out: dict[str, float] = {}
    for s in servers:
        text = httpx.get(
            s.url + "/metrics",
            headers={"Authorization": f"Bearer {s.admin_token}"},
            timeout=30,
            verify=str(s.ca) if s.ca else True,
        ).text
        for line in text.splitlines():
            m = _SAMPLE.match(line)
            if m:
                if m.group(2):
                    key = f"requests:{m.group(2)}"
                else:
                    key = "passes" if m.group(1).startswith("corral_dispatch") else "statements"
                out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def per_job(before: dict[str, float], after: dict[str, float], jobs: int) -> dict:
    if not after:
        return {}
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    delta = {k: v for k, v in delta.items() if v > 0}
    requests = {k.split(":", 1)[1]: round(v / jobs, 3) for k, v in delta.items() if ":" in k}
    return {
        "http_requests_per_job": round(sum(requests.values()), 3),
        "http_requests_per_job_by_route": dict(sorted(requests.items())),
        "db_statements_per_job": round(delta.get("statements", 0.0) / jobs, 2),
        "dispatcher_passes_per_job": round(delta.get("passes", 0.0) / jobs, 3),
    }


def wait_ended(client, job_id: int, timeout: float) -> JobView:
    """One job, until it has ended. The idle phase's figure comes from the server's own
    timestamps (created, started), so the wait must not load the server while the job
    goes through it: a look every few milliseconds costs the server a request and a
    read each, and the logs long-poll (as `Job.wait` waits) answers at each state change
    and is asked again at once, both in the very window being measured. So: the first
    look after IDLE_FIRST_LOOK (a trivial job has ended by then), then one every
    IDLE_LOOK_EVERY."""
    deadline = time.monotonic() + timeout
    time.sleep(IDLE_FIRST_LOOK)
    while True:
        job = client.job(job_id)
        if job.state in FINAL_JOB_STATES:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"idle-phase job {job_id} still {job.state} after {timeout:g}s")
        time.sleep(IDLE_LOOK_EVERY)


def wait_finished(client, timeout: float, what: str) -> int:
    """Until no job is active, as a user waits for an array: the newest active job is
    about the last to end (the dispatcher takes queued jobs oldest first), so wait for
    it with the server's long-poll on its logs (as `Job.wait` does), then look again.
    A few requests for the whole burst, where polling the active jobs every 0.2 s cost
    the server a listing per 0.2 s. Returns the requests it made."""
    deadline = time.monotonic() + timeout
    requests = 0
    while True:
        requests += 1
        active = client.jobs(states=ACTIVE, limit=1)
        if not active:
            return requests
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{what}: still active after {timeout:g}s")
        requests += 1
        # returns at once once the job has ended, else when it changes (or after 10 s);
        # `after` past any chunk's seq, within the column's range (PostgreSQL's integer:
        # main's server answers 2**62, Job.wait's value, with a database error there)
        client.logs(active[0].id, after=2**31 - 1, wait=min(10.0, left))


def run_corral(
    *,
    jobs: int,
    idle_jobs: int,
    agents: int,
    slots: float,
    db: str | None,
    servers: int = 1,
    submitters: int = 8,
    timeout: float = 1800,
    command: tuple[str, ...] = ("true",),
    submit: str = "each",
    job_network: str = "isolated",
) -> dict:
    """One corral cluster (servers, agents) on SQLite or a throwaway PostgreSQL
    database: the idle and burst phases, CPU per process tree."""
    if servers > 1 and not db:
        raise SystemExit("--servers 2 needs --db (several servers share one PostgreSQL)")
    with contextlib.ExitStack() as stack:
        db_url = stack.enter_context(throwaway_database(db)) if db else None
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="corral-bench-"))
        meter = stack.enter_context(CgroupMeter())
        c = stack.enter_context(Cluster(Path(tmp)))
        procs = []
        for _k in range(servers):
            with meter.inside("servers"):
                procs.append(c.server(db_url=db_url, fast=False, wait=False))
        for p in procs:
            p.wait_ready()
        for k in range(agents):
            with meter.inside("agents"):
                c.agent(
                    procs, name=f"bench{k + 1}", cpus=slots, extra=["--job-network", job_network]
                )
        client = c.client(procs[0])
        c.wait_agents_running(client, agents)

        # idle: one job at a time
        idle: list[float] = []
        to_dispatch: list[float] = []  # submitted -> its attempt made (the server)
        to_start: list[float] = []  # attempt made -> started (agent, zygote, runner)

        for _ in range(idle_jobs):
            job_id = client.submit(list(command)).id
            ran = wait_ended(client, job_id, 60)
            if ran.state != "succeeded" or ran.started_at is None:
                raise SystemExit(f"idle-phase job {job_id} ended {ran.state}: {ran.reason}")
            idle.append(ran.started_at - ran.created_at)
            attempt1 = ran.attempts[0]
            if attempt1.started_at is not None:
                to_dispatch.append(attempt1.created_at - ran.created_at)
                to_start.append(attempt1.started_at - attempt1.created_at)

        # burst: N jobs at once
        clients = [c.client(procs[k % servers]) for k in range(submitters)]
        pg = PgMeter(dbname_of(db_url)).start()
        server_pids = [p.pid for p in c.servers]
        agent_pids = [p.pid for p in c.agents]
        srv0 = meter.seconds("servers", server_pids)
        ag0 = meter.seconds("agents", agent_pids)
        zyg_pids = zygote_pids(c.agents)
        daemons0, zyg0 = own_cpu(agent_pids), own_cpu(zyg_pids)
        bench0 = meter.seconds("bench") if meter.root else None
        counts0 = server_counts(c.servers)
        t0 = time.time()
        counter = itertools.count()
        if submit == "array":  # as Slurm's guide submits many jobs: one array
            ids = set(client.submit_array(list(command), 1, jobs))
        else:
            with ThreadPoolExecutor(submitters) as pool:
                ids = set(
                    pool.map(
                        lambda k: clients[k % len(clients)].submit(list(command)).id,
                        (next(counter) for _ in range(jobs)),
                    )
                )
        submitted = time.time()
        polls = wait_finished(client, timeout, f"{jobs} jobs to finish")
        counts = per_job(counts0, server_counts(c.servers), jobs)
        cpu = {
            "server": meter.seconds("servers", server_pids) - srv0,
            "agents_runners_commands": meter.seconds("agents", agent_pids) - ag0,
            "postgresql": pg.stop(),
        }
        cpu["total"] = sum(cpu.values())
        # the agents' tree split: the agent daemons, their zygotes, and the rest
        # (runners forked per attempt, and the commands)
        split = {
            "agent_daemons": own_cpu(agent_pids) - daemons0,
            "zygotes": own_cpu(zyg_pids) - zyg0,
        }
        split["runners_commands"] = cpu["agents_runners_commands"] - sum(split.values())
        if bench0 is not None:
            cpu["benchmark_clients"] = meter.seconds("bench") - bench0
        done = [j for j in client.jobs(limit=jobs + idle_jobs) if j.id in ids]
        first = min(j.created_at for j in done)
        last = max(j.finished_at for j in done if j.finished_at is not None)
        lat = [j.started_at - j.created_at for j in done if j.started_at is not None]
        return {
            "database": "postgresql" if db else "sqlite",
            "servers": servers,
            "agents": agents,
            "slots_per_agent": slots,
            "cpu_meter": meter.method,
            "command": list(command),
            "idle": {
                "jobs": idle_jobs,
                "submit_to_start_p50_s": round(percentile(idle, 50), 4),
                "submit_to_start_p99_s": round(percentile(idle, 99), 4),
                "submit_to_dispatch_p50_s": round(percentile(to_dispatch, 50), 4),
                "dispatch_to_start_p50_s": round(percentile(to_start, 50), 4),
            },
            "burst": {
                "jobs": jobs,
                "submission": "one array (jobs:batch)"
                if submit == "array"
                else f"one request per job from {submitters} clients",
                "succeeded": sum(j.state == "succeeded" for j in done),
                "submit_rate_jobs_per_s": round(jobs / (submitted - t0), 1),
                "throughput_jobs_per_s": round(jobs / (last - first), 1),
                "submit_to_start_p50_s": round(percentile(lat, 50), 3),
                "submit_to_start_p99_s": round(percentile(lat, 99), 3),
                "wall_s": round(last - first, 1),
                # all in: servers + agents/runners/commands + PostgreSQL backends
                "cpu_seconds_per_job": {k: round(v / jobs, 4) for k, v in cpu.items()},
                "agents_split_cpu_seconds_per_job": {
                    k: round(v / jobs, 4) for k, v in split.items()
                },
                # the benchmark's own requests waiting for the burst to end
                "completion_wait_requests": polls,
                # the servers' own counts (burst phase, incl. the metrics reads)
                **counts,
            },
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--idle-jobs", type=int, default=20)
    ap.add_argument("--agents", type=int, default=2)
    ap.add_argument("--slots", type=float, default=8, help="concurrent jobs per agent")
    ap.add_argument(
        "--db",
        default=None,
        help="PostgreSQL server URL (default: SQLite); a throwaway database is created "
        "on that server and dropped after",
    )
    ap.add_argument("--servers", type=int, default=1, help="servers on one PostgreSQL")
    ap.add_argument("--submitters", type=int, default=8, help="concurrent submitting clients")
    ap.add_argument(
        "--submit",
        choices=["each", "array"],
        default="each",
        help="burst: one request per job (default) or one array (`corral run --array`)",
    )
    ap.add_argument(
        "--job-network",
        choices=["isolated", "host"],
        default="isolated",
        help="the agents' --job-network (root agents: a network namespace per attempt, "
        "the default, or the host's)",
    )
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument(
        "--command", default="true", help="each job's command (default `true`; e.g. 'echo hi')"
    )
    args = ap.parse_args()

    width = int(args.agents * args.slots)
    machine = describe()
    bare = run_bare(args.jobs, width)
    corral_result = run_corral(
        jobs=args.jobs,
        idle_jobs=args.idle_jobs,
        agents=args.agents,
        slots=args.slots,
        db=args.db,
        servers=args.servers,
        submitters=args.submitters,
        timeout=args.timeout,
        command=tuple(shlex.split(args.command)),
        submit=args.submit,
        job_network=args.job_network,
    )
    result = {
        "benchmark": "dispatch",
        "job_network": args.job_network,
        **corral_result,
        "bare": bare,
        "ratio_to_bare": round(
            corral_result["burst"]["throughput_jobs_per_s"] / bare["throughput_jobs_per_s"], 4
        ),
        "machine": machine,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
