"""A PostgreSQL outage while jobs run: the server could not observe its agents while
its database was down, so that silence is never theirs. A private PostgreSQL on a
free port (initdb/pg_ctl, removed afterwards), a real server and agent on it, jobs
running across a stop and restart of the database: 0 jobs lost, 0 duplicated, 0
attempts revoked, no instance.lost."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.testing import Cluster, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PrivatePostgres:
    """A PostgreSQL of the test's own: initdb into a temporary dir, pg_ctl start/stop
    on a free port; run as the `postgres` OS user when the test runs as root."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="corral-pg-", dir="/var/tmp"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = 60) -> None:
        r = subprocess.run(
            [*self.as_user, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if r.returncode != 0:
            raise AssertionError(f"{args[0]} failed ({r.returncode}): {r.stderr or r.stdout}")

    def init(self) -> None:
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
            "--auth=trust", "--no-sync", "-E", "UTF8",
        )  # fmt: skip

    def start(self) -> None:
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"),
            "-w", "-t", "60", "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run(
                    str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"
                )
            except AssertionError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    bindir = _pg_bin()
    if bindir is None or (os.geteuid() == 0 and not shutil.which("runuser")):
        if _in_ci():
            pytest.fail("initdb/pg_ctl (and runuser, as root) are needed for this test in CI")
        pytest.skip("initdb/pg_ctl not found (install PostgreSQL's server binaries)")
    pg = PrivatePostgres(bindir)
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        pg.remove()


def test_a_database_outage_loses_no_agent_and_no_job(tmp_path: Path, private_pg):
    with Cluster(tmp_path / "cluster") as cluster:
        server = cluster.server(
            db_url=private_pg.url, extra=["--attempt-grace", "10", "--start-timeout", "10"]
        )
        cluster.agent(server, name="w1", cpus=2)
        client = cluster.client(server)
        cluster.wait_agents_running(client, 1, timeout=60)
        ids = [client.submit(["sleep", "25"], cpus=1).id for _ in range(2)]
        wait_for(lambda: all(client.job(i).state == "running" for i in ids), 60, "both jobs to run")
        # the database goes away for longer than the agent grace (4 s) and the attempt
        # grace (10 s), then comes back
        private_pg.stop()
        time.sleep(14)  # the outage itself (not a wait for a condition)
        private_pg.start()
        wait_for(
            lambda: all(client.job(i).state in ("succeeded", "failed") for i in ids),
            90,
            "both jobs to finish",
            interval=0.5,
        )
        for i in ids:
            job = client.job(i)
            assert job.state == "succeeded", job
            assert [a.state for a in job.attempts] == ["succeeded"], job.attempts
        assert len(client.jobs()) == 2  # nothing duplicated
        kinds = [e.kind for e in client.events(level="debug", limit=1000)]
        assert "instance.lost" not in kinds, kinds
        assert "server.unobserved" in kinds  # the outage was seen, and said so
        (inst,) = client.instances()
        assert inst.state == "running" and not inst.lost
