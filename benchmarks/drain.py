"""Drain benchmark: time to retire N instances holding M bytes of unique outputs,
next to the raw loopback copy throughput of the same bytes (the physical limit).

Jobs pinned to fleet `work` write the outputs; a one-instance fleet `keep` is the
only place they can go. Then `work` is scaled to 0 and the clock runs until every
work instance is retired (all data safe) and terminated. With --durable there is no
`keep`: the outputs go to `work`'s durable store (moto's S3-compatible server on
loopback, from the test extra), and the clock runs until the server has confirmed
every upload in the bucket and retired the instances.

    python benchmarks/drain.py [--instances 4] [--mb 400] [--durable]

Prints JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import sqlite3
import sys
import tempfile
import textwrap
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from benchmarks.machine import describe
from corral.api import InstanceView
from corral.testing import Cluster, S3Server, job_python, wait_for

WRITER = textwrap.dedent("""
    import os, sys
    out = os.environ["CORRAL_OUTPUT_DIR"]
    size = int(sys.argv[1])
    with open(os.path.join(out, "part.bin"), "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n
""")


def loopback_throughput(total: int, tmp: Path, runs: int = 3) -> tuple[float, float, float]:
    """Bytes per second of one HTTP transfer of `total` bytes on loopback, hashed on
    the way in like corral hashes every copy: the best of `runs`, and the first (the
    only one that writes into page cache not used before: on a fresh VM, touching new
    memory costs more than the copy itself); and the CPU seconds of the best (both
    ends: they are threads of this process)."""
    blob = tmp / "blob"
    with open(blob, "wb") as f:
        left = total
        while left:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *a) -> None:
            pass

    handler = lambda *a, **k: Quiet(*a, directory=str(tmp), **k)  # noqa: E731
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        measured = []
        for _ in range(runs):
            t0, c0 = time.perf_counter(), time.process_time()
            conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1])
            conn.request("GET", "/blob")
            resp = conn.getresponse()
            h = hashlib.sha256()
            with open(tmp / "copy", "wb") as f:
                while chunk := resp.read(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
            conn.close()
            measured.append((total / (time.perf_counter() - t0), time.process_time() - c0))
        best = max(measured)
        return best[0], measured[0][0], best[1]
    finally:
        srv.shutdown()
        blob.unlink()
        (tmp / "copy").unlink(missing_ok=True)


class CpuMeter:
    """CPU seconds (user + system) of this benchmark's processes, by role: the server,
    the recipient agent, the leaving agents (`roles`: agent name -> role). A count,
    less noisy than time on a shared machine. `sample` often: an agent that retires
    exits, and its last sample is what it used."""

    def __init__(self, roles: dict[str, str]):
        self.roles = roles
        self.last: dict[int, tuple[str, float]] = {}
        self.start: dict[int, float] = {}

    def sample(self) -> None:
        for p in psutil.Process().children(recursive=True):
            try:
                cmd = p.cmdline()
                t = p.cpu_times()
            except psutil.Error:
                continue
            if "--name" in cmd:
                role = self.roles.get(cmd[cmd.index("--name") + 1], "other")
            elif "server" in cmd or "up" in cmd:
                role = "server"
            else:
                role = "other"
            self.last[p.pid] = (role, t.user + t.system)
            self.start.setdefault(p.pid, t.user + t.system)

    def used(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, (role, cpu) in self.last.items():
            out[role] = round(out.get(role, 0.0) + cpu - self.start[pid], 2)
        return dict(sorted(out.items()))


def timeline(db: Path, leaving: list[str]) -> list[dict[str, object]]:
    """When each copy was ordered, delivered to its recipient's heartbeat and confirmed
    present, and when its source was asked to drain and retired: seconds from the first
    drain request, read from the server's database after the run."""
    with sqlite3.connect(db) as conn:
        inst = {
            r[0]: r[1:]
            for r in conn.execute("SELECT id, name, drain_requested_at, retired_at FROM instances")
        }
        t0 = min(inst[i][1] for i in leaving)
        held = {
            sha: iid
            for sha, iid in conn.execute("SELECT sha256, instance_id FROM replicas")
            if iid in leaving
        }
        rows = [
            (*r, held.get(r[0]))
            for r in conn.execute(
                "SELECT r.sha256, r.instance_id, r.created_at, r.delivered_at, r.updated_at,"
                " o.size FROM replicas r JOIN objects o ON o.sha256 = r.sha256"
                " WHERE r.state = 'present' ORDER BY r.created_at"
            )
            if r[1] not in leaving
        ]

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - t0, 3)

    return [
        {
            "object": sha[:8],
            "mb": round(size / 2**20, 1),
            "from": inst[src][0] if src in inst else None,
            "to": inst[dst][0],
            "ordered": rel(created),
            "delivered": rel(delivered),
            "confirmed": rel(updated),
            "source_drain_requested": rel(inst[src][1]) if src in inst else None,
            "source_retired": rel(inst[src][2]) if src in inst else None,
        }
        for sha, dst, created, delivered, updated, size, src in rows
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--mb", type=float, default=400, help="total unique output, MB")
    ap.add_argument("--jobs-per-instance", type=int, default=4)
    ap.add_argument(
        "--timeline",
        action="store_true",
        help="also print, per copy, when it was ordered, delivered and confirmed",
    )
    ap.add_argument(
        "--durable",
        action="store_true",
        help="offload to an S3-compatible store instead of a running instance",
    )
    args = ap.parse_args()
    if args.durable and S3Server.executable() is None:
        sys.exit("--durable needs moto_server: pip install -e '.[test]'")
    total = int(args.mb * 2**20)
    n_jobs = args.instances * args.jobs_per_instance
    per_job = total // n_jobs
    with tempfile.TemporaryDirectory(prefix="corral-drain-") as tmpname:
        tmp = Path(tmpname)
        tmp.chmod(0o755)  # the writer must be readable by a root agent's job user
        raw, raw_first, raw_cpu = loopback_throughput(per_job * n_jobs, tmp)
        writer = tmp / "writer.py"
        writer.write_text(WRITER)
        with Cluster(tmp / "c") as c:
            server = c.up(agents=0)
            client = c.client(server)
            work = {
                "name": "work",
                "backend": "local",
                "min_size": 0,
                "max_size": args.instances,
                "cpus": 1,
            }
            if args.durable:
                s3 = S3Server(tmp)
                c.procs.append(s3.start())  # the cluster stops it with the rest
                s3.wait_ready().create_bucket("bench")
                work["durable"] = {
                    "endpoint": s3.url,
                    "bucket": "bench",
                    "access_key": "bench",
                    "secret_key": "bench",
                }
            else:
                client.apply_fleet(
                    {"name": "keep", "backend": "local", "min_size": 1, "max_size": 1, "cpus": 1}
                )
            client.apply_fleet(work)
            client.scale("work", args.instances)
            c.wait_agents_running(client, args.instances + (0 if args.durable else 1), timeout=60)
            ids = [
                client.submit([job_python(), str(writer), str(per_job)], fleet="work", cpus=1).id
                for _ in range(n_jobs)
            ]
            wait_for(
                lambda: all(client.job(i).state == "succeeded" for i in ids),
                600,
                "the jobs writing the outputs",
            )
            # the instances hold them by their own report (a job's finish is only a
            # claim): the drain starts from settled instances, not amid the exchanges
            # that report the outputs
            wait_for(
                lambda: all(o.copies >= 1 for j in ids for o in client.outputs(j)),
                60,
                "the instances' reports of the outputs",
            )
            leaving = [i.id for i in client.instances() if i.fleet == "work"]
            roles = {
                i.name: ("leaving agents" if i.fleet == "work" else "recipient agent")
                for i in client.instances()
            }
            cpu = CpuMeter(roles)
            cpu.sample()
            t0 = time.time()
            client.scale("work", 0)

            def states() -> dict[str, InstanceView]:
                cpu.sample()
                return {
                    i.id: i for i in client.instances(include_terminated=True) if i.id in leaving
                }

            # the clock is the database's (drain requested -> retired); polling it less
            # often takes less of the server's CPU from the drain it measures
            wait_for(
                lambda: all(i.state in ("retired", "terminated") for i in states().values()),
                1800,
                "retirement",
                0.5,
            )
            retired = states()
            used = cpu.used()
            retired_at = [i.retired_at for i in retired.values()]
            requested_at = [i.drain_requested_at for i in retired.values()]
            assert None not in retired_at, retired
            assert None not in requested_at, retired
            t_safe = max(t for t in retired_at if t) - min(t for t in requested_at if t)
            wait_for(
                lambda: all(i.state == "terminated" for i in states().values()),
                600,
                "termination",
                0.2,
            )
            t_gone = time.time() - t0
            # the raw copy again, right after the drain (the cluster still up, idle): on
            # a shared machine the load before the cluster started may differ a lot
            after = tmp / "after"
            after.mkdir()
            raw_after, _, _ = loopback_throughput(per_job * n_jobs, after)
            moved = sum(o.size for j in ids for o in client.outputs(j))
            assert all(o.copies >= 1 for j in ids for o in client.outputs(j))
            copies = (
                timeline(server.data_dir / "corral.db", leaving)
                if args.timeline and not args.durable
                else None
            )
    raw_seconds = moved / raw
    print(
        json.dumps(
            {
                "benchmark": "drain",
                "destination": "durable store (moto S3 on loopback)"
                if args.durable
                else "a running instance",
                "instances_retired": args.instances,
                "unique_bytes": moved,
                "outputs": n_jobs,
                "seconds_until_all_retired": round(t_safe, 2),
                "seconds_until_all_terminated": round(t_gone, 2),
                "effective_mb_per_s": round(moved / 2**20 / t_safe, 1),
                "raw_loopback_mb_per_s": round(raw / 2**20, 1),
                "raw_copy_seconds": round(raw_seconds, 2),
                "raw_loopback_first_mb_per_s": round(raw_first / 2**20, 1),
                "ratio_to_raw": round(t_safe / raw_seconds, 1),
                "raw_copy_cpu_seconds": round(raw_cpu, 2),
                "raw_loopback_after_mb_per_s": round(raw_after / 2**20, 1),
                # the goal's measure: effective throughput / raw throughput, against the
                # raw copy before the cluster started and right after the drain
                "throughput_vs_raw": round(raw_seconds / t_safe, 2),
                "throughput_vs_raw_after": round(moved / raw_after / t_safe, 2),
                # from the scale-in until all retired (seen by polling every 0.2 s)
                "cpu_seconds_during_drain": used,
                "note": "terminated includes the retire grace (5 s) before hosts are terminated",
                "machine": describe(),
                **({"timeline": copies} if copies is not None else {}),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
