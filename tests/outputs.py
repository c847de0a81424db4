"""Jobs that write outputs of known content: WRITER writes NAME:SIZE files of
deterministic bytes (seeded by job id and name) to $CORRAL_OUTPUT_DIR, so a test can
recompute what every output must be, and check every byte it gets back."""

from __future__ import annotations

import hashlib
import random
import textwrap
from pathlib import Path

from corral.testing import job_python

# usage: python writer.py HOLD_SECONDS NAME:SIZE ...
WRITER = textwrap.dedent("""
    import os, random, sys, time
    job = os.environ["CORRAL_JOB_ID"]
    out = os.environ["CORRAL_OUTPUT_DIR"]
    for spec in sys.argv[2:]:
        name, size = spec.split(":")
        path = os.path.join(out, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(random.Random(f"{job}/{name}").randbytes(int(size)))
    time.sleep(float(sys.argv[1]))
""")


def expected_sha(job_id: int, name: str, size: int) -> str:
    return hashlib.sha256(random.Random(f"{job_id}/{name}").randbytes(size)).hexdigest()


def submit(client, writer: str, files: dict[str, int], hold: float = 0.5) -> int:
    argv = [job_python(), writer, str(hold), *(f"{n}:{s}" for n, s in files.items())]
    return client.submit(argv, cpus=1).id


def verify_all_outputs(client, jobs: dict[int, dict[str, int]], into: Path) -> int:
    """Download every output (the client checks its sha256) and compare it with the
    bytes the job must have written."""
    n = 0
    for job_id, files in jobs.items():
        outputs = {o.path: o for o in client.outputs(job_id)}
        assert set(outputs) == set(files), job_id
        for name, size in files.items():
            o = outputs[name]
            assert o.sha256 == expected_sha(job_id, name, size)
            dest = client.download(o.sha256, into / str(job_id) / name)
            assert dest.stat().st_size == size
            n += 1
    return n
