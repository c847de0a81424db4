"""The bootstrap script, run for real by sh against a real server and artifact host:
it installs exactly the published agent build, and nothing else, ever."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from corral.testing import ArtifactServer, Cluster

pytestmark = pytest.mark.e2e

BUILD = (f'#!/bin/sh\nexec {sys.executable} -m corral agent "$@"\n').encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_script(server, prefix: Path, *extra: str) -> subprocess.CompletedProcess:
    script = httpx.get(server.url + "/api/v1/bootstrap.sh").text
    return subprocess.run(
        [
            "sh",
            "-s",
            "--",
            "--join-token",
            server.join_token,
            "--prefix",
            str(prefix),
            "--no-service",
            *extra,
        ],
        input=script,
        text=True,
        capture_output=True,
        timeout=120,
    )


@pytest.fixture
def setup(cluster: Cluster):
    server = cluster.server()
    with ArtifactServer() as art:
        yield server, cluster.client(server), art


def test_installs_the_rolled_out_agent_build(setup, tmp_path):
    server, client, art = setup
    client.publish("agent", "1.0.0", art.put("/agent", BUILD), sha(BUILD), len(BUILD))
    client.rollout("agent", "1.0.0")
    r = run_script(server, tmp_path / "bin")
    assert r.returncode == 0, r.stderr
    installed = tmp_path / "bin" / "corral-agent"
    assert installed.read_bytes() == BUILD and installed.stat().st_mode & 0o111
    assert list((tmp_path / "bin").iterdir()) == [installed]  # no temp files left


def test_server_stored_artifact_needs_and_gets_the_join_token(setup, tmp_path):
    server, client, _ = setup
    f = tmp_path / "corral-agent"
    f.write_bytes(BUILD)
    stored = client.upload(f)
    assert httpx.get(stored["url"]).status_code == 401
    client.publish("agent", "1.0.0", stored["url"], stored["sha256"], stored["size"])
    client.rollout("agent", "1.0.0")
    r = run_script(server, tmp_path / "bin")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "bin" / "corral-agent").read_bytes() == BUILD


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("403", "download of"),
        ("500", "download of"),
        ("truncate", "download of"),
        ("wrong", "sha256"),
    ],
)
def test_never_installs_an_error_page_or_other_bytes(setup, tmp_path, mode, why):
    server, client, art = setup
    prefix = tmp_path / "bin"
    prefix.mkdir()
    (prefix / "corral-agent").write_bytes(b"old build")
    if mode == "wrong":
        url = art.put("/agent", b"#!/bin/sh\necho imposter\n")
    else:
        url = art.put("/agent", BUILD, mode=mode)
    client.publish("agent", "1.0.0", url, sha(BUILD), len(BUILD))
    client.rollout("agent", "1.0.0")
    r = run_script(server, prefix)
    assert r.returncode != 0
    assert why in r.stderr and "nothing installed" in r.stderr
    assert (prefix / "corral-agent").read_bytes() == b"old build"
    assert [p.name for p in prefix.iterdir()] == ["corral-agent"]


def test_refuses_when_no_agent_build_is_rolled_out(setup, tmp_path):
    server, _client, _art = setup
    r = run_script(server, tmp_path / "bin")
    assert r.returncode != 0 and "no agent build is rolled out" in r.stderr
