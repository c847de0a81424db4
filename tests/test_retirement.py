"""Retirement with real processes (`corral up`: a server whose local backend runs and
supervises the agents): outputs survive any scale-down, a retired worker never comes
back, and nothing holding the only copy of an output is terminated."""

from __future__ import annotations

import random
import time
from pathlib import Path

import psutil
import pytest
from outputs import submit, verify_all_outputs

from corral.testing import Cluster, Proxy, free_port, wait_for

pytestmark = pytest.mark.e2e


def assert_no_replica_placed_on_leaving(client, jobs, leaving: dict[str, float]) -> None:
    """No replica row on an instance was created after its drain began."""
    for job_id in jobs:
        for o in client.outputs(job_id):
            for r in client.object(o.sha256).replicas:
                if r.instance_id in leaving:
                    assert r.created_at < leaving[r.instance_id], (o.path, r)


def agent_processes(base: Path, name: str) -> list[psutil.Process]:
    marker = str(base / "agents" / name)
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if (
                p.info["status"] != psutil.STATUS_ZOMBIE
                and "agent" in (p.info["cmdline"] or [])
                and marker in " ".join(p.info["cmdline"])
            ):
                out.append(p)
        except psutil.Error:
            continue
    return out


def test_retiring_worker_whose_heartbeat_arrives_after_removal_never_comes_back(
    tmp_path: Path, writer: str
):
    """The scale-down race: two of three workers retire while one's heartbeat is
    delayed until after it is removed. The late heartbeat is answered `exit`, the
    agent writes its tombstone, its supervisor does not restart it, it never receives
    a replica, and every output survives the hosts' termination."""
    port = free_port()
    with Proxy([f"http://127.0.0.1:{port}"]) as proxy, Cluster(tmp_path / "c") as c:
        server = c.up(agents=3, public_url=proxy.url, port=port)
        client = c.client(server)
        c.wait_agents_running(client, 3)
        client.apply_fleet({"name": "local", "backend": "local", "min_size": 1, "max_size": 3})
        plan = {
            0: {"big.bin": 3_000_000, "note.txt": 100},
            1: {"big.bin": 1_000_000, "note.txt": 101},
            2: {"big.bin": 1_000_000, "note.txt": 102},
        }
        ids = {k: submit(client, writer, files, hold=2.0) for k, files in plan.items()}
        jobs = {ids[k]: files for k, files in plan.items()}
        done = wait_for(
            lambda: (
                all(client.job(i).state == "succeeded" for i in ids.values())
                and [client.job(i) for i in ids.values()]
            ),
            60,
            "the three jobs",
        )
        holders = [j.instance_id for j in done]
        assert len(set(holders)) == 3  # one job, and so unique outputs, on each instance
        survivor, retiring = holders[0], holders[1:]  # the most unique data stays
        late = retiring[0]
        names = {i.id: i.name for i in client.instances()}

        proxy.hold(late)  # its heartbeats now wait at the proxy
        # its next heartbeat is held before the removal starts (a drain can retire it
        # before that heartbeat is even sent: the late one must come after the removal)
        wait_for(lambda: late in proxy.delayed, 10, "a heartbeat of the late worker held")
        client.scale("local", 1)
        wait_for(
            lambda: all(
                i.state in ("retired", "terminated")
                for i in client.instances(include_terminated=True)
                if i.id in retiring
            ),
            90,
            "both workers to retire",
        )
        assert late in proxy.delayed  # it did try to heartbeat while being removed
        proxy.release(late)  # the late heartbeat reaches the server after the removal

        for iid in retiring:
            tomb = server.data_dir / "agents" / names[iid] / "tombstone.json"
            wait_for(tomb.exists, 30, f"{names[iid]} to write its tombstone")
            assert "retired" in tomb.read_text()
        wait_for(
            lambda: all(
                i.state == "terminated"
                for i in client.instances(include_terminated=True)
                if i.id in retiring
            ),
            30,
            "the hosts to be terminated",
        )
        for iid in retiring:
            assert agent_processes(server.data_dir, names[iid]) == []
            assert f"agent {names[iid]} exited as retired; not restarting" in server.log()
        final = client.instances(include_terminated=True)
        assert sorted(i.name for i in final) == ["local-1", "local-2", "local-3"]  # no rejoin
        assert [i.id for i in final if i.state == "running"] == [survivor]

        leaving = {i.id: i.drain_requested_at for i in final if i.id in retiring}
        assert_no_replica_placed_on_leaving(client, jobs, leaving)
        assert verify_all_outputs(client, jobs, tmp_path / "got") == 6


