"""CPU per heartbeat in process: the full exchange against the batched lease renewal
(a heartbeat that reports nothing new), through the real app (httpx ASGITransport:
routing, body guard, authentication, validation; the client's own CPU included) and
through the route's handler alone (as the simulator calls it). Also the CPU of one
flush of all the buffered renewals. Prints JSON.

    python benchmarks/heartbeat_cost.py [--agents 50] [--rounds 20] [--db URL]

CPU is this process's (all threads: aiosqlite's worker included); on PostgreSQL the
database's own CPU is not counted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from corral.api import HeartbeatRequest
from corral.server.api import agents as agents_api
from corral.server.app import close_context, create_app, open_context
from corral.server.auth import Principal
from corral.server.config import ServerConfig
from corral.server.leases import flush_leases

COMPONENTS = [
    {"name": "runner", "version": "1.0.0", "sha256": "a" * 64},
    {"name": "agent", "version": "1.0.0", "sha256": "b" * 64},
]


async def measure(db_url: str | None, data: Path, agents: int, rounds: int, full: bool) -> dict:
    # full: every heartbeat runs the exchange; else the report never changes and the
    # last full exchange never gets too old, so every heartbeat after the first two
    # takes the cheap path
    every = 0.0 if full else 3600.0
    cfg = ServerConfig(data_dir=data, db_url=db_url, heartbeat_full_every=every)
    ctx = await open_context(cfg)
    ctx.notifier.cross_server = True  # PostgreSQL: as with the wake bus up
    try:
        transport = httpx.ASGITransport(app=create_app(ctx))
        async with httpx.AsyncClient(transport=transport, base_url="http://srv") as http:
            fleet = []
            for k in range(agents):
                r = await http.post(
                    "/api/v1/agents/register",
                    json={"name": f"a{k}", "cpus": 4, "memory_mb": 1024},
                    headers={"Authorization": f"Bearer {ctx.join_token}"},
                )
                reg = r.json()
                beat = {
                    "instance_id": reg["instance_id"],
                    "incarnation": reg["incarnation"],
                    "components": COMPONENTS,
                    "objects": [],
                }
                cred = {"Authorization": f"Bearer {reg['credential']}"}
                for _ in range(2):  # the first report, then "objects unchanged"
                    r = await http.post("/api/v1/agents/heartbeat", json=beat, headers=cred)
                    assert r.status_code == 200, r.text
                    beat["objects"] = None
                fleet.append((cred, beat))
            await flush_leases(ctx)

            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(rounds):
                for cred, beat in fleet:
                    r = await http.post("/api/v1/agents/heartbeat", json=beat, headers=cred)
                    assert r.status_code == 200, r.text
            app_cpu, app_wall = time.process_time() - c0, time.perf_counter() - w0

            f0 = time.process_time()
            await flush_leases(ctx)
            flush_cpu = time.process_time() - f0

            bodies = [
                (HeartbeatRequest.model_validate(b), Principal("agent", "x", b["instance_id"]))
                for _, b in fleet
            ]
            c0 = time.process_time()
            for _ in range(rounds):
                for body, who in bodies:
                    await agents_api.heartbeat(
                        body=body, who=who, ctx=ctx, gone=agents_api.never_gone
                    )
            handler_cpu = time.process_time() - c0
            await flush_leases(ctx)
    finally:
        await close_context(ctx)
    n = agents * rounds
    return {
        "app_cpu_ms_per_heartbeat": round(1000 * app_cpu / n, 3),
        "app_wall_ms_per_heartbeat": round(1000 * app_wall / n, 3),
        "handler_cpu_ms_per_heartbeat": round(1000 * handler_cpu / n, 3),
        "flush_cpu_ms": round(1000 * flush_cpu, 3) if not full else None,
        "flushed_renewals": agents if not full else 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--db", default=None, help="PostgreSQL server URL (throwaway database)")
    args = ap.parse_args()
    out: dict = {}
    for mode in ("full", "cheap"):
        with contextlib.ExitStack() as stack:
            db_url = stack.enter_context(throwaway_database(args.db)) if args.db else None
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="corral-hb-"))
            out[mode] = asyncio.run(
                measure(db_url, Path(tmp), args.agents, args.rounds, mode == "full")
            )
    print(
        json.dumps(
            {
                "benchmark": "heartbeat_cost",
                "database": "postgresql" if args.db else "sqlite",
                "agents": args.agents,
                "rounds": args.rounds,
                **out,
                "load_avg": [round(x, 2) for x in os.getloadavg()],
                "machine": describe(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
