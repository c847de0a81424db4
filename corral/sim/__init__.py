"""Deterministic simulation: the server's own loops, handlers and store on a real
SQLite database, a virtual clock, modelled agents and runners, faults from a seeded
schedule, and the invariants checked at every tick and at the end.

    python -m corral.sim --seed 7 --jobs 200 --agents 4

A seed replays the same run (same faults, placements and results) in one process.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from corral.sim import invariants
from corral.sim.world import Settings, World

__all__ = ["Settings", "run"]

QUIET_TICKS = 3  # a run ends once it has been quiet this many ticks in a row


async def run(settings: Settings, data_dir: Path | None = None) -> dict:
    """Run one seed to the end; the report lists every invariant violation seen."""
    started = time.monotonic()
    return await _run(settings, data_dir, started)


async def _run(settings: Settings, data_dir: Path | None, started: float) -> dict:
    violations: list[str] = []
    ticks = quiet = 0
    async with World(settings, data_dir) as world:
        t0 = world.now
        while world.now - t0 < settings.limit_seconds:
            await world.step()
            ticks += 1
            async with world.ctx.db.read() as conn:
                found = await invariants.at_most_one_live_attempt(
                    conn
                ) + await invariants.nothing_new_on_retired(conn)
            violations += [f"t={world.now - t0:.0f}s {v}" for v in found]
            if world.now - t0 >= settings.fault_seconds and await _quiet(world):
                quiet += 1
                if quiet >= QUIET_TICKS:  # the agents have reported what the runners left
                    break
            else:
                quiet = 0
        violations += invariants.told_by_the_outside(world.ledger)
        violations += invariants.components(world)
        violations += await invariants.settled(world)
        states = await world.ctx.db.query(_job_states)
        ledger = world.ledger
        digest = hashlib.sha256(repr(ledger.trace).encode()).hexdigest()[:16]
        return {
            "seed": settings.seed,
            "jobs": settings.jobs,
            "agents": settings.agents,
            "virtual_seconds": round(world.now - t0, 1),
            "ticks": ticks,
            "wall_seconds": round(time.monotonic() - started, 2),
            "job_states": states,
            "results_accepted": len(ledger.accepted),
            "stale_updates_refused": ledger.refused,
            "faults": dict(sorted(ledger.faults.items())),
            "instances": len(world.agents),
            "trace_digest": digest,
            "violations": sorted(set(violations)),
        }


async def _quiet(world: World) -> bool:
    """Every job final, no instance still draining, and no fault still in effect: a
    fault injected near the end of the window can outlive it (a host cut off for
    seconds more), and until that host is back and has said what it holds, the
    server cannot have confirmed it."""
    if any(world.still_faulty(a) for a in world.agents.values()):
        return False
    states = await world.ctx.db.query(_job_states)
    if set(states) - {"succeeded", "failed", "cancelled"}:
        return False
    from corral.store import instances

    rows = await world.ctx.db.query(instances.list_instances)
    return not [r for r in rows if r["state"] == "draining"]


async def _job_states(conn) -> dict[str, int]:
    from corral.store import jobs

    return dict(sorted((await jobs.count_jobs_by_state(conn)).items()))
