"""Steady-state exchange cost of an idle fleet, counted rather than timed (the
machine was shared: see scale.md). In process, the server's clock simulated: N
agents register, then each heartbeats (wait=0) at the interval its replies tell it,
sending its object list as the agent does (every 30 s on main, objects_refresh on
this branch), for `--seconds` of simulated time after a warm-up. Prints full
exchanges (write transactions), heartbeats and the process's CPU per heartbeat.
Lease renewals between exchanges are left out (the same on both sides).

    PYTHONPATH=<tree> python docs/notes/scale-steady.py --agents 1000 --db URL
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))

from benchmarks.pg import throwaway_database
from corral.server.app import close_context, open_context
from corral.server.config import ServerConfig
from tests import appkit

try:
    from corral.domain.heartbeat import objects_refresh
except ImportError:  # main: the agent's fixed OBJECTS_REFRESH

    def objects_refresh(interval: float) -> float:
        return 30.0


COMPONENTS = [
    {"name": "runner", "version": "1.0.0", "sha256": "a" * 64},
    {"name": "agent", "version": "1.0.0", "sha256": "b" * 64},
]


async def run(args, db_url: str) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="scale-steady-"))
    ctx = await open_context(ServerConfig(data_dir=tmp / "srv", db_url=db_url))
    t = [1_000_000.0]
    ctx.clock = lambda: t[0]
    ctx.started_at = t[0] - 3600
    ctx.notifier.cross_server = True  # as with the wake bus up
    transactions = [0]
    inner = ctx.db.transact

    async def counting(fn, *a, **kw):
        transactions[0] += 1
        return await inner(fn, *a, **kw)

    ctx.db.transact = counting
    rng = random.Random(1)
    try:
        async with appkit.client(ctx) as http:
            agents = []
            for k in range(args.agents):
                j = await appkit.join(http, ctx, f"a{k}")
                beat = {**j.beat, "components": COMPONENTS, "objects": [], "wait": 0.0}
                agents.append([j.headers, beat, t[0]])  # cred, body, listed at
            ctx.pacing = None  # recomputed for the whole fleet
            queue = [(t[0] + rng.random() * 2.0, k) for k in range(args.agents)]
            heapq.heapify(queue)
            end_warm = t[0] + args.warmup
            end = end_warm + args.seconds
            beats = full0 = cpu0 = 0.0
            counting_on = False
            interval = None
            while queue:
                at, k = heapq.heappop(queue)
                if at >= end:
                    break
                if not counting_on and at >= end_warm:
                    counting_on = True
                    full0, cpu0 = transactions[0], time.process_time()
                t[0] = at
                cred, beat, listed = agents[k]
                r = await http.post("/api/v1/agents/heartbeat", json=beat, headers=cred)
                if r.status_code != 200:
                    heapq.heappush(queue, (at + 1.0, k))
                    continue
                reply = r.json()
                interval = reply["interval"]
                if beat["objects"] is not None:
                    listed = at
                due = at - listed >= objects_refresh(interval)
                beat["objects"] = [] if due else None
                beat["renews_every"] = reply.get("lease_interval")
                agents[k][2] = listed
                beats += counting_on
                heapq.heappush(queue, (at + interval, k))
            full = transactions[0] - full0
            cpu = time.process_time() - cpu0
    finally:
        await close_context(ctx)
    return {
        "agents": args.agents,
        "interval_s": interval,
        "simulated_s": args.seconds,
        "heartbeats": int(beats),
        "full_exchanges": int(full),
        "full_pct": round(100 * full / beats, 1) if beats else None,
        "full_per_s": round(full / args.seconds, 2),
        "process_cpu_ms_per_heartbeat": round(1000 * cpu / beats, 2) if beats else None,
        "process_cpu_ms_per_agent_minute": round(1000 * cpu / args.agents / args.seconds * 60, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--warmup", type=float, default=70)
    ap.add_argument("--db", default=None)
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        if args.db:
            url = stack.enter_context(throwaway_database(args.db))
        else:
            url = str(Path(tempfile.mkdtemp()) / "corral.db")
        print(json.dumps(asyncio.run(run(args, url))))


if __name__ == "__main__":
    main()
