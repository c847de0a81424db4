"""Durable offload: when no instance can take the only copy of an output, the
fleet's S3-compatible store does, and the instance retires only once a server has
seen the copy in the bucket. Against a real S3-compatible server (moto's server
mode) on loopback; signing is checked against AWS's published example."""

from __future__ import annotations

import calendar
import hashlib
import re
import time
from pathlib import Path

import httpx
import pytest
from outputs import submit, verify_all_outputs

from corral.api import FleetSpec
from corral.domain.presign import DurableStore, presign
from corral.testing import Cluster, S3Server, wait_for


def test_presigned_url_matches_aws_published_example():
    # "Authenticating Requests: Using Query Parameters (AWS Signature Version 4)"
    url = presign(
        method="GET",
        scheme="https",
        host="examplebucket.s3.amazonaws.com",
        path="/test.txt",
        access_key="AKIAIOSFODNN7EXAMPLE",
        secret_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        region="us-east-1",
        now=calendar.timegm((2013, 5, 24, 0, 0, 0)),
        expires=86400,
    )
    assert url == (
        "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
    )


def test_signed_headers_change_the_signature():
    store = DurableStore(endpoint="http://127.0.0.1:9", bucket="b", access_key="k", secret_key="s")
    sha = "a" * 64
    plain = store.signed("PUT", sha, 1e9, 60)
    url, headers = store.put_order(sha, 1e9, 60)
    assert headers == {"x-amz-meta-sha256": sha}
    assert "X-Amz-SignedHeaders=host%3Bx-amz-meta-sha256" in url
    assert url.split("X-Amz-Signature=")[1] != plain.split("X-Amz-Signature=")[1]


@pytest.fixture
def s3(tmp_path: Path):
    if S3Server.executable() is None:
        pytest.skip("moto_server is not installed (pip install -e '.[test]')")
    server = S3Server(tmp_path)
    server.start()
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.mark.e2e
def test_last_holder_offloads_to_the_durable_store_then_retires(
    tmp_path: Path, writer: str, s3: S3Server
):
    files = {"model.bin": 6_000_000, "metrics.json": 2_000}
    with Cluster(tmp_path / "c") as c:
        server = c.up(agents=1)
        client = c.client(server)
        (inst,) = c.wait_agents_running(client, 1)
        durable = {
            "endpoint": s3.url,
            "bucket": "corral-outputs",
            "access_key": "test",
            "secret_key": "test",
            "region": "us-east-1",
        }
        client.apply_fleet(
            {"name": "local", "backend": "local", "min_size": 0, "max_size": 1, "durable": durable}
        )
        job_id = submit(client, writer, files)
        wait_for(lambda: client.job(job_id).state == "succeeded", 30, "the job")

        # the bucket does not exist yet: the upload fails, is reported, and nothing
        # retires on the strength of a copy that is not there
        client.scale("local", 0)
        failed = wait_for(
            lambda: [
                e for e in client.events(level="warning") if e.kind == "object.offload_failed"
            ],
            30,
            "the failed upload's warning",
        )
        assert inst.name in failed[0].message
        (now,) = client.instances(include_terminated=True)
        assert now.state == "draining" and "durable store" in now.message
        assert not [e for e in client.events(level="info") if e.kind == "object.offloaded"]

        # once the store can take them, the retried uploads land and are confirmed
        s3.create_bucket("corral-outputs")
        wait_for(
            lambda: client.instances(include_terminated=True)[0].state == "terminated",
            60,
            "the instance to retire and be terminated",
        )
        offloaded = [
            e for e in client.events(level="info", limit=1000) if e.kind == "object.offloaded"
        ]
        assert len(offloaded) == len(files)
        assert not [
            e
            for e in client.events(level="warning")
            if e.kind in ("instance.at_risk", "instance.retired_forced")
        ]

        for out in client.outputs(job_id):
            assert (out.state, out.copies, out.durable) == ("live", 1, True)  # the bucket's copy
            assert client.object(out.sha256).durable
            stored = httpx.get(
                DurableStore.from_spec(durable).get_url(out.sha256, time.time()), timeout=30
            )
            assert stored.status_code == 200
            assert hashlib.sha256(stored.content).hexdigest() == out.sha256
            assert stored.headers["x-amz-meta-sha256"] == out.sha256
        # served by the server from the bucket, checked by the client, byte-identical
        assert verify_all_outputs(client, {job_id: files}, tmp_path / "got") == len(files)


@pytest.mark.parametrize(
    ("durable", "complaint"),
    [
        ({"bucket": "b"}, "durable: missing endpoint"),
        ({"endpoint": "ftp://h", "bucket": "b"}, "must be an http:// or https:// URL"),
        ({"endpoint": "http://h", "bucket": "b", "secret": "x"}, "unknown setting(s) secret"),
    ],
)
def test_a_bad_durable_setting_is_refused_by_name(durable: dict, complaint: str):
    with pytest.raises(ValueError, match=re.escape(complaint)):
        FleetSpec(name="f", durable=durable)
