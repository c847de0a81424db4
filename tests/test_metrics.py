"""/metrics: corral's own Prometheus metrics move when jobs run (real server and agent
processes), and fleet-wide gauges come from the database at scrape time."""

from __future__ import annotations

import base64

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral.testing import Cluster, job_python, wait_for

pytestmark = pytest.mark.e2e


def scrape(server) -> dict[tuple[str, tuple], float]:
    """/metrics, with the admin token (a server without --public-metrics needs one)."""
    auth = {"Authorization": f"Bearer {server.admin_token}"}
    r = httpx.get(server.url + "/metrics", headers=auth, timeout=10)
    assert r.status_code == 200, r.text
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_when_jobs_run(cluster: Cluster, db_url: str):
    server = cluster.server(db_url=db_url)
    cluster.agent(server, name="m1")
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1)
    before = scrape(server)
    assert value(before, "corral_agents", state="running", lost="false") == 1
    assert value(before, "corral_attempts_started_total") == 0
    build = [k for k in before if k[0] == "corral_build_info"]
    assert len(build) == 1 and before[build[0]] == 1

    ok = client.submit([job_python(), "-c", "print('ok')"])
    bad = client.submit(["sh", "-c", "exit 4"])
    wait_for(
        lambda: client.job(ok.id).state == "succeeded" and client.job(bad.id).state == "failed",
        60,
        "both jobs to finish",
    )
    after = scrape(server)
    assert value(after, "corral_jobs_submitted_total", fleet="") == 2
    assert value(after, "corral_attempts_started_total") == 2
    assert value(after, "corral_attempts_finished_total", outcome="succeeded") == 1
    assert value(after, "corral_attempts_finished_total", outcome="failed") == 1
    assert value(after, "corral_submit_to_start_seconds_count") == 2
    assert value(after, "corral_submit_to_start_seconds_sum") > 0
    assert value(after, "corral_dispatch_placements_total") == 2
    assert value(after, "corral_dispatch_pass_seconds_count") > value(
        before, "corral_dispatch_pass_seconds_count"
    )
    assert value(after, "corral_heartbeat_handling_seconds_count") > value(
        before, "corral_heartbeat_handling_seconds_count"
    )
    # gauges read from the database
    assert value(after, "corral_jobs", state="succeeded", fleet="") == 1
    assert value(after, "corral_jobs", state="failed", fleet="") == 1
    assert value(after, "corral_attempts", state="succeeded") == 1
    assert value(after, "corral_db_pool_size") > 0
    # its one line of output, printed as it exited, rode with the finish and was stored
    page = client.logs(ok.id, attempt=1)
    assert b"".join(base64.b64decode(c.data) for c in page.chunks) == b"ok\n"
    # what it took, by route and in statements (benchmarks/dispatch.py divides these)
    # each runner's start and finish, through its agent's relay or (relay away) directly
    for action in ("start", "finish"):
        direct = value(after, "corral_http_requests_total", route=f"attempts.{action}")
        relayed = value(after, "corral_relayed_attempt_reports_total", action=action)
        assert direct + relayed == 2, (action, direct, relayed)
    assert value(after, "corral_db_statements_total") > value(before, "corral_db_statements_total")
    assert value(after, "corral_database_errors_total", where="request") == 0
