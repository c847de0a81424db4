"""The dashboard's server side, in process (no loops, no agents): signing in, what a
page may show (escaped user text), filters, search and pages, the fragments' 401,
the metrics' database gauges, and the charts' series."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from corral.api import JobSubmit
from corral.server import charts
from corral.server.app import close_context, create_app, open_context
from corral.server.config import ServerConfig
from corral.store import jobs as jobs_repo
from corral.store import tokens


def run(coro):
    return asyncio.run(coro)


async def _with_app(tmp_path: Path, db_url: str, body):
    ctx = await open_context(ServerConfig(data_dir=tmp_path / "srv", db_url=db_url))
    try:
        app = create_app(ctx)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://dash") as http:
            await body(ctx, http)
    finally:
        await close_context(ctx)


async def _sign_in(ctx, http: httpx.AsyncClient) -> None:
    r = await http.post("/login", data={"token": ctx.admin_token, "next": "/jobs"})
    assert r.status_code == 303, r.text
    http.cookies.set("corral_token", ctx.admin_token)


@pytest.mark.slow
def test_sign_in_checks_the_token_before_keeping_it(tmp_path: Path, db_url: str):
    async def body(ctx, http: httpx.AsyncClient):
        r = await http.get("/jobs")
        assert (r.status_code, r.headers["location"]) == (303, "/login?next=/jobs")
        r = await http.get("/jobs?fragment=1")
        assert r.status_code == 401  # the page script sends people to the form
        r = await http.get("/ui/jobs/1/logs")
        assert r.status_code == 401

        r = await http.post("/login", data={"token": "cra_wrong", "next": "/jobs"})
        assert r.status_code == 401
        assert "unknown or revoked" in r.text
        assert "set-cookie" not in r.headers
        r = await http.post("/login", data={"token": ctx.join_token})
        assert r.status_code == 401
        assert "a join token cannot sign in" in r.text
        r = await http.post("/login", data={"token": ""})
        assert (r.status_code, "enter the admin token" in r.text) == (401, True)

        r = await http.post("/login", data={"token": ctx.admin_token, "next": "//evil.example/x"})
        assert (r.status_code, r.headers["location"]) == (303, "/")
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        r = await http.post("/login", data={"token": ctx.admin_token, "next": "/jobs?state=x"})
        assert r.headers["location"] == "/jobs?state=x"

        r = await http.post(
            "/login",
            data={"token": ctx.admin_token},
            headers={"Origin": "http://evil.example"},
        )
        assert r.status_code == 403

        http.cookies.set("corral_token", ctx.admin_token)
        assert (await http.get("/jobs")).status_code == 200
        await ctx.db.transact(tokens.create_token, tokens.ADMIN, ctx.now(), note="other")
        r = await http.get("/?token=cra_wrong")
        assert r.status_code == 401 and "not valid" in r.text

    run(_with_app(tmp_path, db_url, body))


@pytest.mark.slow
def test_pages_escape_user_text_and_filter_search_and_page(tmp_path: Path, db_url: str):
    async def body(ctx, http: httpx.AsyncClient):
        await _sign_in(ctx, http)
        evil = await ctx.db.transact(
            jobs_repo.submit,
            JobSubmit(command=["echo", "<img src=x onerror=alert(1)>"], name="<script>x</script>"),
            ctx.now(),
        )
        for i in range(55):
            await ctx.db.transact(
                jobs_repo.submit,
                JobSubmit(command=["train.py", f"--seed={i}"], name=f"sweep-{i}"),
                ctx.now(),
            )
        for url in ("/jobs", f"/jobs/{evil}", "/jobs?q=script"):
            text = (await http.get(url)).text
            assert "<script>x</script>" not in text and "<img src=x" not in text, url
        page = (await http.get(f"/jobs/{evil}")).text
        assert "&lt;script&gt;x&lt;/script&gt;" in page
        assert "&lt;img src=x onerror=alert(1)&gt;" in page

        first = (await http.get("/jobs")).text
        ids = [int(x) for x in re.findall(r'id="job-(\d+)"', first)]
        assert len(ids) == 50 and ids == sorted(ids, reverse=True) and ids[0] == evil + 55
        older = re.search(r"before=(\d+)", first)
        assert older is not None and int(older.group(1)) == ids[-1]
        second = (await http.get(f"/jobs?before={older.group(1)}")).text
        rest = [int(x) for x in re.findall(r'id="job-(\d+)"', second)]
        assert rest == list(range(ids[-1] - 1, evil - 1, -1))  # the 6 older, evil last

        found = (await http.get("/jobs?q=SWEEP-4")).text  # case-insensitive, name
        assert sorted(int(x) for x in re.findall(r'id="job-(\d+)"', found)) == [
            evil + 5,
            *range(evil + 41, evil + 51),
        ]
        found = (await http.get("/jobs?q=seed%3D7")).text  # the command
        assert re.findall(r'id="job-(\d+)"', found) == [str(evil + 8)]
        found = (await http.get(f"/jobs?q={evil}")).text  # the id
        assert str(evil) in re.findall(r'id="job-(\d+)"', found)
        assert re.findall(r'id="job-(\d+)"', (await http.get("/jobs?q=%25_")).text) == []
        none = (await http.get("/jobs?state=failed")).text
        assert re.findall(r'id="job-(\d+)"', none) == [] and "no job matches" in none
        bad = await http.get("/jobs?state=nonsense&before=abc")
        assert bad.status_code == 200  # an unknown filter shows every job

        frag = await http.get("/jobs?fragment=1&q=sweep-54")
        assert frag.status_code == 200 and "<html" not in frag.text and "sweep-54" in frag.text
        assert (await http.get("/jobs/99999")).status_code == 404
        for url in ("/", "/?fragment=1", "/fleets", "/rollouts", "/instances/nope"):
            r = await http.get(url)
            assert r.status_code == (404 if "nope" in url else 200), url

        metrics = (await http.get("/metrics")).text
        assert 'corral_jobs{fleet="",state="queued"} 56.0' in metrics
        assert "corral_build_info{" in metrics and "corral_db_pool_size" in metrics

    run(_with_app(tmp_path, db_url, body))


def test_chart_series_average_queued_running_and_count_finished_per_minute():
    now = 10_000.0
    o = charts.origin(now)  # buckets on whole minutes; the last is the one under way
    assert o == 6420.0 and o + 59 * 60 == 9960.0
    times = [
        (o + 600, o + 610, o + 650),  # queued 10 s, ran 40 s, in bucket 10
        (now - 500, None, None),  # queued since 500 s ago (from 20 s into bucket 51)
        (now - 400, now - 100, None),  # queued over buckets 53-57, then running
        (now - 7000, now - 6000, None),  # running the whole hour
    ]
    queued, running, done = charts.job_series(times, now)
    assert len(queued.values) == len(running.values) == charts.BUCKETS
    assert queued.values[10] == pytest.approx(10 / 60)
    assert running.values[10] == pytest.approx(1 + 40 / 60)
    assert done.values[10] == 1 and sum(done.values) == 1
    assert queued.values[51] == pytest.approx(2 / 3) and queued.values[50] == 0
    assert queued.values[53] == pytest.approx(2) and queued.values[58] == pytest.approx(1)
    assert running.values[58] == pytest.approx(2)
    # the minute under way (40 s of it so far) is averaged over its elapsed part
    assert queued.values[59] == pytest.approx(1) and running.values[59] == pytest.approx(2)
    assert sum(running.values[:59]) == pytest.approx(59 + 40 / 60 + 1)

    latency = charts.latency_series([(9960.0, 0.040, 2), (5000.0, 9.0, 1)], now)
    assert latency.values[-1] == pytest.approx(20.0) and sum(latency.values[:-1]) == 0
    latency = charts.latency_series([(9960.0, 0.004, 1), (9900.0, 0.002, 1)], now)
    assert latency.values[-1] == pytest.approx(4.0) and latency.values[-2] == pytest.approx(2.0)
    svg = charts.svg("a <title>", [queued, running])
    assert "a &lt;title&gt;" in svg and svg.count("<polyline") == 2


def test_heartbeat_minutes_stay_bounded():
    from corral.server import metrics

    metrics.HEARTBEAT_MINUTES.clear()
    for minute in range(200):
        for _ in range(3):
            metrics.observe_heartbeat(0.002, now=minute * 60.0 + 5)
    kept = metrics.heartbeat_minutes()
    assert len(kept) <= 62 and kept[-1] == (199 * 60.0, pytest.approx(0.006), 3)
    metrics.HEARTBEAT_MINUTES.clear()


@pytest.mark.slow
def test_a_database_failure_is_a_503_and_is_counted(tmp_path: Path):
    import sqlalchemy as sa

    from corral.server import metrics

    def errors(where: str) -> float:
        return metrics.DATABASE_ERRORS.labels(where)._value.get()

    async def body(ctx, http: httpx.AsyncClient):
        auth = {"Authorization": f"Bearer {ctx.admin_token}"}
        assert (await http.get("/api/v1/jobs", headers=auth)).status_code == 200
        before = errors("request"), errors("metrics")

        async def break_jobs(conn):
            await conn.execute(sa.text("ALTER TABLE jobs RENAME TO jobs_gone"))

        await ctx.db.transact(break_jobs)
        r = await http.get("/api/v1/jobs", headers=auth)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "database_unavailable"
        scrape = await http.get("/metrics", headers=auth)
        assert scrape.status_code == 200  # this process's metrics, without the db gauges
        assert "corral_jobs{" not in scrape.text and "corral_build_info{" in scrape.text
        assert (errors("request"), errors("metrics")) == (before[0] + 1, before[1] + 1)

    run(_with_app(tmp_path, f"sqlite:///{tmp_path / 'c.db'}", body))
