"""Secrets at rest (issue 10, item 13): the data dir is private, the database and
credential files are 0600, and secret values (a fleet's `durable.secret_key`, job
environment values given with `corral run --secret K=V`) are sealed with the server
key: the database never holds them in clear, the API, events, logs and dashboard
never show them, and the job still sees the value in its environment."""

from __future__ import annotations

import asyncio
import os
import secrets
import stat
import subprocess
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from corral.api import JobSubmit
from corral.store import fleets, jobs
from corral.store.db import Database
from corral.store.migrate import migrate
from corral.store.schema import fleets as fleets_table
from corral.store.schema import jobs as jobs_table
from corral.testing import Cluster, corral_cmd, job_python, wait_for


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _raw_db(data_dir: Path) -> bytes:
    """Every byte SQLite keeps on disk for this server (the file and its WAL)."""
    out = b""
    for name in ("corral.db", "corral.db-wal", "corral.db-journal"):
        p = data_dir / name
        if p.exists():
            out += p.read_bytes()
    return out


def cli(server, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "CORRAL_SERVER": server.url, "CORRAL_TOKEN": server.admin_token}
    return subprocess.run(
        corral_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.e2e
def test_data_dir_is_private_and_database_and_credentials_are_0600(cluster: Cluster):
    server = cluster.server()
    d = server.data_dir
    assert _mode(d) == 0o700
    for name in ("corral.db", "admin.token", "join.token", "secret.key"):
        assert (d / name).exists(), name
        assert _mode(d / name) == 0o600, f"{name} is {oct(_mode(d / name))}"
    for name in ("corral.db-wal", "corral.db-shm"):
        if (d / name).exists():
            assert _mode(d / name) == 0o600, f"{name} is {oct(_mode(d / name))}"
    # a data dir made by someone else with a looser mode is tightened at start
    server.stop()
    d.chmod(0o755)
    (d / "corral.db").chmod(0o644)
    server.start().wait_ready(90)
    assert _mode(d) == 0o700
    assert _mode(d / "corral.db") == 0o600


@pytest.mark.e2e
def test_a_secret_env_value_reaches_the_job_and_nowhere_else(cluster: Cluster, jobfiles: Path):
    server = cluster.server()
    agent = cluster.agent(server, name="a1")
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1)
    secret = f"hunter2-{secrets.token_hex(8)}"
    seen = jobfiles / "seen"
    code = (
        "import os; "
        f"open({str(seen)!r}, 'w').write(os.environ['API_KEY'] + ' ' + os.environ['PLAIN'])"
    )
    r = cli(
        server,
        "run",
        "--detach",
        "--secret",
        f"API_KEY={secret}",
        "-e",
        "PLAIN=visible",
        "--",
        job_python(),
        "-c",
        code,
    )
    assert r.returncode == 0, r.stderr
    job_id = int(r.stdout.strip())
    job = wait_for(
        lambda: (j := client.job(job_id)).state in ("succeeded", "failed") and j, 60, "the job"
    )
    assert job.state == "succeeded", job.reason
    assert seen.read_text() == f"{secret} visible"  # the job saw the value

    headers = {"Authorization": f"Bearer {server.admin_token}"}
    view = httpx.get(f"{server.url}/api/v1/jobs/{job_id}", headers=headers).json()
    assert view["secret_env"] == ["API_KEY"]  # its name is shown, never its value
    for path in (
        f"/api/v1/jobs/{job_id}",
        "/api/v1/jobs",
        "/api/v1/events?level=debug&limit=1000",
        f"/api/v1/jobs/{job_id}/logs",
    ):
        body = httpx.get(server.url + path, headers=headers).text
        assert secret not in body, path
    page = httpx.get(f"{server.url}/?token={server.admin_token}", follow_redirects=True)
    assert page.status_code == 200 and secret not in page.text
    assert secret.encode() not in _raw_db(server.data_dir)
    assert secret not in server.log() and secret not in agent.log()
    for log in agent.data_dir.rglob("*.log"):
        assert secret not in log.read_text(errors="replace"), log


