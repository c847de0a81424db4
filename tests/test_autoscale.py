"""The autoscaler with real processes: it grows a fleet while jobs wait, retires
instances idle past the timeout, and acts only on consecutive agreeing checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.testing import Cluster, wait_for

pytestmark = pytest.mark.e2e


def test_fleet_grows_for_waiting_jobs_and_shrinks_when_idle(tmp_path: Path):
    with Cluster(tmp_path / "c") as c:
        server = c.up(agents=0, extra=["--autoscale-interval", "1"])
        client = c.client(server)
        client.apply_fleet(
            {
                "name": "local",
                "backend": "local",
                "min_size": 0,
                "max_size": 2,
                "idle_timeout": 3,
                "cpus": 1,
            }
        )
        ids = [client.submit(["sleep", "2"], cpus=1).id for _ in range(2)]
        wait_for(
            lambda: all(client.job(i).state == "succeeded" for i in ids),
            90,
            "the fleet to grow and run both jobs",
        )
        assert len({client.job(i).instance_id for i in ids}) == 2
        wait_for(
            lambda: (
                (insts := client.instances(include_terminated=True))
                and all(i.state == "terminated" for i in insts)
            ),
            90,
            "the idle instances to be retired and terminated",
        )
        decisions = [
            e.kind
            for e in client.events(level="info", limit=500)
            if e.kind in ("fleet.scaled", "fleet.shrinking")
        ]
        # one decision to grow, then only shrinking: no flapping
        assert decisions[0] == "fleet.scaled" and decisions.count("fleet.scaled") == 1
        assert set(decisions[1:]) == {"fleet.shrinking"}
        assert len(client.instances(include_terminated=True)) == 2
        (fleet,) = client.fleets()
        assert (fleet.target_size, fleet.running) == (0, 0)
