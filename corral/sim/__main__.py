"""python -m corral.sim: run seeds of the simulation.

    python -m corral.sim --seeds 1-1000      # one JSON summary of the sweep
    python -m corral.sim --seed 7            # one seed's full report (replays it exactly)

Exits 1 if any invariant was violated."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from corral.sim.sweep import one, parse_seeds, sweep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m corral.sim", description=__doc__)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--seed", type=int, action="append", help="one seed's full report (repeatable)")
    g.add_argument("--seeds", type=parse_seeds, help="a sweep: 1-1000, or 1,5,9; one summary")
    p.add_argument("--jobs", type=int, default=8, help="jobs submitted at the start")
    p.add_argument("--agents", type=int, default=3, help="agents at the start")
    p.add_argument(
        "--fault-seconds",
        type=float,
        default=40.0,
        help="virtual seconds during which faults are injected",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for a sweep")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    kw = {"jobs": args.jobs, "agents": args.agents, "fault_seconds": args.fault_seconds}
    if args.seeds:
        summary = sweep(args.seeds, args.workers, **kw)
        print(json.dumps(summary))
        return 1 if summary["violations"] else 0
    failed = False
    for seed in args.seed or [1]:
        report = one((seed, kw))
        print(json.dumps(report))
        failed |= bool(report["violations"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
