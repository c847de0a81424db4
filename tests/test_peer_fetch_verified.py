"""Issue 10 item 11: the server passes on an object's bytes only if they hash right.

A holder whose copy is corrupt (or a rogue agent serving other bytes under the
object's name) must not get wrong bytes to a user: the server hashes while it streams,
holds the last chunk back until the sha256 matched, aborts otherwise, and marks that
replica failed with a warning."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from outputs import expected_sha, submit

from corral.testing import Cluster, wait_for

pytestmark = pytest.mark.e2e


def _download(url: str, headers: dict) -> tuple[bytes, Exception | None]:
    got = bytearray()
    try:
        with httpx.stream("GET", url, headers=headers, timeout=30) as r:
            for chunk in r.iter_bytes():
                got += chunk
    except Exception as exc:
        return bytes(got), exc
    return bytes(got), None


def test_server_download_aborts_on_wrong_bytes_and_marks_the_replica(tmp_path: Path, writer):
    with Cluster(tmp_path / "c") as c:
        server = c.server()
        agent = c.agent(server, name="holder")
        client = c.client(server)
        c.wait_agents_running(client, 1)
        size = 3 * 2**20 + 17  # several chunks
        job_id = submit(client, writer, {"x.bin": size}, hold=0)
        wait_for(lambda: client.job(job_id).state == "succeeded", 60, "the output")
        sha = expected_sha(job_id, "x.bin", size)
        wait_for(
            lambda: [r.state for r in client.object(sha).replicas] == ["present"],
            30,
            "the holder's report",
        )
        stored = agent.data_dir / "objects" / sha
        data = bytearray(stored.read_bytes())
        data[-1] ^= 0xFF  # same size, one byte off at the very end
        stored.chmod(0o600)
        stored.write_bytes(bytes(data))

        auth = {"Authorization": f"Bearer {server.admin_token}"}
        got, error = _download(f"{server.url}/api/v1/objects/{sha}/content", auth)
        assert isinstance(error, httpx.HTTPError), error  # the body is cut short
        assert len(got) < size
        wait_for(
            lambda: [r.state for r in client.object(sha).replicas] == ["failed"],
            10,
            "the replica marked failed",
        )
        events = httpx.get(
            f"{server.url}/api/v1/events",
            params={"level": "warning", "kind": "object.replica_bad"},
            headers=auth,
            timeout=10,
        ).json()
        assert events and sha[:12] in events[0]["message"]
