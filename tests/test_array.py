"""Batches: `POST /api/v1/jobs:batch` submits many jobs in one request and one
transaction; `corral run --array 1-N` submits N tasks, each with its own
$CORRAL_ARRAY_INDEX."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest

from corral.testing import Cluster, corral_cmd, job_python, wait_for

TASK = (
    "import os, sys; i = os.environ['CORRAL_ARRAY_INDEX']; "
    "open(os.path.join(sys.argv[1], 'idx-' + i), 'x').write(i)"  # 'x': a second run fails
)


@pytest.mark.slow
def test_array_of_100_tasks_each_sees_its_own_index(cluster: Cluster, jobfiles: Path) -> None:
    server = cluster.server()
    for k in range(2):
        cluster.agent(server, name=f"arr{k}", cpus=8)
    client = cluster.client(server)
    cluster.wait_agents_running(client, 2)
    env = {**os.environ, "CORRAL_SERVER": server.url, "CORRAL_TOKEN": server.admin_token}
    r = subprocess.run(
        corral_cmd("run", "--array", "1-100", "--", job_python(), "-c", TASK, str(jobfiles)),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    ids = [int(x) for x in r.stdout.split()]
    assert len(ids) == 100 == len(set(ids))

    def all_done():
        jobs = [j for j in client.jobs(limit=500) if j.id in set(ids)]
        return jobs if all(j.state in ("succeeded", "failed") for j in jobs) else None

    jobs = wait_for(all_done, 240, "100 array tasks to finish", interval=0.5)
    assert len(jobs) == 100
    assert [j.state for j in jobs] == ["succeeded"] * 100, [j.reason for j in jobs]
    assert all(j.result_attempt == 1 for j in jobs)  # each result recorded once
    files = sorted(p.name for p in jobfiles.glob("idx-*"))
    assert files == sorted(f"idx-{i}" for i in range(1, 101))
    for i in range(1, 101):
        assert (jobfiles / f"idx-{i}").read_text() == str(i)


@pytest.mark.slow
def test_batch_is_all_or_nothing_and_names_the_bad_entry(cluster: Cluster) -> None:
    server = cluster.server()
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    good = {"command": ["true"]}
    bad = {"command": ["true"], "cpus": -1}
    r = httpx.post(
        server.url + "/api/v1/jobs:batch", json={"jobs": [good, bad, good]}, headers=headers
    )
    assert r.status_code == 422, r.text
    assert "jobs.1.cpus" in r.text
    listed = httpx.get(server.url + "/api/v1/jobs", headers=headers).json()
    assert listed == []  # nothing half-written
    r = httpx.post(server.url + "/api/v1/jobs:batch", json={"jobs": [good] * 3}, headers=headers)
    assert r.status_code == 201, r.text
    ids = r.json()["ids"]
    assert len(ids) == 3 and ids == sorted(ids)
    r = httpx.post(server.url + "/api/v1/jobs:batch", json={"jobs": []}, headers=headers)
    assert r.status_code == 422 and "jobs" in r.text