def test_no_recipient_leaves_the_last_holder_draining_and_never_terminates_it(
    tmp_path: Path, writer: str
):
    with Cluster(tmp_path / "c") as c:
        server = c.up(agents=1)
        client = c.client(server)
        (inst,) = c.wait_agents_running(client, 1)
        client.apply_fleet({"name": "local", "backend": "local", "min_size": 0, "max_size": 1})
        job_id = submit(client, writer, {"model.bin": 200_000})
        wait_for(lambda: client.job(job_id).state == "succeeded", 30, "the job")
        client.scale("local", 0)
        warning = wait_for(
            lambda: [e for e in client.events(level="warning") if e.kind == "instance.at_risk"],
            30,
            "the at-risk warning",
        )
        assert f"job {job_id}: model.bin" in warning[0].message
        assert "stays draining" in warning[0].message
        time.sleep(7)  # longer than the retire grace: a wrongly retired host would be gone
        (now,) = client.instances(include_terminated=True)
        assert now.state == "draining"
        assert not [
            e
            for e in client.events(level="info")
            if e.kind in ("instance.retired", "instance.terminated")
        ]
        assert agent_processes(server.data_dir, inst.name)
        verify_all_outputs(client, {job_id: {"model.bin": 200_000}}, tmp_path / "got")

        # only a person can force it, and is told what is lost
        view = client.drain(inst.name, force=True)
        assert [a.names for a in view.at_risk] == [[f"job {job_id}: model.bin"]]
        wait_for(
            lambda: client.instances(include_terminated=True)[0].state == "terminated",
            30,
            "the forced retirement",
        )
        lost = [e for e in client.events(level="warning") if e.kind == "instance.retired_forced"]
        assert lost and "model.bin" in lost[0].message
        assert client.outputs(job_id)[0].state == "lost"


def test_scale_from_five_to_one_keeps_every_output_byte_identical(tmp_path: Path, writer: str):
    with Cluster(tmp_path / "c") as c:
        server = c.up(agents=5)
        client = c.client(server)
        c.wait_agents_running(client, 5)
        client.apply_fleet({"name": "local", "backend": "local", "min_size": 1, "max_size": 5})
        rng = random.Random(5)
        plan = {}
        for k in range(40):
            files = {f"part-{p}.bin": rng.randint(1, 40_000) for p in range(5)}
            if k < 3:
                files["large/weights.bin"] = 50 * 2**20
            plan[k] = files
        ids = {k: submit(client, writer, files, hold=0.2) for k, files in plan.items()}
        jobs = {ids[k]: files for k, files in plan.items()}
        wait_for(
            lambda: all(client.job(i).state == "succeeded" for i in ids.values()),
            180,
            "40 jobs to finish",
        )
        assert sum(len(f) for f in jobs.values()) == 203
        assert len({client.job(i).instance_id for i in ids.values()}) >= 4

        client.scale("local", 1)
        wait_for(
            lambda: (
                sum(i.state == "terminated" for i in client.instances(include_terminated=True)) == 4
            ),
            240,
            "four instances to be terminated",
        )
        final = client.instances(include_terminated=True)
        assert sum(i.state == "running" for i in final) == 1
        leaving = {i.id: i.drain_requested_at for i in final if i.state == "terminated"}
        assert_no_replica_placed_on_leaving(client, jobs, leaving)
        assert verify_all_outputs(client, jobs, tmp_path / "got") == 203
        assert not [
            e
            for e in client.events(level="warning")
            if e.kind in ("instance.at_risk", "instance.retired_forced")
        ]
