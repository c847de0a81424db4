"""CLI start-up: wall time of `corral --help` and `corral run --detach -- true` (against a
server this script starts) next to `python -c pass`. Not a test; prints JSON.

Goals: --help <= 0.3 s, run --detach <= 0.4 s.

Two settings. `results`: corral's bytecode cached (as pip installs it: compiled once,
here into a temporary PYTHONPYCACHEPREFIX after a warm-up run), what a user sees.
`results_compiling_sources`: PYTHONDONTWRITEBYTECODE=1, so every run compiles corral's
sources again (a checkout whose environment forbids writing bytecode, as this machine's
does); the difference is the compile time of the modules a command imports.

    python benchmarks/cli.py [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import describe
from corral.testing import Cluster

ROOT = Path(__file__).resolve().parent.parent


def corral_argv() -> list[str]:
    """The installed entry point when it is there (what a user runs), else the module."""
    exe = shutil.which("corral")
    return [exe] if exe else [sys.executable, "-m", "corral"]


def timed(argv: list[str], runs: int, env: dict[str, str]) -> dict:
    """Wall time, and the CPU time (user + system) the command itself used: on a
    machine shared with other work the CPU time is the steadier figure. One untimed
    run first (it writes the bytecode cache when there is one)."""
    subprocess.run(argv, env=env, capture_output=True, timeout=120)
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        r = subprocess.run(argv, env=env, capture_output=True, timeout=120)
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if r.returncode != 0:
            raise SystemExit(f"{argv} failed: {r.stderr.decode()[-500:]}")
    return {
        "median_s": round(statistics.median(walls), 3),
        "min_s": round(min(walls), 3),
        "max_s": round(max(walls), 3),
        "cpu_median_s": round(statistics.median(cpus), 3),
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    load = os.getloadavg()[0]
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "corral --help": [*corral_argv(), "--help"],
        "corral run --detach -- true": [*corral_argv(), "run", "--detach", "--", "true"],
    }
    with tempfile.TemporaryDirectory() as tmp, Cluster(Path(tmp)) as cluster:
        server = cluster.server()
        env.update(CORRAL_SERVER=server.url, CORRAL_TOKEN=server.admin_token)
        cached = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        compiling = {**env, "PYTHONDONTWRITEBYTECODE": "1"}
        compiling.pop("PYTHONPYCACHEPREFIX", None)
        results = {name: timed(argv, args.runs, cached) for name, argv in commands.items()}
        from_sources = {
            name: timed(argv, args.runs, compiling)
            for name, argv in commands.items()
            if name != "python -c pass"
        }
    print(
        json.dumps(
            {
                "benchmark": "cli",
                "machine": describe(),
                "load_average_1m_at_start": round(load, 2),
                "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                "goals_s": {"corral --help": 0.3, "corral run --detach -- true": 0.4},
                "results": results,
                "results_compiling_sources": from_sources,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
