"""Sweeps: many seeds over a pool of processes, summed up in one report."""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import re
import time
from collections import Counter

from corral.sim import Settings, run

INVARIANT = re.compile(r"\b(I[1-8])\b")


def parse_seeds(text: str) -> list[int]:
    """`1-1000`, `3,7,9` or a mix: `1-5,9`."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise argparse.ArgumentTypeError(f"bad seed range {part!r}: use N, N-M or N,M")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo:
            raise argparse.ArgumentTypeError(f"bad seed range {part!r}: {hi} < {lo}")
        seeds += range(lo, hi + 1)
    return seeds


def one(args: tuple[int, dict]) -> dict:
    seed, kw = args
    logging.basicConfig(level=logging.ERROR)
    return asyncio.run(run(Settings(seed=seed, **kw)))


def sweep(seeds: list[int], workers: int, **kw: float) -> dict:
    """Run every seed (over `workers` processes) and sum them up."""
    started = time.monotonic()
    jobs = [(seed, kw) for seed in seeds]
    if workers > 1 and len(seeds) > 1:
        ctx = multiprocessing.get_context("fork")  # nothing runs yet: no threads, no loop
        with ctx.Pool(workers, maxtasksperchild=50) as pool:
            reports = pool.map(one, jobs, chunksize=4)
    else:
        reports = [one(j) for j in jobs]
    faults: Counter[str] = Counter()
    violations = []
    for r in reports:
        faults.update(r["faults"])
        for v in r["violations"]:
            m = INVARIANT.search(v)
            violations.append(
                {"seed": r["seed"], "invariant": m[1] if m else v.split(":", 1)[0], "detail": v}
            )
    return {
        "seeds_run": len(reports),
        "faults": dict(sorted(faults.items())),
        "violations": violations,
        "wall_s": round(time.monotonic() - started, 1),
        "settings": kw,
        "replay": "python -m corral.sim --seed N (with the same settings)",
    }
