"""Install-loop benchmark: bytes, requests and install orders per instance while
servers of two builds share one database, compared with a naive reconciler that
compares versions by string equality and forces a full download on every check.

Two scenarios, each run for --seconds:
  two_builds   servers 0.20.18 and 0.20.23 behind a round-robin load balancer; the
               naive policy makes each server force its own version, forever
  never_lands  the install can never complete (corral: the URL serves other bytes;
               naive: the binary never lands, e.g. a failing rename)

    python benchmarks/install_loop.py [--seconds 120] [--size-mb 37] [--db URL]

Needs PostgreSQL for two servers (default postgresql://postgres@127.0.0.1:5432/postgres,
in a throwaway database). Prints JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import describe
from benchmarks.pg import throwaway_database
from corral.testing import ArtifactServer, Cluster, Proxy


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def runner_build(version: str, size: int) -> bytes:
    head = (
        f"#!/bin/sh\nexport CORRAL_RUNNER_BUILD={version}\n"
        f'exec {sys.executable} -m corral.agent.runner "$@"\nexit 0\n'
    ).encode()
    return head + os.urandom(max(0, size - len(head)))


def naive(
    art: ArtifactServer, urls: dict[str, str], seconds: float, interval: float, lands: bool
) -> dict:
    """Each check, one of two servers (alternating) compares the instance's reported
    version with the version *it* expects, by string equality, and on a mismatch
    forces a full re-download (no cache, no backoff, no cap)."""
    expected = ["0.20.18", "0.20.23"]
    installed, orders, k = None, 0, 0
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=60) as client:
        while time.monotonic() < deadline:
            want = expected[k % 2] if len(urls) == 2 else next(iter(urls))
            k += 1
            if installed != want:
                orders += 1
                body = client.get(urls[want]).content  # forced: always the full binary
                if lands and len(body) > 0:
                    installed = want
            time.sleep(interval)
    return {"requests": art.requests(), "bytes": art.body_bytes(), "install_orders": orders}


def corral(
    art: ArtifactServer,
    db_url: str,
    base: Path,
    builds: dict[str, bytes],
    urls: dict[str, str],
    seconds: float,
    agents: int,
    serve_wrong: bool,
) -> dict:
    with Cluster(base) as c:
        s1 = c.server(db_url=db_url, name="s1", fast=False, env={"CORRAL_BUILD_VERSION": "0.20.18"})
        s2 = c.server(db_url=db_url, name="s2", fast=False, env={"CORRAL_BUILD_VERSION": "0.20.23"})
        with Proxy([s1.url, s2.url]) as lb:
            for k in range(agents):
                c.agent(lb.url, name=f"a{k + 1}", join_token=s1.join_token)
            client = c.client(s1)
            c.wait_agents_running(client, agents)
            version = "1.1.0"
            data = builds[version]
            if serve_wrong:
                art.put("/runner/1.1.0", os.urandom(len(data)))  # the URL serves other bytes
            client.publish("runner", version, urls[version], sha(data), len(data))
            client.rollout("runner", version, max_unavailable=agents)
            started = time.monotonic()
            time.sleep(seconds)
            status = [s for s in client.component_status() if s.component == "runner"]
            elapsed = time.monotonic() - started
            return {
                "requests": art.requests(),
                "bytes": art.body_bytes(),
                "install_orders": sum(s.orders_total for s in status),
                "states": sorted({s.state for s in status}),
                "seconds": round(elapsed, 1),
                "heartbeats_per_server": lb.counts,
            }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--size-mb", type=float, default=37)
    ap.add_argument("--agents", type=int, default=1)
    ap.add_argument(
        "--interval",
        type=float,
        default=2.0,
        help="naive check interval (corral's heartbeat interval is 2 s)",
    )
    ap.add_argument(
        "--db",
        default=os.environ.get(
            "CORRAL_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    args = ap.parse_args()
    size = int(args.size_mb * 2**20)
    builds = {v: runner_build(v, size) for v in ("0.20.18", "0.20.23", "1.1.0")}
    results: dict = {
        "benchmark": "install_loop",
        "artifact_mb": args.size_mb,
        "seconds": args.seconds,
        "agents": args.agents,
        "scenarios": {},
    }
    for scenario in ("two_builds", "never_lands"):
        row: dict = {}
        with ArtifactServer() as art:
            urls = {v: art.put(f"/runner/{v}", b) for v, b in builds.items()}
            pair = {v: urls[v] for v in ("0.20.18", "0.20.23")}
            if scenario == "two_builds":
                n = naive(art, pair, args.seconds, args.interval, lands=True)
            else:
                n = naive(
                    art, {"0.20.23": urls["0.20.23"]}, args.seconds, args.interval, lands=False
                )
        n = {k: v * args.agents for k, v in n.items()}  # one naive loop per instance
        row["naive"] = n
        with (
            throwaway_database(args.db) as db_url,
            ArtifactServer() as art,
            tempfile.TemporaryDirectory() as tmp,
        ):
            urls = {v: art.put(f"/runner/{v}", b) for v, b in builds.items()}
            row["corral"] = corral(
                art,
                db_url,
                Path(tmp),
                builds,
                urls,
                args.seconds,
                args.agents,
                serve_wrong=scenario == "never_lands",
            )
        per = args.agents
        row["per_instance"] = {
            who: {k: round(row[who][k] / per, 1) for k in ("requests", "bytes", "install_orders")}
            for who in ("naive", "corral")
        }
        row["bytes_ratio_naive_to_corral"] = (
            round(row["naive"]["bytes"] / row["corral"]["bytes"], 1)
            if row["corral"]["bytes"]
            else None
        )
        results["scenarios"][scenario] = row
    results["machine"] = describe()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
