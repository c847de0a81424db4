"""I2 against a hostile job (or anyone holding an attempt token or an agent
credential): a claim to hold an object is not a replica the drain trusts.

The attack as reported: finish an attempt with an output whose sha256 names another
instance's object (and the same through a heartbeat's object list); the server used
to record a present replica on the claimant, the drain of the real holder then saw
nothing at risk, retired it, and the object became unreachable. Here the real holder
is drained after both forgeries and every byte must still download.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from outputs import expected_sha, submit

from corral.testing import Cluster, wait_for

pytestmark = pytest.mark.e2e


def test_forged_output_claims_do_not_let_the_real_holder_retire_with_the_data(
    tmp_path: Path, writer: str
):
    with Cluster(tmp_path / "c") as c:
        server = c.server()
        holder = c.agent(server, name="holder", cpus=2)
        client = c.client(server)
        (h,) = c.wait_agents_running(client, 1)
        files = {"x.bin": 300_000, "y.bin": 200_000}
        job_id = submit(client, writer, files, hold=0)
        wait_for(lambda: client.job(job_id).state == "succeeded", 60, "the outputs to be written")
        shas = {n: expected_sha(job_id, n, s) for n, s in files.items()}
        wait_for(
            lambda: all(
                [r.instance_name for r in client.object(s).replicas if r.state == "present"]
                == ["holder"]
                for s in shas.values()
            ),
            30,
            "the holder's own report of both outputs",
        )

        claimant = c.agent(server, name="claimant", cpus=4)
        c.wait_agents_running(client, 2)
        # a job only the claimant can take; the attacker holds its attempt token
        victim = client.submit(["sleep", "600"], cpus=3)
        wait_for(lambda: client.job(victim.id).state == "running", 30, "the job to run")
        assert client.job(victim.id).instance_id != h.id
        spec = claimant.data_dir / "attempts" / f"{victim.id}-1" / "spec.json"
        token = json.loads(spec.read_text())["token"]

        # forgery 1: finish with an output naming the holder's object
        r = httpx.post(
            f"{server.url}/api/v1/jobs/{victim.id}/attempts/1/finish",
            json={
                "exit_code": 0,
                "outputs": [{"path": "x.bin", "sha256": shas["x.bin"], "size": files["x.bin"]}],
            },
            headers={"X-Corral-Attempt-Token": token},
        )
        assert r.status_code == 200, r.text

        # forgery 2: the claimant's heartbeat lists the holder's other object
        ident = json.loads((claimant.data_dir / "identity.json").read_text())
        inst = next(i for i in client.instances() if i.name == "claimant")
        r = httpx.post(
            f"{server.url}/api/v1/agents/heartbeat",
            json={
                "instance_id": inst.id,
                "incarnation": inst.incarnation,
                "objects": sorted(shas.values()),
                "wait": 0,
            },
            headers={"Authorization": f"Bearer {ident['credential']}"},
        )
        assert r.status_code == 200, r.text
        for sha in shas.values():
            states = {r.instance_name: r.state for r in client.object(sha).replicas}
            assert states.get("claimant") != "present", (sha, states)

        drain = client.drain("holder")
        assert {a.sha256 for a in drain.at_risk} == set(shas.values())
        wait_for(
            lambda: (
                next(i for i in client.instances(True) if i.name == "holder").state
                in ("retired", "terminated")
            ),
            60,
            "the holder to retire once its objects are copied",
        )
        wait_for(lambda: not holder.alive(), 30, "the retired holder's agent to exit")
        for name, sha in shas.items():
            states = {r.instance_name: r.state for r in client.object(sha).replicas}
            assert states.get("claimant") == "present", (name, states)
            got = client.download(sha, tmp_path / "got" / name)
            assert got.stat().st_size == files[name]
