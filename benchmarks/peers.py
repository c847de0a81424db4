"""corral side by side with its peers, in one run, on the same jobs (`true`) and the
same width: a bare fork/exec pool (the limit), corral on SQLite and on PostgreSQL,
dask LocalCluster (a subprocess per task), pgqueuer on PostgreSQL, and Slurm when it is
installed. Prints JSON: jobs/s, CPU-s per job and idle submit->start p50 per system, and
their ratios.

    python benchmarks/peers.py [--jobs 500] [--corral-jobs 200] [--width 16]
        [--db postgresql://postgres@127.0.0.1:5432/postgres]

CPU is metered per system with cgroup v2 groups (every process a system started,
including short-lived ones), plus the PostgreSQL backends of its database. Slurm runs
when `slurmctld` is installed (benchmarks/slurm-single-host.sh says how); peers.py then
starts its daemons in their own group and stops them after, else it says why it skipped.

Submit->start is measured the same way for every peer except corral: the time the job's
process was started (taken by the job itself or the code that execs it) minus the time
the client submitted it; for corral, the server's started_at minus created_at.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bare import run_bare
from benchmarks.cpumeter import CgroupMeter, PgMeter, dbname_of, own_group_seconds
from benchmarks.dispatch import percentile, run_corral
from benchmarks.machine import describe
from benchmarks.pg import throwaway_database

HERE = Path(__file__).resolve().parent


def _stamp_job(stamps: Path) -> float:
    """A job as the peers run it: exec `true`, record (start, end) of the process."""
    t = time.time()
    subprocess.run(["true"], check=True)
    with open(stamps, "a") as f:
        f.write(f"{t} {time.time()}\n")
    return t


def _read_stamps(stamps: Path) -> list[tuple[float, float]]:
    try:
        lines = stamps.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [(float(a), float(b)) for a, b in (line.split() for line in lines if line)]


def _wait_lines(stamps: Path, n: int, timeout: float) -> list[tuple[float, float]]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = _read_stamps(stamps)
        if len(got) >= n:
            return got
        time.sleep(0.002 if n == 1 else 0.05)
    raise TimeoutError(f"{n} jobs did not finish within {timeout}s")


# ---- dask -------------------------------------------------------------------------------


def child_dask(args) -> dict:
    from dask.distributed import Client, LocalCluster

    stamps = Path(args.tmp) / "dask.stamps"
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=args.width // 2,
            processes=True,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        idle = []
        for k in range(args.idle_jobs):
            t0 = time.time()
            start = client.submit(_stamp_job, stamps, key=f"idle-{k}", pure=False).result()
            idle.append(start - t0)
        stamps.unlink()
        cpu0 = own_group_seconds()
        t0 = time.time()
        futures = [
            client.submit(_stamp_job, stamps, key=f"burst-{k}", pure=False)
            for k in range(args.jobs)
        ]
        client.gather(futures)
        t1 = time.time()
        cpu1 = own_group_seconds()
    return {"idle": idle, "t0": t0, "t1": t1, "cpu0": cpu0, "cpu1": cpu1}


# ---- pgqueuer -----------------------------------------------------------------------------


def child_pgqueuer_worker(args) -> None:
    import asyncpg
    from pgqueuer import Job, QueueManager
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    stamps = Path(args.tmp) / "pgq.stamps"

    async def main() -> None:
        conn = await asyncpg.connect(args.db_url)
        qm = QueueManager(Queries.from_asyncpg_connection(conn))
        slots = args.width // 2

        @qm.entrypoint("true")
        async def run_true(job: Job) -> None:
            t = time.time()
            proc = await asyncio.create_subprocess_exec("true")
            await proc.wait()
            with open(stamps, "a") as f:  # noqa: ASYNC230 (one short line, as dask's job does)
                f.write(f"{t} {time.time()}\n")

        await qm.run(
            batch_size=max(1, slots // 2),
            max_concurrent_tasks=max(2, slots),
            mode=QueueExecutionMode.continuous,
        )

    asyncio.run(main())


def child_pgqueuer(args) -> dict:
    import asyncpg
    from pgqueuer.queries import Queries

    stamps = Path(args.tmp) / "pgq.stamps"

    async def setup() -> None:
        conn = await asyncpg.connect(args.db_url)
        try:
            await Queries.from_asyncpg_connection(conn).install()
        finally:
            await conn.close()

    asyncio.run(setup())
    workers = [
        subprocess.Popen(
            [
                *(sys.executable, __file__, "--child", "pgqueuer-worker", "--tmp", args.tmp),
                *("--db-url", args.db_url, "--width", str(args.width)),
            ]
        )
        for _ in range(2)
    ]
    try:

        async def drive() -> dict:
            pool = await asyncpg.create_pool(args.db_url, min_size=8, max_size=8)
            q = Queries.from_asyncpg_pool(pool)
            await asyncio.sleep(1.0)  # the workers connect and LISTEN
            idle = []
            for _ in range(args.idle_jobs):
                t0 = time.time()
                await q.enqueue("true", None)
                start, _end = _wait_lines(stamps, 1, 60)[0]
                idle.append(start - t0)
                stamps.unlink()
            sem = asyncio.Semaphore(8)

            async def one() -> None:
                async with sem:
                    await q.enqueue("true", None)

            cpu0 = own_group_seconds()
            t0 = time.time()
            await asyncio.gather(*(one() for _ in range(args.jobs)))
            got = await asyncio.to_thread(_wait_lines, stamps, args.jobs, args.timeout)
            cpu1 = own_group_seconds()
            await pool.close()
            t1 = max(e for _s, e in got)
            return {"idle": idle, "t0": t0, "t1": t1, "cpu0": cpu0, "cpu1": cpu1}

        return asyncio.run(drive())
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            try:
                w.wait(10)
            except subprocess.TimeoutExpired:
                w.kill()


# ---- slurm --------------------------------------------------------------------------------


def slurm_why_not() -> str | None:
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        return "Slurm is not installed: sudo benchmarks/slurm-single-host.sh start installs it"
    if os.geteuid() != 0:
        return "starting a single-host Slurm needs root (benchmarks/slurm-single-host.sh)"
    return None


def run_slurm(args, meter: CgroupMeter, tmp: Path) -> dict:
    script = str(HERE / "slurm-single-host.sh")
    slurm_dir = tempfile.mkdtemp(prefix="corral-slurm-", dir="/var/tmp")
    env = {**os.environ, "SLURM_DIR": slurm_dir}
    with meter.inside("slurm"):
        subprocess.run(  # its messages to stderr: stdout is the JSON
            [script, "start", str(args.width)], check=True, env=env, timeout=120, stdout=sys.stderr
        )
    try:
        out = tmp / "slurm-out"
        out.mkdir()  # Slurm runs the jobs as root here, as it runs its daemons
        idle = []
        for k in range(args.idle_jobs):
            f = out / f"idle-{k}"
            t0 = time.time()
            subprocess.run(
                ["sbatch", "-Q", "-o", str(f), "--wrap", "date +%s.%N"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            deadline = time.time() + 60
            while not (f.exists() and f.read_text().strip()):
                if time.time() > deadline:
                    raise TimeoutError("an idle Slurm job did not run in 60 s")
                time.sleep(0.005)
            idle.append(float(f.read_text().split()[0]) - t0)
        cpu0 = meter.seconds("slurm")
        t0 = time.time()
        # the guide's way to submit many jobs: one array, a task per job
        subprocess.run(
            ["sbatch", "-Q", "-o", "/dev/null", f"--array=1-{args.jobs}", "--wrap", "true"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.time() + args.timeout
        while True:
            q = subprocess.run(["squeue", "-h", "-r"], capture_output=True, text=True, check=True)
            if not q.stdout.strip():
                break
            if time.time() > deadline:
                raise TimeoutError("Slurm did not finish the array in time")
            time.sleep(0.05)
        t1 = time.time()
        cpu = meter.seconds("slurm") - cpu0
    finally:
        subprocess.run([script, "stop"], env=env, check=False, timeout=60, stdout=sys.stderr)
        shutil.rmtree(slurm_dir, ignore_errors=True)
    return {
        "submission": "one job array (sbatch --array)",
        "jobs": args.jobs,
        "throughput_jobs_per_s": round(args.jobs / (t1 - t0), 1),
        "cpu_seconds_per_job": round(cpu / args.jobs, 4) if meter.root else None,
        "idle_submit_to_start_p50_s": round(percentile(idle, 50), 4),
    }


# ---- driver -------------------------------------------------------------------------------


def run_child(kind: str, args, meter: CgroupMeter, tmp: Path, db_url: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--tmp", str(tmp)]
    cmd += ["--jobs", str(args.jobs), "--idle-jobs", str(args.idle_jobs)]
    cmd += ["--width", str(args.width), "--timeout", str(args.timeout)]
    if db_url:
        cmd += ["--db-url", db_url]
    pg = PgMeter(dbname_of(db_url)).start()
    with meter.inside(kind):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=args.timeout + 120)
    pg_cpu = pg.stop()  # the whole run's; set-up and the idle phase cost PostgreSQL little
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed with exit code {proc.returncode}")
    r = json.loads(out.strip().splitlines()[-1])
    # the burst's CPU, as the system's group counted it (client, scheduler, workers, jobs)
    cpu = r["cpu1"] - r["cpu0"] + pg_cpu if r["cpu0"] is not None else None
    return {
        "jobs": args.jobs,
        "throughput_jobs_per_s": round(args.jobs / (r["t1"] - r["t0"]), 1),
        "cpu_seconds_per_job": round(cpu / args.jobs, 4) if cpu is not None else None,
        "idle_submit_to_start_p50_s": round(percentile(r["idle"], 50), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument(
        "--corral-jobs", type=int, default=None, help="jobs for corral (default --jobs)"
    )
    ap.add_argument("--idle-jobs", type=int, default=10)
    ap.add_argument("--width", type=int, default=16, help="slots (2 workers/agents of width/2)")
    ap.add_argument("--db", default=None, help="PostgreSQL server URL (throwaway databases)")
    ap.add_argument("--only", default=None, help="comma-separated subset of the systems")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--db-url", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        if args.child == "pgqueuer-worker":
            child_pgqueuer_worker(args)
            return
        r = {"dask": child_dask, "pgqueuer": child_pgqueuer}[args.child](args)
        print(json.dumps(r))
        return

    only = set(args.only.split(",")) if args.only else None
    want = lambda name: only is None or name in only  # noqa: E731
    machine = describe()
    results: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="corral-peers-")))
        meter = stack.enter_context(CgroupMeter())
        if want("bare"):
            b = run_bare(args.jobs, args.width)
            results["bare"] = {
                "jobs": b["jobs"],
                "throughput_jobs_per_s": b["throughput_jobs_per_s"],
                "cpu_seconds_per_job": b["cpu_seconds_per_job"],
                "idle_submit_to_start_p50_s": None,
            }
        for name, db in (("corral_sqlite", None), ("corral_postgresql", args.db)):
            if not want(name):
                continue
            if name == "corral_postgresql" and not args.db:
                skipped[name] = "no --db given"
                continue
            n = args.corral_jobs or args.jobs
            r = run_corral(
                jobs=n,
                idle_jobs=args.idle_jobs,
                agents=2,
                slots=args.width / 2,
                db=db,
                timeout=args.timeout,
                submit="array",  # as Slurm is given its jobs: one array
            )
            cpu = r["burst"]["cpu_seconds_per_job"]
            results[name] = {
                "jobs": n,
                "submission": r["burst"]["submission"],
                "throughput_jobs_per_s": r["burst"]["throughput_jobs_per_s"],
                "cpu_seconds_per_job": cpu["total"],
                "idle_submit_to_start_p50_s": r["idle"]["submit_to_start_p50_s"],
            }
        if want("dask"):
            results["dask_localcluster"] = run_child("dask", args, meter, tmp, None)
        if want("pgqueuer"):
            if not args.db:
                skipped["pgqueuer"] = "no --db given"
            else:
                with throwaway_database(args.db) as url:
                    results["pgqueuer"] = run_child("pgqueuer", args, meter, tmp, url)
        if want("slurm"):
            why = slurm_why_not()
            if why:
                skipped["slurm"] = why
            else:
                results["slurm"] = run_slurm(args, meter, tmp)
        cpu_meter = meter.method

    bare_rate = results.get("bare", {}).get("throughput_jobs_per_s")
    slurm_rate = results.get("slurm", {}).get("throughput_jobs_per_s")
    for r in results.values():
        if bare_rate:
            r["ratio_to_bare"] = round(r["throughput_jobs_per_s"] / bare_rate, 4)
        if slurm_rate:
            r["ratio_to_slurm"] = round(r["throughput_jobs_per_s"] / slurm_rate, 2)
    print(
        json.dumps(
            {
                "benchmark": "peers",
                "command": "true",
                "width": args.width,
                "cpu_meter": cpu_meter,
                "results": results,
                "skipped": skipped,
                "machine": machine,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
