"""python -m corral.sim: run seeds of the simulation; print one JSON report per seed;
exit 1 if any invariant was violated."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from corral.sim import Settings, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m corral.sim", description=__doc__)
    p.add_argument("--seed", type=int, action="append", help="seed to run (repeatable; default 1)")
    p.add_argument("--jobs", type=int, default=200, help="jobs submitted at the start")
    p.add_argument("--agents", type=int, default=4, help="agents at the start")
    p.add_argument(
        "--fault-seconds",
        type=float,
        default=240.0,
        help="virtual seconds during which faults are injected",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    failed = False
    for seed in args.seed or [1]:
        report = asyncio.run(
            run(
                Settings(
                    seed=seed, jobs=args.jobs, agents=args.agents, fault_seconds=args.fault_seconds
                )
            )
        )
        print(json.dumps(report))
        failed |= bool(report["violations"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
