"""The agent's artifact cache and installer against a real HTTP server on loopback
that counts requests and honours ETag / If-None-Match."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import pytest

from corral.agent.artifacts import Artifact, ArtifactCache, Installer, InstallError
from corral.testing import ArtifactServer


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def env(tmp_path: Path):
    with ArtifactServer() as srv, httpx.Client(timeout=10) as client:
        cache = ArtifactCache(tmp_path / "agent" / "cache")
        yield srv, client, Installer(tmp_path / "agent", cache), cache


def art(url: str, data: bytes, version: str = "1.0.0", size: bool = True) -> Artifact:
    return Artifact("runner", version, url, sha(data), len(data) if size else None)


def test_unchanged_artifact_under_repeated_forced_install_is_sent_once(env):
    srv, client, inst, _ = env
    data = os.urandom(300_000)
    url = srv.put("/runner", data)
    for _ in range(5):
        got = inst.install(art(url, data), client)
        assert got.path.read_bytes() == data
        (inst.root / "runner" / "current.json").unlink()  # forget it was installed: force
    assert srv.body_bytes("/runner") == len(data)
    assert srv.requests("/runner") == 1


def test_already_installed_sha256_makes_no_request(env):
    srv, client, inst, _ = env
    data = b"#!/bin/sh\necho runner\n"
    url = srv.put("/runner", data)
    inst.install(art(url, data), client)
    before = srv.requests()
    for _ in range(10):
        inst.install(art(url, data), client)
    assert srv.requests() == before == 1


def test_changed_etag_downloads_once_more_and_unchanged_url_costs_no_body(env, tmp_path):
    srv, client, inst, _cache = env
    v1, v2 = os.urandom(50_000), os.urandom(50_000)
    url = srv.put("/runner", v1)
    inst.install(art(url, v1), client)
    srv.put("/runner", v2)  # new bytes, new ETag at the same URL
    inst.install(art(url, v2, "1.1.0"), client)
    assert srv.statuses("/runner") == [200, 200]
    assert srv.body_bytes("/runner") == len(v1) + len(v2)
    # the URL now flips back to serving v2 while a v3 is wanted: revalidation says
    # "unchanged", no body is sent, and nothing is installed
    v3 = os.urandom(50_000)
    with pytest.raises(InstallError, match="unchanged since it was last downloaded"):
        inst.install(art(url, v3, "1.2.0"), client)
    assert srv.statuses("/runner")[-1] == 304
    assert srv.body_bytes("/runner") == len(v1) + len(v2)
    assert inst.installed("runner").sha256 == sha(v2)


def test_two_alternating_versions_are_each_downloaded_exactly_once(env):
    srv, client, inst, _ = env
    a, b = os.urandom(80_000), os.urandom(80_000)
    ua, ub = srv.put("/0.20.18/runner", a), srv.put("/0.20.23/runner", b)
    for _ in range(10):  # two servers ping-ponging between their versions
        inst.install(art(ua, a, "0.20.18"), client)
        inst.install(art(ub, b, "0.20.23"), client)
    assert srv.body_bytes("/0.20.18/runner") == len(a)
    assert srv.body_bytes("/0.20.23/runner") == len(b)
    assert srv.requests() == 2
    assert inst.installed("runner").path.read_bytes() == b


def test_same_size_different_bytes_are_told_apart(env):
    srv, client, inst, _ = env
    a = b"A" * 4096
    b = b"B" * 4096
    ua, ub = srv.put("/a", a), srv.put("/b", b)
    inst.install(art(ua, a), client)
    inst.install(art(ub, b, "1.0.1"), client)
    assert inst.installed("runner").path.read_bytes() == b
    assert inst.installed("runner").sha256 == sha(b)
    assert srv.requests() == 2


@pytest.mark.parametrize(
    ("mode", "message"), [("403", "HTTP 403"), ("500", "HTTP 500"), ("truncate", "download of")]
)
def test_error_pages_and_truncated_bodies_are_never_installed(env, mode, message):
    srv, client, inst, cache = env
    good = os.urandom(20_000)
    inst.install(art(srv.put("/old", good), good), client)
    data = os.urandom(20_000)
    url = srv.put("/runner", data, mode=mode)
    with pytest.raises(InstallError, match=message):
        inst.install(art(url, data, "2.0.0"), client)
    installed = inst.installed("runner")
    assert installed.sha256 == sha(good) and installed.path.read_bytes() == good
    assert not cache.has(sha(data))
    leftovers = [p.name for p in cache.root.iterdir() if p.name.startswith(".partial")]
    assert leftovers == []


def test_short_body_without_declared_size_fails_on_the_hash(env):
    srv, client, inst, cache = env
    data = os.urandom(10_000)
    url = srv.put("/runner", data[:5000])  # the server simply has the wrong bytes
    with pytest.raises(InstallError, match="does not match"):
        inst.install(art(url, data, size=False), client)
    url = srv.put("/runner-sized", data[:5000])
    with pytest.raises(InstallError, match="short body"):
        inst.install(art(url, data), client)
    assert inst.installed("runner") is None and not cache.has(sha(data))


def test_wrong_bytes_at_a_url_are_downloaded_once_however_often_ordered(env):
    srv, client, inst, _cache = env
    data, other = os.urandom(40_000), os.urandom(40_000)
    url = srv.put("/runner", other)
    for _ in range(5):
        with pytest.raises(InstallError):
            inst.install(art(url, data), client)
    assert srv.statuses("/runner") == [200, 304, 304, 304, 304]
    assert srv.body_bytes("/runner") == len(other)
    srv.put("/runner", data)  # fixed at the source: a new ETag, downloaded once
    assert inst.install(art(url, data), client).path.read_bytes() == data
    assert srv.body_bytes("/runner") == len(other) + len(data)


def test_wrong_hash_is_never_installed(env):
    srv, client, inst, cache = env
    data = os.urandom(10_000)
    url = srv.put("/runner", data)
    wrong = Artifact("runner", "1.0.0", url, sha(b"something else"), len(data))
    with pytest.raises(InstallError, match="does not match"):
        inst.install(wrong, client)
    assert inst.installed("runner") is None
    assert [p for p in cache.root.iterdir() if len(p.name) == 64] == []


def test_cache_lives_apart_from_installs_and_keeps_the_newest(env):
    srv, client, inst, cache = env
    cache.keep = 3
    blobs = [os.urandom(1000) for _ in range(6)]
    for k, b in enumerate(blobs):
        inst.install(art(srv.put(f"/v{k}", b), b, f"1.0.{k}"), client)
        os.utime(cache.path(sha(b)), (k + 1, k + 1))  # make ages distinct
    cached = sorted(p.name for p in cache.root.iterdir() if len(p.name) == 64)
    assert cached == sorted(sha(b) for b in blobs[-3:])
    assert inst.root.resolve() not in cache.root.resolve().parents
    assert cache.root.resolve() not in inst.root.resolve().parents
    installed = inst.installed("runner")
    assert os.access(installed.path, os.X_OK)
    assert installed.path.parent.parent == inst.root / "runner"
