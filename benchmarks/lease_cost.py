"""Server CPU per liveness signal, over real HTTP to a real `corral server` process:
a lease renewal (`POST /api/v1/agents/lease`, served before the web framework) next
to, in the same run and on the same server, an unchanged heartbeat (the framework's
cheapest agent request: routing, the body guard, authentication, validation, and a
renewal batched in memory) and a full heartbeat exchange. Goal (issue 11): well under
0.3 ms of server CPU per liveness signal.

    python benchmarks/lease_cost.py [--agents 200] [--signals 6000] [--db URL]

The server is told to pace exchanges every 60 s (as a fleet of 3,000 is), so every
agent is told to renew its lease between exchanges. Clients are threads with
keep-alive connections; the server's CPU is read from its own process (user +
system), so the clients' CPU is not counted. Prints JSON."""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import describe
from benchmarks.pg import throwaway_database
from corral.testing import Cluster

COMPONENTS = [
    {"name": "runner", "version": "1.0.0", "sha256": "a" * 64},
    {"name": "agent", "version": "1.0.0", "sha256": "b" * 64},
]


def connect(url: str) -> http.client.HTTPConnection:
    u = urlsplit(url)
    return http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=30)


def call(conn: http.client.HTTPConnection, path: str, headers: dict, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else b""
    conn.request("POST", path, body=data, headers={**headers, "Content-Type": "application/json"})
    resp = conn.getresponse()
    raw = resp.read()
    return resp.status, (json.loads(raw) if raw else None)


def join(url: str, token: str, agents: int) -> list[dict]:
    """Register the agents and run their first exchanges (which admit their renewals)."""
    conn = connect(url)
    fleet = []
    for k in range(agents):
        status, reg = call(
            conn,
            "/api/v1/agents/register",
            {"Authorization": f"Bearer {token}"},
            {"name": f"lc{k:05d}", "cpus": 4, "memory_mb": 8192},
        )
        assert status == 200, reg
        cred = {"Authorization": f"Bearer {reg['credential']}"}
        beat = {
            "instance_id": reg["instance_id"],
            "incarnation": reg["incarnation"],
            "components": COMPONENTS,
            "objects": [],
        }
        status, reply = call(conn, "/api/v1/agents/heartbeat", cred, beat)
        assert status == 200, reply
        assert reply["lease_interval"], "the server did not tell a lease interval"
        beat["objects"] = None
        beat["renews_every"] = reply["lease_interval"]
        status, reply = call(conn, "/api/v1/agents/heartbeat", cred, beat)
        assert status == 200, reply
        fleet.append({"cred": cred, "beat": beat})
    conn.close()
    return fleet


def blast(url: str, fleet: list[dict], total: int, kind: str, threads: int) -> dict:
    """`total` signals of one kind, spread over the agents, from `threads` clients."""
    errors: dict[str, int] = {}
    lock = threading.Lock()

    def worker(part: int) -> None:
        conn = connect(url)
        for i in range(part, total, threads):
            a = fleet[i % len(fleet)]
            if kind == "renewal":
                headers = {**a["cred"], "X-Corral-Incarnation": str(a["beat"]["incarnation"])}
                status, _ = call(conn, "/api/v1/agents/lease", headers)
                ok = status == 204
            else:
                body = a["beat"]
                if kind == "full":  # a report unlike the agent's last: the full exchange
                    body = {**body, "objects": [] if (i // len(fleet)) % 2 else None}
                status, _ = call(conn, "/api/v1/agents/heartbeat", a["cred"], body)
                ok = status == 200
            if not ok:
                with lock:
                    errors[str(status)] = errors.get(str(status), 0) + 1
        conn.close()

    workers = [threading.Thread(target=worker, args=(p,)) for p in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {"wall_s": time.perf_counter() - t0, "errors": errors}


def measure(url: str, pid: int, fleet: list[dict], total: int, kind: str, threads: int) -> dict:
    proc = psutil.Process(pid)
    before = proc.cpu_times()
    out = blast(url, fleet, total, kind, threads)
    after = proc.cpu_times()
    cpu = (after.user - before.user) + (after.system - before.system)
    return {
        "signals": total,
        "server_cpu_ms_per_signal": round(1000 * cpu / total, 4),
        "signals_per_s": round(total / out["wall_s"], 1),
        "errors": out["errors"],
    }


def http_parser() -> str:
    """What uvicorn parses HTTP with here ("auto" takes httptools when installed)."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--signals", type=int, default=6000, help="renewals measured")
    ap.add_argument("--heartbeats", type=int, default=1500, help="heartbeats of each kind")
    ap.add_argument("--threads", type=int, default=4, help="client threads")
    ap.add_argument("--db", default=None, help="PostgreSQL server URL (throwaway database)")
    args = ap.parse_args()
    machine = describe()
    with contextlib.ExitStack() as stack:
        db_url = stack.enter_context(throwaway_database(args.db)) if args.db else None
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="corral-lease-"))
        c = stack.enter_context(Cluster(Path(tmp)))
        server = c.server(db_url=db_url, fast=False, extra=["--heartbeat-interval", "60"])
        fleet = join(server.url, server.join_token, args.agents)
        renewal = measure(server.url, server.pid, fleet, args.signals, "renewal", args.threads)
        # the same report again: its renewal is batched in memory, no exchange
        unchanged = measure(
            server.url, server.pid, fleet, args.heartbeats, "unchanged", args.threads
        )
        full = measure(server.url, server.pid, fleet, args.heartbeats, "full", args.threads)
    per = renewal["server_cpu_ms_per_signal"]
    print(
        json.dumps(
            {
                "benchmark": "lease_cost",
                "database": "postgresql" if args.db else "sqlite",
                "agents": args.agents,
                "http_parser": http_parser(),
                "load_avg": [round(x, 2) for x in os.getloadavg()],
                "renewal": renewal,
                "unchanged_heartbeat": unchanged,
                "full_heartbeat": full,
                "renewal_vs_unchanged_heartbeat": round(
                    per / unchanged["server_cpu_ms_per_signal"], 3
                ),
                "goal_ms": 0.3,
                "goal_met": per < 0.3,
                "machine": machine,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