@pytest.mark.e2e
def test_a_fleets_durable_secret_key_is_sealed_and_never_shown(cluster: Cluster, tmp_path: Path):
    server = cluster.server()
    secret = f"s3-{secrets.token_hex(12)}"
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(
        "name: gpu\nbackend: local\nmin: 0\nmax: 0\n"
        "durable:\n  endpoint: http://127.0.0.1:9\n  bucket: b\n"
        f"  access_key: AKIA\n  secret_key: {secret}\n"
    )
    r = cli(server, "fleet", "apply", str(fleet_file))
    assert r.returncode == 0, r.stderr
    assert secret not in r.stdout + r.stderr
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    for path in ("/api/v1/fleets", "/api/v1/events?level=debug&limit=1000"):
        body = httpx.get(server.url + path, headers=headers).text
        assert secret not in body, path
    assert secret.encode() not in _raw_db(server.data_dir)
    assert secret not in server.log()
    # a restart keeps it usable: the same key (DATA_DIR/secret.key) unseals it
    server.restart(90)
    assert secret.encode() not in _raw_db(server.data_dir)


@pytest.mark.e2e
def test_the_server_key_can_come_from_the_environment(cluster: Cluster):
    from corral.store.sealing import Sealer

    key = Sealer.new_key()
    server = cluster.server(env={"CORRAL_SECRET_KEY": key})
    assert not (server.data_dir / "secret.key").exists()
    server.stop()
    bad = cluster.server(name="bad", env={"CORRAL_SECRET_KEY": "not-a-key"}, wait=False)
    wait_for(lambda: not bad.alive(), 30, "the server with a malformed key to exit")
    assert "CORRAL_SECRET_KEY" in bad.log()


def test_secrets_are_sealed_in_the_store_and_another_key_is_refused(db_url: str):
    from corral.store.sealing import Sealer, SealError

    secret = f"s3-{secrets.token_hex(12)}"
    sealer = Sealer(Sealer.new_key())

    async def go() -> None:
        db = Database(db_url, sealer=sealer)
        try:
            await migrate(db)
            spec = {
                "durable": {
                    "endpoint": "http://127.0.0.1:9",
                    "bucket": "b",
                    "access_key": "AKIA",
                    "secret_key": secret,
                }
            }
            await db.transact(
                fleets.upsert_fleet,
                name="f",
                backend="local",
                min_size=0,
                max_size=0,
                target_size=0,
                now=1.0,
                spec=spec,
            )
            async with db.read() as conn:
                raw = (
                    await conn.execute(
                        sa.select(sa.cast(fleets_table.c.spec, sa.Text)).where(
                            fleets_table.c.name == "f"
                        )
                    )
                ).scalar_one()
                assert secret not in raw
                store = await fleets.durable_store(conn, "f")
                assert store is not None and store.secret_key == secret
                # the row as read back (e.g. re-applied by `corral up`) is not sealed twice
                row = await fleets.get_fleet(conn, "f")
            await db.transact(
                fleets.upsert_fleet,
                name="f",
                backend="local",
                min_size=0,
                max_size=0,
                target_size=0,
                now=2.0,
                spec=row["spec"],
            )
            async with db.read() as conn:
                store = await fleets.durable_store(conn, "f")
                assert store is not None and store.secret_key == secret

            spec = JobSubmit(command=["true"], secret_env={"TOKEN": secret})
            await db.transact(jobs.submit, JobSubmit(command=["true"]), 3.0)
            job_id = await db.transact(jobs.submit, spec, 4.0)
            await db.transact(jobs.submit, JobSubmit(command=["true"]), 5.0)
            async with db.read() as conn:
                raw = (
                    await conn.execute(
                        sa.select(sa.cast(jobs_table.c.secret_env, sa.Text)).where(
                            jobs_table.c.id == job_id
                        )
                    )
                ).scalar_one()
                assert "TOKEN" in raw and secret not in raw
                await jobs.check_server_key(conn)
        finally:
            await db.dispose()

        # a server with another key is refused before it hands out anything
        other = Database(db_url, sealer=Sealer(Sealer.new_key()))
        try:
            async with other.read() as conn:
                with pytest.raises(SealError, match="server key"):
                    await fleets.durable_store(conn, "f")
                with pytest.raises(SealError, match="server key"):
                    await jobs.check_server_key(conn)
            with pytest.raises(SealError, match="server key"):
                await other.transact(fleets.seal_plaintext_secrets)
        finally:
            await other.dispose()

    asyncio.run(go())
